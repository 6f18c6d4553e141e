"""What the engine hands back for a request: cumulative text and token ids.

Shaped like vLLM's ``RequestOutput``: each output carries everything produced
so far (not a delta); streaming callers diff consecutive outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One completion of a request (llmopt produces one per request: ``n == 1``).

    Attributes:
        index: position among the request's completions (always 0).
        text: the decoded output so far (stop strings cut off unless asked for).
        token_ids: the sampled tokens so far.
        finish_reason: None while running; then ``"stop"`` (EOS, a stop token
            or a stop string), ``"length"`` (max_tokens or the model's length
            limit) or ``"abort"``.
        stop_reason: the stop string or stop token id that ended it, if any.
        logprobs: when asked for (``SamplingParams.logprobs``), one entry per
            token of ``token_ids``: (token id, its log-probability, the top
            alternatives as (token id, log-probability) pairs).
    """

    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list | None = None  # with SamplingParams.logprobs: (token id, logprob, [(id, logprob)]) per token

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock times (``time.perf_counter()``) of a request's life, and counts.

    With speculative decoding: ``num_drafted_tokens`` drafts were verified,
    ``num_accepted_tokens`` of them kept, over ``num_spec_steps`` steps that
    verified drafts (each emits the kept drafts and one token of the target).
    """

    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    num_prefix_hit_tokens: int = 0  # prompt tokens found in the prefix cache
    num_preemptions: int = 0
    num_drafted_tokens: int = 0
    num_accepted_tokens: int = 0
    num_spec_steps: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Kept drafts / verified drafts (0 without any)."""
        return self.num_accepted_tokens / self.num_drafted_tokens if self.num_drafted_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per step that verified drafts: 1 + kept drafts, on average (0 without any)."""
        return 1 + self.num_accepted_tokens / self.num_spec_steps if self.num_spec_steps else 0.0

    def add(self, drafted: int, accepted: int, emitted: int) -> None:
        self.num_drafted_tokens += drafted
        self.num_accepted_tokens += accepted
        self.num_spec_steps += 1


@dataclass
class RequestOutput:
    """A request's state after an engine step.

    ``text``, ``token_ids`` and ``finish_reason`` are shortcuts to
    ``outputs[0]``.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    metrics: RequestMetrics | None = None

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason
