"""Attention with dropout on the attention weights, for training.

PyTorch's fused CPU flash kernel has no dropout, so this path computes the
weights explicitly (per KV group, still without repeating KV heads). The
dropout mask comes from a counter-based generator seeded by a per-call seed
tensor, so the backward regenerates exactly the mask the forward used instead
of storing it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from llmopt.kernels.attention_masks import dense_mask, fold_mask


def dropout_keep_mask(seed: Tensor, shape, p: float, device) -> Tensor:
    """The keep-mask (True = kept) for one call: a pure function of ``seed``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed.item()))
    return torch.rand(shape, generator=generator, device=device) >= p


def _folded(q, k, attn_mask, causal_offset, scale):
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    mask = dense_mask(attn_mask, causal_offset, q_len, k_len, _acc(q), q.device)
    q_f = q.reshape(batch, kv_heads, group * q_len, head_dim)
    if mask is not None and group > 1:
        mask = fold_mask(mask, batch, q_heads, kv_heads, group, q_len, k_len)
    return q_f, mask, scale


def _acc(t: Tensor) -> torch.dtype:
    """Accumulation dtype: at least fp32 (fp64 stays fp64)."""
    return torch.promote_types(t.dtype, torch.float32)


def _weights(q_f, k, mask, scale):
    acc = _acc(q_f)
    scores = torch.matmul(q_f.to(acc), k.to(acc).transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores + mask
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)  # rows with no key: 0
    return probs, lse


def forward(q, k, v, attn_mask, causal_offset, scale, dropout_p, seed):
    q_f, mask, scale = _folded(q, k, attn_mask, causal_offset, scale)
    probs, lse = _weights(q_f, k, mask, scale)
    keep = dropout_keep_mask(seed, probs.shape, dropout_p, q.device)
    dropped = probs * keep / (1.0 - dropout_p)
    out = torch.matmul(dropped, v.to(dropped.dtype)).to(q.dtype).reshape(q.shape).contiguous()
    return out, lse.reshape(q.shape[:3]).contiguous()


def backward(grad_out, q, k, v, out, lse, attn_mask, causal_offset, scale, dropout_p, seed):
    q_f, mask, scale = _folded(q, k, attn_mask, causal_offset, scale)
    probs, _ = _weights(q_f, k, mask, scale)
    keep = dropout_keep_mask(seed, probs.shape, dropout_p, q.device)
    acc = probs.dtype
    zoom = keep.to(acc) / (1.0 - dropout_p)
    d_out = grad_out.to(acc).reshape(q_f.shape)
    dv = torch.matmul((probs * zoom).transpose(-2, -1), d_out)
    d_probs = torch.matmul(d_out, v.to(acc).transpose(-2, -1)) * zoom
    # rowsum(P * dP) == rowsum(dO * O): the usual softmax-backward identity,
    # which holds with the dropout mask folded into dP.
    delta = (d_out * out.to(acc).reshape(q_f.shape)).sum(-1, keepdim=True)
    d_scores = probs * (d_probs - delta) * scale
    dq = torch.matmul(d_scores, k.to(acc)).reshape(q.shape)
    dk = torch.matmul(d_scores.transpose(-2, -1), q_f.to(acc))
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()
