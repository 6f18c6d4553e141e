"""Test oracles: plain, slow, obviously-right implementations the kernels are checked against.

They live in the tests, not in llmopt, and share no code with the kernels
they check (no mask builder, no layout helper): a bug in a kernel's mask code
cannot hide by being in its reference too. The paged-attention oracle is
``reference`` in ``tests/kernels/test_paged_attention.py`` (a loop over
sequences and block tables); the Triton flash kernels have
``reference_attention`` in ``tests/kernels/test_triton_flash.py``.
"""

from __future__ import annotations

import math

import torch


def dropout_keep_mask(seed, shape, p, device):
    """The op's contract for dropout: keep = uniform(seed) >= p, drawn in the op's
    folded layout (B, Hkv, group * Lq, Lk). Written here from the contract, not
    imported from the kernel."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed.item()))
    return torch.rand(shape, generator=generator, device=device) >= p


def attention_reference(q, k, v, attn_mask=None, causal_offset=None, scale=None, dropout_p=0.0,
                        dropout_seed=None):
    """``llmopt::attention``'s contract in plain PyTorch (KV heads materialised): (out, lse).

    ``attn_mask``: bool (True = may attend) or additive, broadcastable to
    (B, Hq, Lq, Lk); ``causal_offset`` c: query i sees key j iff j <= i + c.
    A query with no visible key gets output 0 and lse -inf. Computed in the
    inputs' dtype (pass fp64 tensors for an fp64 reference).
    """
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    visible = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device)
    if causal_offset is not None:
        rows = torch.arange(q_len, device=q.device)[:, None]
        cols = torch.arange(k_len, device=q.device)[None, :]
        visible = cols <= rows + causal_offset
    visible = visible.expand(batch, q_heads, q_len, k_len)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = visible & attn_mask.to(q.device)
        else:
            scores = scores + attn_mask.to(device=q.device, dtype=scores.dtype)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    seen = (scores > float("-inf")).any(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~seen, 0.0), dim=-1) * seen
    if dropout_p > 0:
        keep = dropout_keep_mask(dropout_seed, (batch, kv_heads, group * q_len, k_len), dropout_p, q.device)
        probs = probs * keep.reshape(probs.shape) / (1.0 - dropout_p)
    return probs @ v, lse
