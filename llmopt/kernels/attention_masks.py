"""The attention ops' masks: the user mask and a causal offset as one additive
mask, and its fold into the GQA layout (each KV head's query heads as rows).

Shared by the fused op's CPU paths (:mod:`llmopt.kernels.attention`) and the
dropout path (:mod:`llmopt.kernels.attention_dropout`); a leaf module, so the
two import it and not each other. The tests' fp64 oracle (``tests/oracles.py``)
builds its masks itself.
"""

from __future__ import annotations

import torch

__all__ = ["dense_mask", "fold_mask", "four_dims"]


def dense_mask(attn_mask, causal_offset, q_len, k_len, dtype, device):
    """Combine the user mask and the causal offset into one 4-D additive mask, or None.

    Runs on every call (every layer of every decode step), so it stays at a
    couple of tensor ops.
    """
    if attn_mask is None and causal_offset is None:
        return None
    allowed, additive = None, None
    if attn_mask is not None:
        attn_mask = four_dims(attn_mask)
        if attn_mask.dtype == torch.bool:
            allowed = attn_mask
        else:
            additive = attn_mask.to(dtype)
    if causal_offset is not None:
        rows = torch.arange(q_len, device=device).unsqueeze(1)
        cols = torch.arange(k_len, device=device).unsqueeze(0)
        causal = (cols <= rows + causal_offset)[None, None]
        allowed = causal if allowed is None else allowed & causal
    if allowed is None:
        return additive
    if additive is None:
        additive = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, additive, torch.full((), float("-inf"), dtype=dtype, device=device))


def four_dims(mask):
    """A mask of fewer dimensions with leading 1s, as broadcasting would read it."""
    return mask if mask.dim() >= 4 else mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))


def fold_mask(mask, batch, q_heads, kv_heads, group, q_len, k_len):
    mask_batch = mask.shape[0]
    if mask.shape[1] == 1:
        mask = mask.expand(mask_batch, group, q_len, k_len).reshape(mask_batch, 1, group * q_len, k_len)
    else:
        mask = mask.expand(mask_batch, q_heads, q_len, k_len).reshape(
            mask_batch, kv_heads, group * q_len, k_len
        )
    return mask
