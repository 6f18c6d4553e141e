"""The continuous-batching engine: requests in, one scheduler step at a time, outputs out.

Each ``step()`` asks the scheduler which sequences run and how many tokens
each computes, runs them as one packed batch through the model runner,
samples a token for every sequence whose prompt is fully computed,
detokenizes, checks stop conditions and returns the cumulative output of
every request that moved. The engine is not thread-safe: one thread owns it
(the server runs it in its own loop thread).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from llmopt.runtime.detokenizer import IncrementalDetokenizer
from llmopt.runtime.engine_config import EngineConfig
from llmopt.runtime.kv_budget import cpu_budget_bytes, gpu_budget_bytes
from llmopt.runtime.model_runner import ModelRunner, RunnerOptions
from llmopt.runtime.outputs import CompletionOutput, RequestMetrics, RequestOutput
from llmopt.runtime.request_checks import checked_request, tokenize_prompt
from llmopt.runtime.sampler import logprob_entry, new_generator, sample
from llmopt.runtime.sampling_params import SamplingParams
from llmopt.runtime.scheduler import Scheduler, SchedulerConfig
from llmopt.runtime.stop_tokens import eos_token_ids
from llmopt.runtime.sequence import FinishReason, Sequence


@dataclass
class _Request:
    seq: Sequence
    params: SamplingParams
    prompt: str | None
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    metrics: RequestMetrics
    stop_reason: str | int | None = None
    logprobs: list | None = None  # per output token: (token id, logprob, [(id, logprob), ...])


class LLMEngine:
    def __init__(self, model: torch.nn.Module, tokenizer: Any, config: EngineConfig,
                 model_name: str = "model", model_source: str | None = None):
        """``model_source``: the name or path ``model`` was loaded from, which tensor-parallel
        workers load themselves (None: they are sent ``model``)."""
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.model_name = model_name
        self.device = config.resolved_device()
        options = RunnerOptions(self.device, config.block_size, config.lower, config.kernels,
                                config.compile_options)
        if config.tensor_parallel_size > 1:  # rank 0 of several: llmopt/runtime/tp_worker.py
            from llmopt.runtime.tp_worker import tensor_parallel_runner

            self.runner = tensor_parallel_runner(model, options, config.tensor_parallel_size, model_source,
                                                 config.dtype)
            self.device = self.runner.device
        else:
            self.runner = ModelRunner(model, options)
        start = time.perf_counter()
        self.layer_specs = self.runner.profile()
        self.warmup_seconds = time.perf_counter() - start
        self.num_total_blocks = self._num_blocks()
        self.runner.allocate_kv_cache(self.num_total_blocks)
        self.speculator = None
        if config.speculative_config is not None:
            from llmopt.runtime.speculative.speculator import build_speculator

            self.speculator = build_speculator(config.speculative_config, model, self.runner,
                                               self.num_total_blocks, config)
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_batched_tokens=config.max_num_batched_tokens,
                            max_num_seqs=config.max_num_seqs, block_size=config.block_size,
                            enable_chunked_prefill=config.enable_chunked_prefill,
                            long_prefill_token_threshold=config.long_prefill_token_threshold,
                            enable_prefix_caching=config.enable_prefix_caching,
                            max_model_len=self._max_model_len()),
            self.num_total_blocks, finish_check=self._finish_check)
        self.max_model_len = self.scheduler.max_model_len
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self._requests: dict[str, _Request] = {}
        self._next_id = 0
        self.num_steps = 0

    # ---- sizing ----------------------------------------------------------

    def _num_blocks(self) -> int:
        config = self.config
        if config.num_kv_blocks is not None:
            return config.num_kv_blocks
        per_block = sum(s.bytes_per_token() for s in self.layer_specs.values()) * config.block_size
        if self.device.type == "cuda":
            budget = gpu_budget_bytes(config.gpu_memory_utilization, self.device)
        else:
            budget = cpu_budget_bytes(config.kv_cache_memory_gib)
        num_blocks = budget // per_block
        if num_blocks < 1:
            raise ValueError(f"a KV budget of {budget} bytes holds no block of {per_block} bytes; "
                             "raise kv_cache_memory_gib (CPU) or gpu_memory_utilization (GPU)")
        return int(num_blocks)

    def _max_model_len(self) -> int:
        pool = self.num_total_blocks * self.config.block_size
        if not self.config.enable_chunked_prefill:
            pool = min(pool, self.config.max_num_batched_tokens)
        model_limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        limits = [pool] + [x for x in (model_limit, self.config.max_model_len) if x]
        return min(limits)

    # ---- requests --------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return self.scheduler.block_manager.num_free_blocks

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def new_request_id(self) -> str:
        self._next_id += 1
        return f"req-{self._next_id}"

    def add_request(self, request_id: str | None, prompt: str | list[int],
                    params: SamplingParams | None = None) -> str:
        """Queue a request; returns its id. ValueError for a bad prompt or parameters."""
        request_id, params = checked_request(request_id, params, self._requests, self.new_request_id)
        prompt_text, token_ids = tokenize_prompt(prompt, self.tokenizer, _vocab_size(self.model, self.tokenizer))
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens, but this model serves at most "
                f"{self.max_model_len} tokens per sequence (prompt + at least one output token); "
                "shorten the prompt or raise max_model_len / the KV cache size")
        max_tokens = params.max_tokens
        seq = Sequence(request_id, token_ids, params=params, max_tokens=max_tokens)
        request = _Request(seq, params, prompt_text,
                           IncrementalDetokenizer(self.tokenizer, token_ids, params),
                           new_generator(params, self.device),
                           RequestMetrics(arrival_time=time.perf_counter()))
        self.scheduler.add(seq)
        self._requests[request_id] = request
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks; None if it is not running."""
        request = self._requests.pop(str(request_id), None)
        if request is None:
            return None
        self.scheduler.abort(request.seq.request_id)
        if self.speculator is not None:
            self.speculator.forget(request.seq.request_id)
        request.metrics.finished_time = time.perf_counter()
        return self._output(request)

    # ---- one step --------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        if self.speculator is not None:
            self.speculator.propose(self.scheduler, self._requests, self.max_model_len)
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            return []
        items = scheduled.scheduled
        logits = self.runner.execute(items)
        sampling = [s for s in items if s.samples]
        sampled: dict[str, int | list[int]] = {}
        plain_rows, plain, logprob_rows = [], [], []
        row = 0
        for item in sampling:
            request = self._requests[item.request_id]
            if item.num_draft_tokens:
                rows = slice(row, row + 1 + item.num_draft_tokens)
                tokens = self.speculator.verify(item, logits[rows], request)
                sampled[item.request_id] = tokens
                logprob_rows += [(request, row + j, t) for j, t in enumerate(tokens)]
            else:
                plain_rows.append(row)
                plain.append(item)
            row += 1 + item.num_draft_tokens
        if plain:
            requests = [self._requests[s.request_id] for s in plain]
            plain_logits = logits if len(plain_rows) == logits.shape[0] else logits[plain_rows]
            token_ids = sample(plain_logits, [r.params for r in requests], [r.generator for r in requests])
            for item, request, r, t in zip(plain, requests, plain_rows, token_ids):
                sampled[item.request_id] = t
                logprob_rows.append((request, r, t))
        _record_logprobs(logits, logprob_rows)
        now = time.perf_counter()
        finished = {seq.request_id for seq in self.scheduler.update(scheduled, sampled)}
        if self.speculator is not None:
            self.speculator.after_step(items)
            for request_id in finished:
                self.speculator.forget(request_id)
        self.num_steps += 1
        outputs = []
        for item in sampling:
            request = self._requests[item.request_id]
            if request.metrics.first_token_time is None:
                request.metrics.first_token_time = now
                request.metrics.num_prefix_hit_tokens = request.seq.num_prefix_hit_tokens
            request.metrics.num_preemptions = request.seq.num_preemptions
            if request.logprobs is not None and len(request.logprobs) > request.seq.num_output_tokens:
                del request.logprobs[request.seq.num_output_tokens:]  # drafts after a stop
            if item.request_id in finished:
                request.metrics.finished_time = now
                if request.seq.finish_reason is not FinishReason.STOP:
                    request.detokenizer.flush()
                del self._requests[item.request_id]
            outputs.append(self._output(request))
        return outputs

    def _finish_check(self, seq: Sequence) -> FinishReason | None:
        request = self._requests[seq.request_id]
        request.detokenizer.add(seq.output_token_ids[-1])
        stop = request.detokenizer.check_stop(self.eos_token_ids)
        if stop is None:
            return None
        request.stop_reason = stop[1]
        return FinishReason.STOP

    def _output(self, request: _Request) -> RequestOutput:
        seq = request.seq
        reason = seq.finish_reason.value if seq.finish_reason is not None else None
        completion = CompletionOutput(0, request.detokenizer.text, list(seq.output_token_ids),
                                      reason, request.stop_reason,
                                      None if request.logprobs is None else list(request.logprobs))
        return RequestOutput(seq.request_id, request.prompt, list(seq.prompt_token_ids), [completion],
                             finished=seq.is_finished, metrics=request.metrics)

    # ---- statistics ------------------------------------------------------

    def kv_cache_bytes(self) -> int:
        return self.runner.kv_cache.nbytes

    def kv_waste_fraction(self) -> float:
        return self.scheduler.block_manager.kv_waste_fraction()


def _record_logprobs(logits: torch.Tensor, emitted: list[tuple[_Request, int, int]]) -> None:
    """Append each emitted token's log-probability (and the top alternatives) where asked for.

    ``emitted``: (request, logit row, token) in each request's token order.
    Taken from the model's raw distribution (before temperature and top-k/p), as vLLM does.
    """
    wanted = [(r, row, t) for r, row, t in emitted if r.params.logprobs is not None]
    if not wanted:
        return
    logprobs = torch.log_softmax(logits[[row for _, row, _ in wanted]].float(), dim=-1)
    for (request, _, token), lp in zip(wanted, logprobs):
        if request.logprobs is None:
            request.logprobs = []
        request.logprobs.append(logprob_entry(lp, token, request.params.logprobs))


def _vocab_size(model, tokenizer) -> int | None:
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size or (len(tokenizer) if tokenizer is not None else None)
