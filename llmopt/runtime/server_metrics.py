"""``/metrics`` of ``llmopt serve``, in Prometheus' text format (``prometheus_client``).

Each server has its own registry (several servers in one test process do
not mix). Gauges read the engine loop's last ``LoopStats`` when scraped;
counters and histograms are updated by ``serving.py`` as requests move.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the route)

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServerMetrics:
    def __init__(self, loop, model_name: str):
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"model_name": model_name}
        r = self.registry

        def gauge(name, doc, read):
            g = Gauge(name, doc, list(labels), registry=r)
            g.labels(**labels).set_function(read)

        gauge("llmopt_num_requests_running", "Sequences in the engine's running batch.", lambda: loop.stats.running)
        gauge("llmopt_num_requests_waiting", "Sequences waiting for a place in the batch.", lambda: loop.stats.waiting)
        gauge("llmopt_kv_blocks_total", "KV cache blocks in the pool.", lambda: loop.stats.blocks_total)
        gauge("llmopt_kv_blocks_free", "KV cache blocks free.", lambda: loop.stats.blocks_free)
        gauge("llmopt_kv_blocks_used", "KV cache blocks held by requests.",
              lambda: loop.stats.blocks_total - loop.stats.blocks_free)
        gauge("llmopt_num_requests_pending", "Sequences the server has admitted and not finished.",
              lambda: self.pending)
        gauge("llmopt_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / prompt tokens computed.",
              lambda: self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0)
        speculator = getattr(getattr(loop, "engine", None), "speculator", None)
        if speculator is not None:
            # Plain ints the engine thread updates; a scrape reads them as they are.
            stats = speculator.stats
            gauge("llmopt_spec_decode_num_draft_tokens", "Drafted tokens verified (speculative decoding).",
                  lambda: stats.num_drafted)
            gauge("llmopt_spec_decode_num_accepted_tokens", "Drafted tokens accepted.",
                  lambda: stats.num_accepted)
            gauge("llmopt_spec_decode_acceptance_rate", "Accepted / drafted tokens.",
                  lambda: stats.acceptance_rate)
            gauge("llmopt_spec_decode_mean_accepted_length",
                  "Tokens emitted per sequence step that verified drafts (1 + accepted).",
                  lambda: stats.mean_accepted_length)
        self.prompt_tokens = Counter("llmopt_prompt_tokens", "Prompt tokens of admitted sequences.",
                                     list(labels), registry=r).labels(**labels)
        self.generation_tokens = Counter("llmopt_generation_tokens", "Tokens generated.",
                                         list(labels), registry=r).labels(**labels)
        self._finished = Counter("llmopt_request_success", "Sequences finished, by finish reason.",
                                 list(labels) + ["finished_reason"], registry=r)
        self._errors = Counter("llmopt_request_errors", "Error responses, by HTTP status.",
                               list(labels) + ["status"], registry=r)
        self.ttft = Histogram("llmopt_time_to_first_token_seconds", "Time from admission to the first token.",
                              list(labels), buckets=_TTFT_BUCKETS, registry=r).labels(**labels)
        self.tpot = Histogram("llmopt_time_per_output_token_seconds", "Time per output token after the first.",
                              list(labels), buckets=_TPOT_BUCKETS, registry=r).labels(**labels)
        self.e2e = Histogram("llmopt_e2e_request_latency_seconds", "Time from admission to the last token.",
                             list(labels), buckets=_E2E_BUCKETS, registry=r).labels(**labels)
        self._labels = labels
        self.pending = 0
        self.prefix_hit_tokens = 0
        self.prefix_query_tokens = 0

    def finished(self, reason: str) -> None:
        self._finished.labels(**self._labels, finished_reason=reason).inc()

    def error(self, status: int) -> None:
        self._errors.labels(**self._labels, status=str(int(status))).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
