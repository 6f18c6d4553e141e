"""``llmopt::attention``: fused attention with native GQA/MQA, as a custom op.

Semantics (the contract every implementation keeps):

* ``q`` is ``(B, Hq, Lq, D)``; ``k`` and ``v`` are ``(B, Hkv, Lk, D)`` with
  ``Hq % Hkv == 0``. Query head ``h`` reads key/value head ``h // (Hq // Hkv)``;
  the repeated heads are never materialised.
* ``attn_mask`` is None or broadcastable to ``(B, Hq, Lq, Lk)``: bool (True
  means attend) or floating (added to the scaled scores).
* ``causal_offset`` is None (no causal mask) or ``c``: query ``i`` may attend
  key ``j`` iff ``j <= i + c``. SDPA's ``is_causal=True`` is ``c = 0``; decode
  and chunked prefill against a cache use ``c = Lk - Lq``.
* ``scale`` None means ``1 / sqrt(D)``.
* ``dropout_p`` > 0 drops attention weights (training); ``dropout_seed``, a
  0-dim int64 tensor drawn per call, fixes the mask so the backward sees the
  same one.
* Returns ``(out, lse)``: ``out`` like ``q``, ``lse`` the float32 log-sum-exp
  of each query row's scaled, masked scores, ``(B, Hq, Lq)``, which the
  backward reuses. A row that can see no key gets ``out = 0``.

The CPU implementation is PyTorch's fused CPU flash-attention kernel; GQA is
handled by folding the query heads of a group into the query-length axis, so
each key/value head is read once for its whole group. On CUDA the Triton
kernels of :mod:`llmopt.kernels.triton_flash` run.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch import Tensor

from llmopt.kernels import attention_dropout

__all__ = ["attention", "attention_backward", "attention_reference", "new_dropout_seed"]


def _use_triton(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    # Lets tests drive the Triton kernels through the op on CPU, under the interpreter.
    return os.environ.get("LLMOPT_ATTENTION_IMPL") == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


@torch.library.custom_op("llmopt::attention", mutates_args=())
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor] = None,
    causal_offset: Optional[int] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    dropout_seed: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    if dropout_p > 0.0:
        return attention_dropout.forward(q, k, v, attn_mask, causal_offset, scale, dropout_p, _seed(dropout_seed))
    if _use_triton(q.device):
        from llmopt.kernels import triton_flash

        out, lse = triton_flash.flash_attention_forward(
            q, k, v, mask=attn_mask, causal_offset=causal_offset, scale=scale
        )
        return out, lse
    return _attention_forward_cpu(q, k, v, attn_mask, causal_offset, scale)


@attention.register_fake
def _(q, k, v, attn_mask=None, causal_offset=None, scale=None, dropout_p=0.0, dropout_seed=None):
    batch, heads, q_len, _ = q.shape
    out = q.new_empty(q.shape)
    lse = q.new_empty((batch, heads, q_len), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("llmopt::attention_backward", mutates_args=())
def attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    attn_mask: Optional[Tensor] = None,
    causal_offset: Optional[int] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    dropout_seed: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    if dropout_p > 0.0:
        return attention_dropout.backward(
            grad_out, q, k, v, out, lse, attn_mask, causal_offset, scale, dropout_p, _seed(dropout_seed)
        )
    if _use_triton(q.device):
        from llmopt.kernels import triton_flash

        dq, dk, dv = triton_flash.flash_attention_backward(
            grad_out, q, k, v, out, lse, mask=attn_mask, causal_offset=causal_offset, scale=scale
        )
        return dq, dk, dv
    return _attention_backward_cpu(grad_out, q, k, v, out, lse, attn_mask, causal_offset, scale)


@attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, attn_mask=None, causal_offset=None, scale=None, dropout_p=0.0,
      dropout_seed=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _seed(dropout_seed: Optional[Tensor]) -> Tensor:
    if dropout_seed is None:
        raise ValueError("llmopt::attention: dropout_p > 0 needs a dropout_seed tensor")
    return dropout_seed


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, causal_offset, scale, dropout_p, dropout_seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, dropout_seed)
    ctx.causal_offset, ctx.scale, ctx.dropout_p = causal_offset, scale, dropout_p


def _backward(ctx, grad_out, grad_lse):
    # lse is an internal by-product consumed only by this backward; the
    # rewrite never exposes it to user code, so its gradient is always zero.
    q, k, v, out, lse, attn_mask, dropout_seed = ctx.saved_tensors
    dq, dk, dv = attention_backward(
        grad_out, q, k, v, out, lse, attn_mask, ctx.causal_offset, ctx.scale, ctx.dropout_p, dropout_seed
    )
    return dq, dk, dv, None, None, None, None, None


attention.register_autograd(_backward, setup_context=_setup_context)


def new_dropout_seed(device=None) -> Tensor:
    """A fresh seed for one call of attention with dropout (drawn from torch's RNG,
    so ``torch.manual_seed`` makes runs repeatable)."""
    return torch.randint(0, 2**62, (), dtype=torch.int64, device=device)


# ----------------------------------------------------------------------------- CPU path


def _fold_groups(q, k, attn_mask, causal_offset, scale):
    """Fold the query heads of each KV group into the length axis.

    Returns ``(q_folded, mask_folded, is_causal, scale)`` for PyTorch's CPU
    flash kernel, which needs equal head counts: ``q`` becomes
    ``(B, Hkv, G*Lq, D)`` so query rows of one group share their KV head.
    """
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)

    # The kernel's own causal mode is top-left aligned and cannot see the
    # fold, so it is only used for the plain case.
    if attn_mask is None and group == 1 and causal_offset == 0:
        return q, None, True, scale

    mask = _dense_mask(attn_mask, causal_offset, q_len, k_len, q.dtype, q.device)
    if group > 1:
        q = q.reshape(batch, kv_heads, group * q_len, head_dim)
        if mask is not None:
            mask = _fold_mask(mask, batch, q_heads, kv_heads, group, q_len, k_len)
    return q, mask, False, scale


def _dense_mask(attn_mask, causal_offset, q_len, k_len, dtype, device):
    """Combine the user mask and the causal offset into one 4-D additive mask, or None."""
    if attn_mask is None and causal_offset is None:
        return None
    allowed = None
    if causal_offset is not None:
        rows = torch.arange(q_len, device=device).unsqueeze(1)
        cols = torch.arange(k_len, device=device).unsqueeze(0)
        allowed = (cols <= rows + causal_offset)[None, None]
    additive = torch.zeros((1, 1, 1, 1), dtype=dtype, device=device)
    if attn_mask is not None:
        attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        if attn_mask.dtype == torch.bool:
            allowed = attn_mask if allowed is None else allowed & attn_mask
        else:
            additive = attn_mask.to(dtype)
    if allowed is not None:
        additive = torch.where(allowed, additive, torch.tensor(float("-inf"), dtype=dtype, device=device))
    return additive


def _fold_mask(mask, batch, q_heads, kv_heads, group, q_len, k_len):
    mask_batch = mask.shape[0]
    if mask.shape[1] == 1:
        mask = mask.expand(mask_batch, group, q_len, k_len).reshape(mask_batch, 1, group * q_len, k_len)
    else:
        mask = mask.expand(mask_batch, q_heads, q_len, k_len).reshape(
            mask_batch, kv_heads, group * q_len, k_len
        )
    return mask


def _attention_forward_cpu(q, k, v, attn_mask, causal_offset, scale):
    batch, q_heads, q_len, head_dim = q.shape
    q_f, mask, is_causal, scale = _fold_groups(q, k, attn_mask, causal_offset, scale)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q_f, k, v, 0.0, is_causal, attn_mask=mask, scale=scale
    )
    out = out.reshape(batch, q_heads, q_len, head_dim).contiguous()
    lse = lse.reshape(batch, q_heads, q_len).contiguous()
    return out, lse


def _attention_backward_cpu(grad_out, q, k, v, out, lse, attn_mask, causal_offset, scale):
    batch, q_heads, q_len, head_dim = q.shape
    q_f, mask, is_causal, scale = _fold_groups(q, k, attn_mask, causal_offset, scale)
    folded = q_f.shape
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out.reshape(folded),
        q_f,
        k,
        v,
        out.reshape(folded),
        lse.reshape(folded[:3]),
        0.0,
        is_causal,
        attn_mask=mask,
        scale=scale,
    )
    # Fake kernels promise contiguous results; the CPU kernel follows the inputs' layout.
    return dq.reshape(q.shape).contiguous(), dk.contiguous(), dv.contiguous()


# ----------------------------------------------------------------------------- reference


def attention_reference(q, k, v, attn_mask=None, causal_offset=None, scale=None, dropout_p=0.0,
                        dropout_seed=None):
    """Plain PyTorch attention with the same contract, for tests (materialises heads).

    With dropout, the keep-mask is the one the op draws for ``dropout_seed``
    (drawn in the op's folded layout, which reshapes to (B, Hq, Lq, Lk)).
    """
    batch, q_heads, q_len, _ = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    mask = _dense_mask(attn_mask, causal_offset, q_len, k_len, scores.dtype, q.device)
    if mask is not None:
        scores = scores + mask
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)
    if dropout_p > 0:
        folded = (batch, kv_heads, group * q_len, k_len)
        keep = attention_dropout.dropout_keep_mask(dropout_seed, folded, dropout_p, q.device)
        probs = probs * keep.reshape(probs.shape) / (1.0 - dropout_p)
    return probs @ v, lse
