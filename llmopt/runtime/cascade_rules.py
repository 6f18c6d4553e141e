"""The cascade's two deferral rules, as plain functions of probabilities.

Token level (speculative cascades, Narasimhan et al. 2024): the small model
proposes candidate tokens, the large model scores them in one forward. The
candidate at position j is kept when the small model is confident enough,
``q_j(c_j) >= threshold`` (its own probability of the token it chose, under
its raw distribution), or when it lies in the large model's top ``top_k``
(fewer than ``top_k`` tokens have a strictly larger logit); otherwise the
large model's token replaces it there and the candidates after it are
dropped. So ``threshold <= 0`` (or ``top_k >= vocab``) keeps every small-model
token, and ``threshold > 1`` with ``top_k == 0`` always takes the large
model's token. Unlike speculative decoding there is no bonus token: every
emitted token passed the rule, so either limit gives exactly one model's
output.

Response level (FrugalGPT-style): a finished answer is kept when its mean
token confidence reaches the threshold, else the next model answers afresh.
Confidence is ``mean_max_prob`` (mean over the output of the model's
largest next-token probability) or ``mean_logprob`` (mean log-probability
of the emitted tokens; a threshold <= 0 then).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llmopt.errors import LLMOptConfigError, check_choice
from llmopt.runtime.sampler import draw, probabilities

CONFIDENCES = ("mean_max_prob", "mean_logprob")
_GROUP = "cascade"


@dataclass(frozen=True)
class TokenRule:
    """The token-level rule's settings, validated."""

    threshold: float = 0.5
    top_k: int = 0
    num_draft_tokens: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", _real("threshold", self.threshold))
        _int("top_k", self.top_k, 0)
        _int("num_draft_tokens", self.num_draft_tokens, 1)


@dataclass(frozen=True)
class ResponseRule:
    """The response-level rule's settings: one threshold per model that may defer."""

    thresholds: tuple[float, ...]
    confidence: str = "mean_max_prob"

    def __post_init__(self) -> None:
        check_choice("confidence", self.confidence, CONFIDENCES, group=_GROUP)
        object.__setattr__(self, "thresholds", tuple(_real("threshold", t) for t in self.thresholds))

    @classmethod
    def of(cls, threshold: Any, num_models: int, confidence: str = "mean_max_prob") -> "ResponseRule":
        count = num_models - 1
        if isinstance(threshold, Sequence) and not isinstance(threshold, str):
            if len(threshold) != count:
                raise LLMOptConfigError(f"{_GROUP}: threshold lists one value per model but the last "
                                        f"({count}), got {len(threshold)}")
            return cls(tuple(threshold), confidence)
        return cls((threshold,) * count, confidence)


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LLMOptConfigError(f"{_GROUP}: {name} must be a finite number, got {value!r}")
    return float(value)


def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LLMOptConfigError(f"{_GROUP}: {name} must be an int >= {minimum}, got {value!r}")
    return value


def in_top_k(logits: torch.Tensor, token: int, top_k: int) -> bool:
    """True when fewer than ``top_k`` entries of ``logits`` (V,) are strictly above ``token``'s."""
    if top_k <= 0:
        return False
    if top_k >= logits.shape[-1]:
        return True
    return int((logits > logits[token]).sum()) < top_k


def judge_candidates(candidates: list[int], confidences: list[float], large_logits: torch.Tensor,
                     threshold: float, top_k: int, params, generator) -> tuple[list[int], int]:
    """(emitted tokens, how many of them are the small model's).

    ``large_logits``: (len(candidates), V), row j the large model's logits at
    candidate j's position. The emitted tokens are the kept prefix of the
    candidates, then, at the first candidate the rule defers, the large
    model's token there (its argmax, or a draw from its distribution after
    the request's temperature / top-k / top-p).
    """
    for j, (token, confidence) in enumerate(zip(candidates, confidences)):
        if confidence >= threshold or in_top_k(large_logits[j], token, top_k):
            continue
        if params.greedy:
            large = int(large_logits[j].argmax())
        else:
            large = draw(probabilities(large_logits[j:j + 1], [params])[0], generator)
        return candidates[:j] + [large], j
    return list(candidates), len(candidates)


def response_confidence(logprobs: list, kind: str) -> float:
    """The mean confidence of an answer from its per-token log-probabilities.

    ``logprobs``: the engine's entries (token id, logprob, [(id, logprob), ...]
    with the most likely token first). An empty answer counts as fully
    confident (there is nothing to doubt).
    """
    if not logprobs:
        return 1.0 if kind == "mean_max_prob" else 0.0
    if kind == "mean_max_prob":
        return sum(math.exp(top[0][1] if top else lp) for _, lp, top in logprobs) / len(logprobs)
    return sum(lp for _, lp, _ in logprobs) / len(logprobs)
