"""Verify a sequence's drafts against the target: the lossless acceptance rule.

Greedy requests keep drafts while they equal the target's argmax, then add
the target's argmax at the first mismatch (or after the last draft): the
tokens are exactly those of greedy decoding without speculation.

Sampled requests use speculative sampling (Leviathan et al. 2023, Chen et
al. 2023). Draft token x, drawn from the drafter's distribution q, is kept
with probability min(1, p(x) / q(x)), p being the target's distribution
after the request's temperature / top-k / top-p. At the first rejection the
token is drawn from max(0, p - q) normalised, and nothing after it is kept;
when every draft is kept a bonus token is drawn from the target's next
distribution. Each emitted token is then distributed exactly as p. A
deterministic drafter (n-gram lookup) has q = one-hot(x): keep x with
probability p(x), else draw from p with x removed.

Every draw of a request comes from its own generator (``SamplingParams.seed``),
so a seeded request's tokens do not depend on the rest of the batch.
"""

from __future__ import annotations

import torch

from llmopt.runtime.sampler import draw


def verify_greedy(target_argmax: list[int], drafts: list[int]) -> list[int]:
    """``target_argmax``: the target's argmax at the 1 + len(drafts) rows."""
    out = []
    for draft, best in zip(drafts, target_argmax):
        if draft != best:
            out.append(best)
            return out
        out.append(draft)
    out.append(target_argmax[len(drafts)])
    return out


def verify_sampled(p: torch.Tensor, drafts: list[int], q: torch.Tensor | None,
                   generator: torch.Generator | None) -> list[int]:
    """Emitted tokens (the kept drafts, then one token from the target).

    ``p``: (1 + k, V) the target's normalised distributions at the rows that
    predict each draft and the bonus; ``q``: (k, V) the drafter's
    distributions each draft was drawn from, or None for a deterministic
    drafter (one-hot at the draft).
    """
    out = []
    uniforms = torch.rand(len(drafts), generator=generator, device=p.device) if drafts else None
    for j, x in enumerate(drafts):
        p_x = float(p[j, x])
        q_x = 1.0 if q is None else float(q[j, x])
        if q_x > 0 and float(uniforms[j]) * q_x < p_x:
            out.append(x)
            continue
        if q is None:
            residual = p[j].clone()
            residual[x] = 0.0
        else:
            residual = (p[j] - q[j]).clamp_(min=0.0)
        total = float(residual.sum())
        # p == q (or all of p on x, then the rejection cannot happen): p is the answer.
        out.append(draw(residual / total if total > 0 else p[j], generator))
        return out
    out.append(draw(p[len(drafts)], generator))
    return out
