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
* Returns ``(out, lse)``: ``out`` like ``q``, ``lse`` the float32 (float64 for
  float64 inputs) log-sum-exp
  of each query row's scaled, masked scores, ``(B, Hq, Lq)``, which the
  backward reuses. A row that can see no key gets ``out = 0``.

The CPU implementation is PyTorch's fused CPU flash-attention kernel; GQA is
handled by folding the query heads of a group into the query-length axis, so
each key/value head is read once for its whole group. Decode-sized calls (at
most 8 query tokens and 64 query rows per key/value head, fp32 or bf16) run in a small C kernel
instead (``native/dense_attention.c``), which reads K/V and the mask in place
with their strides; the flash kernel's set-up cost dominates at those sizes.

The ``impl`` argument names the implementation (``"native"``: the above;
``"torch"``: PyTorch's CPU flash kernel only; ``"sdpa"``: PyTorch's
``scaled_dot_product_attention`` with ``enable_gqa``, and a plain-PyTorch
backward; ``"triton"``: the kernels of :mod:`llmopt.kernels.triton_flash`).
The fusion pass resolves it once per site (:mod:`llmopt.kernels.dispatch`);
``"auto"`` takes the device's default: ``"native"`` on CPU, ``"sdpa"`` on CUDA
until the Triton kernels have a GPU record. The backward runs the forward's.
"""

from __future__ import annotations

import ctypes
import math
import os
from typing import Optional

import torch
from torch import Tensor

from llmopt.kernels import attention_dropout, dispatch
from llmopt.kernels.attention_masks import dense_mask as _dense_mask
from llmopt.kernels.attention_masks import fold_mask as _fold_mask
from llmopt.kernels.attention_masks import four_dims as _four_dims

__all__ = ["attention", "attention_backward", "new_dropout_seed"]


# Triton's own switch (read once): lets tests run impl="triton" on CPU tensors, under the interpreter.
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _impl(impl: str, q: Tensor) -> str:
    """The implementation this call runs: the pass resolved it when the graph was
    compiled (``impl`` is then a name, returned as is); ``"auto"`` (a direct call)
    takes the device's default from :mod:`llmopt.kernels.dispatch`."""
    return dispatch.resolve("attention", impl, q.device.type, triton_interpret=_TRITON_INTERPRET)


def _attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor] = None,
    causal_offset: Optional[int] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    dropout_seed: Optional[Tensor] = None,
    impl: str = "auto",
) -> tuple[Tensor, Tensor]:
    impl = _impl(impl, q)
    if dropout_p > 0.0:
        out, lse = attention_dropout.forward(q, k, v, attn_mask, causal_offset, scale, dropout_p, _seed(dropout_seed))
    elif impl == "triton":
        from llmopt.kernels import triton_flash

        out, lse = triton_flash.flash_attention_forward(
            q, k, v, mask=attn_mask, causal_offset=causal_offset, scale=scale
        )
    elif impl == "sdpa":
        out, lse = _attention_forward_sdpa(q, k, v, attn_mask, causal_offset, scale)
    else:
        out, lse = _attention_forward_cpu(q, k, v, attn_mask, causal_offset, scale, native=impl == "native")
    return _contiguous(out, q.dtype), _contiguous(lse, _lse_dtype(q))


# Defined through torch.library directly rather than custom_op: a decode step of
# SmolLM2-135M makes 30 calls, and custom_op's Python dispatch costs more a call
# than this (docs/PERFORMANCE.md).
_LIB = torch.library.Library("llmopt", "FRAGMENT")
_LIB.define("attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, SymInt? causal_offset=None, "
            "float? scale=None, float dropout_p=0., Tensor? dropout_seed=None, str impl=\"auto\") -> (Tensor, Tensor)",
            tags=(torch.Tag.pt2_compliant_tag,))
_LIB.impl("attention", _attention, "CompositeExplicitAutograd")
attention = torch.ops.llmopt.attention.default


@torch.library.register_fake("llmopt::attention")
def _(q, k, v, attn_mask=None, causal_offset=None, scale=None, dropout_p=0.0, dropout_seed=None, impl="auto"):
    return _out_like(q), _lse_like(q)


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
    impl: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    impl = _impl(impl, q)  # the forward's implementation: the backward uses the same one
    if dropout_p > 0.0:
        grads = attention_dropout.backward(
            grad_out, q, k, v, out, lse, attn_mask, causal_offset, scale, dropout_p, _seed(dropout_seed)
        )
    elif impl == "triton":
        from llmopt.kernels import triton_flash

        grads = triton_flash.flash_attention_backward(
            grad_out, q, k, v, out, lse, mask=attn_mask, causal_offset=causal_offset, scale=scale
        )
    elif impl == "sdpa":
        grads = _attention_backward_sdpa(grad_out, q, k, v, out, lse, attn_mask, causal_offset, scale)
    else:
        grads = _attention_backward_cpu(grad_out, q, k, v, out, lse, attn_mask, causal_offset, scale)
    return tuple(_contiguous(g, x.dtype) for g, x in zip(grads, (q, k, v)))


@attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, attn_mask=None, causal_offset=None, scale=None, dropout_p=0.0,
      dropout_seed=None, impl="auto"):
    return _grad_like(q), _grad_like(k), _grad_like(v)


# Output layouts: contiguous. The fake kernels must promise the strides the
# real ones return, and Inductor lays the outputs of custom ops out
# contiguously whatever a fake kernel says (tried: (B, L, H, D)-ordered
# gradients, which PyTorch's CPU kernel produces, fail its stride asserts).
# So the real kernels' results are copied into contiguous tensors where needed.
def _out_like(q: Tensor) -> Tensor:
    return q.new_empty(q.shape)


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.promote_types(q.dtype, torch.float32)  # fp64 inputs keep fp64 statistics


def _lse_like(q: Tensor) -> Tensor:
    return q.new_empty(q.shape[:3], dtype=_lse_dtype(q))


def _grad_like(x: Tensor) -> Tensor:
    return x.new_empty(x.shape)


def _contiguous(result: Tensor, dtype: torch.dtype) -> Tensor:
    """``result`` in ``dtype`` with exactly the strides of a new tensor (Inductor checks
    them, size-1 dimensions included); a copy only if it has not."""
    strides, step = [], 1
    for size in reversed(result.shape):
        strides.append(step)
        step *= size
    if result.dtype == dtype and result.stride() == tuple(reversed(strides)):
        return result
    return torch.empty(result.shape, dtype=dtype, device=result.device).copy_(result)


def _seed(dropout_seed: Optional[Tensor]) -> Tensor:
    if dropout_seed is None:
        raise ValueError("llmopt::attention: dropout_p > 0 needs a dropout_seed tensor")
    return dropout_seed


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, causal_offset, scale, dropout_p, dropout_seed, impl = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, dropout_seed)
    ctx.causal_offset, ctx.scale, ctx.dropout_p, ctx.impl = causal_offset, scale, dropout_p, impl


def _backward(ctx, grad_out, grad_lse):
    # lse is an internal by-product consumed only by this backward; the
    # rewrite never exposes it to user code, so its gradient is always zero.
    q, k, v, out, lse, attn_mask, dropout_seed = ctx.saved_tensors
    dq, dk, dv = attention_backward(
        grad_out, q, k, v, out, lse, attn_mask, ctx.causal_offset, ctx.scale, ctx.dropout_p, dropout_seed,
        ctx.impl,
    )
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd("llmopt::attention", _backward, setup_context=_setup_context)


def new_dropout_seed(device=None) -> Tensor:
    """A fresh seed for one call of attention with dropout (drawn from torch's RNG,
    so ``torch.manual_seed`` makes runs repeatable)."""
    return torch.randint(0, 2**62, (), dtype=torch.int64, device=device)


# ----------------------------------------------------------------------------- CPU path


class _CpuLayout:
    """How (B, Hq, L, D) queries and (B, Hkv, L, D) keys are laid out for PyTorch's
    CPU flash kernel, which needs equal head counts, without repeating KV heads.

    * ``"length"``: the G = Hq/Hkv query heads of a group are folded into the
      query-length axis, ``(B, Hkv, G*Lq, D)``; masks are folded the same way.
    * ``"batch"``: the group goes into the batch axis, ``(G, B*Hkv, Lq, D)``,
      against keys broadcast with stride 0. Used for unmasked causal attention,
      so the kernel keeps its own causal mode (which skips hidden blocks).
    """

    def __init__(self, q, k, attn_mask, causal_offset, scale):
        batch, q_heads, q_len, head_dim = q.shape
        kv_heads, k_len = k.shape[1], k.shape[2]
        self.shape = (batch, q_heads, kv_heads, q_heads // kv_heads)
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
        if causal_offset is not None and causal_offset >= k_len - 1:
            causal_offset = None  # every key is visible to every query (e.g. decode)
        group = self.shape[3]
        self.mode = "batch" if group > 1 and attn_mask is None and causal_offset == 0 else "length"
        # The kernel's causal mode is top-left aligned and cannot see the length fold.
        self.is_causal = attn_mask is None and causal_offset == 0 and (group == 1 or self.mode == "batch")
        self.mask = None
        if not self.is_causal:
            self.mask = _dense_mask(attn_mask, causal_offset, q_len, k_len, q.dtype, q.device)
            # A mask shared by all heads and query rows (decode, padding) broadcasts
            # over the folded rows as it is.
            shared = self.mask is not None and self.mask.shape[1] == 1 and self.mask.shape[2] == 1
            if self.mask is not None and group > 1 and not shared:
                self.mask = _fold_mask(self.mask, batch, q_heads, kv_heads, group, q_len, k_len)

    def rows_in(self, x):
        """q, out or grad_out (B, Hq, L, D) -> kernel layout."""
        batch, q_heads, kv_heads, group = self.shape
        if self.mode == "length":
            return x.reshape(batch, kv_heads, group * x.shape[2], x.shape[3])
        x = x.unflatten(1, (kv_heads, group)).permute(2, 0, 1, 3, 4)
        return x.reshape(group, batch * kv_heads, *x.shape[3:])

    def rows_out(self, x, q_len):
        """Kernel layout -> (B, Hq, L[, D]) contiguous; also takes lse (no D)."""
        batch, q_heads, kv_heads, group = self.shape
        if self.mode == "length":
            return x.reshape(batch, q_heads, q_len, *x.shape[3:])
        x = x.reshape(group, batch, kv_heads, q_len, *x.shape[3:])
        return x.movedim(0, 2).reshape(batch, q_heads, q_len, *x.shape[4:])

    def lse_in(self, lse):
        batch, q_heads, kv_heads, group = self.shape
        if self.mode == "length":
            return lse.reshape(batch, kv_heads, -1)
        return lse.unflatten(1, (kv_heads, group)).permute(2, 0, 1, 3).reshape(group, batch * kv_heads, -1)

    def keys_in(self, k):
        batch, q_heads, kv_heads, group = self.shape
        if self.mode == "length":
            return k
        return k.reshape(1, batch * kv_heads, *k.shape[2:]).expand(group, -1, -1, -1)

    def key_grad_out(self, dk):
        batch, q_heads, kv_heads, group = self.shape
        if self.mode == "length":
            return dk
        return dk.sum(0).reshape(batch, kv_heads, *dk.shape[2:])


def _attention_forward_cpu(q, k, v, attn_mask, causal_offset, scale, native=True):
    native = _native_rows_attention(q, k, v, attn_mask, causal_offset, scale) if native else None
    if native is not None:
        return native
    layout = _CpuLayout(q, k, attn_mask, causal_offset, scale)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        layout.rows_in(q), layout.keys_in(k), layout.keys_in(v), 0.0, layout.is_causal,
        attn_mask=layout.mask, scale=layout.scale,
    )
    q_len = q.shape[2]
    return layout.rows_out(out, q_len), layout.rows_out(lse, q_len)


# Query rows per (batch, kv head) the native kernel takes (group * Lq), and its head-dim cap.
_NATIVE_MAX_ROWS, _NATIVE_MAX_HEAD_DIM = 64, 256
# Longer query chunks (prefill) stay on the flash kernel: there its set-up cost is
# amortised, and a prefill keeps the arithmetic of eager SDPA on CPU bit for bit.
_NATIVE_MAX_QUERY_LEN = 8
_NATIVE_FUNCTIONS = {torch.float32: "dense_attention_f32", torch.bfloat16: "dense_attention_bf16"}


# Calls the native kernel answered in this process, read through native_rows_calls()
# (tests check which path a call took); only this module writes it.
_NATIVE_ROWS_CALLS = [0]


def native_rows_calls() -> int:
    """How many ``llmopt::attention`` calls ``native/dense_attention.c`` computed so far."""
    return _NATIVE_ROWS_CALLS[0]


def _native_rows_attention(q, k, v, attn_mask, causal_offset, scale):
    """Decode-sized calls (at most 8 query tokens) in ``native/dense_attention.c``, or None.

    PyTorch's CPU flash kernel spends most of a call on set-up at these sizes (one
    query row against a few hundred cached keys), 30 calls per decoded token;
    the native kernel reads K/V in place with strides and the mask (bool or
    additive) as a strided broadcast, and skips key chunks the mask hides.
    Larger calls (prefill), fp16/fp64 and ``impl="torch"`` keep the flash kernel.
    """
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    if (q.dtype not in _NATIVE_FUNCTIONS or k.dtype != q.dtype or v.dtype != q.dtype
            or q_len > _NATIVE_MAX_QUERY_LEN or (q_heads // kv_heads) * q_len > _NATIVE_MAX_ROWS
            or head_dim > _NATIVE_MAX_HEAD_DIM
            or k_len == 0):
        return None
    fn = _native_attention_fn(q.dtype)
    if fn is None:
        return None
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    mask = attn_mask
    if causal_offset is not None or (mask is not None and mask.dtype not in (torch.bool, torch.float32)):
        mask = _dense_mask(attn_mask, causal_offset, q_len, k_len, torch.float32, q.device)
    if mask is not None:
        mask = _four_dims(mask).expand(batch, q_heads, q_len, k_len)
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
    out = q.new_empty((batch, q_heads, q_len, head_dim))
    lse = torch.empty((batch, q_heads, q_len), dtype=torch.float32)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    strides = (ctypes.c_int64 * 12)(*q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                                    *(mask.stride()[:3] if mask is not None else (0, 0, 0)))
    status = fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr() if mask is not None else None,
                mask is not None and mask.dtype == torch.bool, out.data_ptr(), lse.data_ptr(),
                batch, q_heads, kv_heads, q_len, k_len, head_dim, strides, scale)
    if status != 0:
        return None
    _NATIVE_ROWS_CALLS[0] += 1
    return out, lse


_NATIVE_ATTENTION: dict = {}  # dtype -> the C function (None: not built), filled on first use


def _native_attention_fn(dtype):
    if dtype not in _NATIVE_ATTENTION:
        from llmopt.kernels import native

        lib = native.load("dense_attention")
        fn = None if lib is None else getattr(lib, _NATIVE_FUNCTIONS[dtype])
        if fn is not None:
            pointer, int64 = ctypes.c_void_p, ctypes.c_int64
            fn.argtypes = [pointer, pointer, pointer, pointer, ctypes.c_int, pointer, pointer,
                           *([int64] * 6), ctypes.POINTER(int64), ctypes.c_float]
            fn.restype = ctypes.c_int
        _NATIVE_ATTENTION[dtype] = fn
    return _NATIVE_ATTENTION[dtype]


def _attention_backward_cpu(grad_out, q, k, v, out, lse, attn_mask, causal_offset, scale):
    layout = _CpuLayout(q, k, attn_mask, causal_offset, scale)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        layout.rows_in(grad_out),
        layout.rows_in(q),
        layout.keys_in(k),
        layout.keys_in(v),
        layout.rows_in(out),
        layout.lse_in(lse),
        0.0,
        layout.is_causal,
        attn_mask=layout.mask,
        scale=layout.scale,
    )
    return layout.rows_out(dq, q.shape[2]), layout.key_grad_out(dk), layout.key_grad_out(dv)


# ----------------------------------------------------------------------------- SDPA path (CUDA default)


def _grouped_scores(q, k, attn_mask, causal_offset, scale):
    """Scaled, masked scores ``(B, Hq, Lq, Lk)`` in the lse dtype, KV heads not repeated
    (each KV head's query heads are the rows of one matmul), and the scale used."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    dtype = _lse_dtype(q)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    rows = q.to(dtype).reshape(batch, kv_heads, (q_heads // kv_heads) * q_len, head_dim)
    scores = (rows @ k.to(dtype).transpose(-2, -1)).mul_(scale).view(batch, q_heads, q_len, k_len)
    mask = _dense_mask(attn_mask, causal_offset, q_len, k_len, dtype, q.device)
    return (scores if mask is None else scores + mask), scale


def _attention_forward_sdpa(q, k, v, attn_mask, causal_offset, scale):
    """``F.scaled_dot_product_attention(enable_gqa=True)`` for the output, in any
    dtype and device; the lse from the scores in fp32 (materialised: this is
    the safe path, with eager attention's memory, until a kernel has a GPU record)."""
    scores, used_scale = _grouped_scores(q, k, attn_mask, causal_offset, scale)
    lse = torch.logsumexp(scores, dim=-1)
    mask = _dense_mask(attn_mask, causal_offset, q.shape[2], k.shape[2], q.dtype, q.device)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=used_scale, enable_gqa=q.shape[1] != k.shape[1])
    dead = torch.isneginf(lse).unsqueeze(-1)  # rows that see no key: 0, not SDPA's NaN
    return torch.where(dead, torch.zeros((), dtype=out.dtype, device=out.device), out), lse


def _attention_backward_sdpa(grad_out, q, k, v, out, lse, attn_mask, causal_offset, scale):
    """The attention backward in plain PyTorch (runs wherever the SDPA path does)."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    scores, used_scale = _grouped_scores(q, k, attn_mask, causal_offset, scale)
    dtype = scores.dtype
    probs = torch.exp(scores - lse.to(dtype).unsqueeze(-1)).nan_to_num_(0.0)  # (B, Hq, Lq, Lk)
    g = grad_out.to(dtype)
    p_rows = probs.reshape(batch, kv_heads, group * q_len, k_len)
    g_rows = g.reshape(batch, kv_heads, group * q_len, head_dim)
    dv = p_rows.transpose(-2, -1) @ g_rows
    dp = (g_rows @ v.to(dtype).transpose(-2, -1)).view_as(probs)
    delta = (g * out.to(dtype)).sum(-1, keepdim=True)
    ds = (probs * (dp - delta)).mul_(used_scale).reshape(batch, kv_heads, group * q_len, k_len)
    dq = (ds @ k.to(dtype)).view(batch, q_heads, q_len, head_dim)
    dk = ds.transpose(-2, -1) @ q.to(dtype).reshape(batch, kv_heads, group * q_len, head_dim)
    return dq, dk, dv
