"""How one request picks its tokens and when it stops: :class:`SamplingParams`.

Names and defaults follow vLLM's ``SamplingParams`` so that requests written
for vLLM (and the OpenAI-style server built on it) mean the same here. The
object is validated once, when it is made, and frozen, so the sampler and the
detokenizer can trust it (``dataclasses.replace`` validates the copy again).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import NoReturn

# Temperatures below this are treated as greedy, as vLLM does: dividing the
# logits by a tiny temperature overflows fp32 and samples the argmax anyway.
GREEDY_TEMPERATURE = 1e-5

# torch.Generator.manual_seed accepts this range (negative seeds wrap around).
_SEED_MIN, _SEED_END = -(2**63), 2**64


def _is_int(value: object) -> bool:
    # bool is a subclass of int, but True is never a meaningful token count.
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _fail(name: str, requirement: str, value: object) -> NoReturn:
    raise ValueError(f"SamplingParams.{name} must be {requirement}, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """Sampling and stopping options of one request.

    Attributes:
        max_tokens: the most output tokens; None: up to the model's length limit.
        temperature: logits are divided by it before sampling; 0 means greedy
            (argmax, as Hugging Face's greedy search).
        top_k: keep only the k most likely tokens; 0 or -1 turns it off.
        top_p: nucleus sampling: keep the smallest set of most likely tokens
            whose probability adds up to at least top_p; 1 turns it off.
        seed: seeds the request's own generator, so its tokens do not depend
            on the other requests in the batch; None uses the global RNG.
        stop: strings that end the output when generated; normalised to a
            tuple of non-empty strings (``()`` when there are none).
        stop_token_ids: token ids that end the output; normalised to a tuple.
        ignore_eos: keep generating after an end-of-sequence token.
        skip_special_tokens: leave special tokens out of the text.
        include_stop_str_in_output: keep the stop string (or stop token's
            text) at the end of the text.
        n: completions per request; only 1 is supported.
        logprobs: also report each sampled token's log-probability (under the
            model's raw distribution, before temperature, as vLLM) and the
            ``logprobs`` most likely alternatives; None: none.
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    n: int = 1
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens is not None and not (_is_int(self.max_tokens) and self.max_tokens >= 1):
            _fail("max_tokens", "an int >= 1 or None", self.max_tokens)
        if not (_is_real(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0):
            _fail("temperature", "a finite number >= 0 (0 means greedy)", self.temperature)
        if not (_is_int(self.top_k) and self.top_k >= -1):
            _fail("top_k", "an int >= 1, or 0 or -1 to turn it off", self.top_k)
        if not (_is_real(self.top_p) and 0 < self.top_p <= 1):
            _fail("top_p", "a number in (0, 1]", self.top_p)
        if self.seed is not None and not (_is_int(self.seed) and _SEED_MIN <= self.seed < _SEED_END):
            _fail("seed", f"an int in [{_SEED_MIN}, {_SEED_END}) or None", self.seed)
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, "True or False", getattr(self, name))
        if not (_is_int(self.n) and self.n == 1):
            _fail("n", "1 (one completion per request is all llmopt supports)", self.n)
        if self.logprobs is not None and not (_is_int(self.logprobs) and 0 <= self.logprobs <= 20):
            _fail("logprobs", "an int in [0, 20] or None", self.logprobs)
        # Plain Python numbers from here on (numpy scalars are accepted above).
        for name, kind in (("max_tokens", int), ("temperature", float), ("top_k", int),
                           ("top_p", float), ("seed", int), ("n", int)):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, kind(getattr(self, name)))
        object.__setattr__(self, "stop", _normalise_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", _normalise_stop_token_ids(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        """True when the request takes the argmax (temperature 0, or below 1e-5)."""
        return self.temperature < GREEDY_TEMPERATURE


def _normalise_stop(stop: object) -> tuple[str, ...]:
    if stop is None:
        return ()
    strings = (stop,) if isinstance(stop, str) else stop
    if not isinstance(strings, (list, tuple)) or not all(isinstance(s, str) and s for s in strings):
        _fail("stop", "a non-empty string, a list of non-empty strings, or None", stop)
    return tuple(strings)


def _normalise_stop_token_ids(ids: object) -> tuple[int, ...]:
    if ids is None:
        return ()
    if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in ids):
        _fail("stop_token_ids", "a list of token ids (ints >= 0) or None", ids)
    return tuple(int(i) for i in ids)
