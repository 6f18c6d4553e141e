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

import torch

from llmopt.runtime.sampler import draw, probabilities

CONFIDENCES = ("mean_max_prob", "mean_logprob")


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
