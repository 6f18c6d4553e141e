"""FlashAttention-2 style Triton kernels (forward + backward), GQA/MQA-native.

Layouts
-------
Dense:  ``q`` is ``(B, Hq, Lq, D)``; ``k`` and ``v`` are ``(B, Hkv, Lk, D)`` with
``Hq % Hkv == 0``. Query head ``h`` reads key/value head ``h // (Hq // Hkv)``; the
kernels index the shared KV head directly, repeated heads are never materialised.
Any strides are accepted (including 0); outputs are contiguous.

Varlen (packed sequences): ``q`` is ``(Tq, Hq, D)``, ``k``/``v`` are ``(Tk, Hkv, D)``,
``cu_seqlens_q``/``cu_seqlens_k`` are ``(N + 1,)`` integer prefix sums. The varlen
log-sum-exp is returned **head-major, ``(Hq, Tq)``** (the layout of flash-attn's
varlen API), contiguous.

Semantics
---------
* ``scale`` None means ``1 / sqrt(D)``.
* ``causal_offset`` None: no causal mask. An int ``c``: query ``i`` may attend key
  ``j`` iff ``j <= i + c`` (SDPA ``is_causal=True`` is ``c = 0``, "top-left";
  decode / chunked prefill against a cache is ``c = Lk - Lq``, "bottom-right").
  The strings ``"top_left"`` (= 0) and ``"bottom_right"`` (= ``Lk - Lq``, per
  sequence for varlen) are accepted too. Key blocks that are fully hidden by the
  causal mask are skipped.
* ``mask`` (dense only): None or a tensor broadcastable to ``(B, Hq, Lq, Lk)``
  (right-aligned like PyTorch broadcasting; size-1 dims are read with stride 0,
  never expanded in memory). A bool mask keeps positions that are True; a floating
  mask is added to the scaled scores (``-inf`` allowed). Mask and causal combine.
  No gradient is produced for a floating mask.
* A query row that sees no key at all gets ``out = 0`` and ``lse = -inf`` (never
  NaN) and contributes zero gradients. (Float mask values below about ``-2.3e38``
  overflow to ``-inf`` inside the kernel, which works in the log2 domain; a row
  masked only with ``torch.finfo(torch.float32).min`` is therefore treated as fully
  masked rather than as a uniform average.)
* fp16 / bf16 / fp32 inputs, fp32 accumulation and softmax statistics, outputs
  in the input dtype. For fp32 inputs the matmuls use IEEE fp32 unless
  ``torch.get_float32_matmul_precision()`` is not ``"highest"`` (then TF32).

Kernels
-------
* ``_fwd_kernel``: one program per (query block, q-head, batch/sequence); online
  softmax over key blocks in the log2 domain (``exp2`` with the scale folded with
  ``log2(e)``). Blocks that need no causal / boundary masking run in a separate
  loop without the per-element masking.
* ``_bwd_preprocess``: ``delta = rowsum(dO * O)``.
* ``_bwd_dkdv_kernel``: one program per (key block, kv-head, batch/sequence); loops
  over every query head of the GQA group and over the query blocks (starting at the
  first block that can see the key block under the causal mask), accumulating dK/dV
  in registers (no atomics, no repeated heads).
* ``_bwd_dq_kernel``: one program per (query block, q-head, batch/sequence); loops
  over key blocks like the forward. Deterministic (no atomics anywhere).

Block sizes are autotuned on GPU (keyed on head dim, power-of-two length buckets,
causal / mask kind / varlen / fp32 precision and dtypes; the first call of each new
key compiles and times a handful of configurations, so warm up before CUDA-graph
capture). Under ``TRITON_INTERPRET=1`` a single small configuration is used (see
``INTERPRET_BLOCKS``) so CPU tests stay fast. The interpreter has no bf16 ``tl.dot``;
test fp32 / fp16 there.

Limitations: K and V must share the head dim D (16..256); no dropout, no ALiBi /
softcap, no gradient for a floating mask; varlen takes no mask tensor; masks are not
used for block skipping (only the causal offset is). Decode (Lq = 1) runs one
program per (query head, batch) with no split-K over the keys.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Optional, Union

import torch
import triton
import triton.language as tl

__all__ = [
    "flash_attention_forward",
    "flash_attention_backward",
    "flash_attention_varlen_forward",
    "flash_attention_varlen_backward",
]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MIN_HEAD_DIM = 16
_MAX_HEAD_DIM = 256
# Causal offsets are clamped to this magnitude so that ``row + offset`` never
# overflows int32 inside the kernels; beyond it the mask is all-visible / all-hidden
# for any realistic sequence length.
_OFFSET_CLAMP = 1 << 30

# (BLOCK_M, BLOCK_N) used under the Triton interpreter. BLOCK_M != BLOCK_N on purpose
# so the tests exercise non-square tiles. Tests may monkeypatch this dict.
INTERPRET_BLOCKS = {
    "fwd": (32, 16),
    "bwd_dkdv": (16, 32),  # BLOCK_M = query block (inner loop), BLOCK_N = key block
    "bwd_dq": (32, 16),
    "bwd_pre": (32, 0),
}


# =============================================================================
# Triton helpers
# =============================================================================


@triton.jit
def _load_rows(ptrs, rows, row_limit, offs_d, HEAD_DIM: tl.constexpr, CHECK_ROWS: tl.constexpr,
               EVEN_D: tl.constexpr):
    """Load a [ROWS, BLOCK_D] tile, zero-filling rows >= row_limit and columns >= HEAD_DIM."""
    if CHECK_ROWS:
        if EVEN_D:
            t = tl.load(ptrs, mask=rows[:, None] < row_limit, other=0.0)
        else:
            t = tl.load(ptrs, mask=(rows[:, None] < row_limit) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if EVEN_D:
            t = tl.load(ptrs)
        else:
            t = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return t


@triton.jit
def _store_rows(ptrs, val, rows, row_limit, offs_d, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr):
    if EVEN_D:
        tl.store(ptrs, val, mask=rows[:, None] < row_limit)
    else:
        tl.store(ptrs, val, mask=(rows[:, None] < row_limit) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _apply_user_mask(s, mask_ptrs, load_mask, MASK_KIND: tl.constexpr):
    """Apply the user mask to log2-domain scores ``s`` (MASK_KIND 1 = bool, 2 = additive)."""
    if MASK_KIND == 1:
        mv = tl.load(mask_ptrs, mask=load_mask, other=0)
        s = tl.where(mv != 0, s, float("-inf"))
    elif MASK_KIND == 2:
        mv = tl.load(mask_ptrs, mask=load_mask, other=0.0)
        s = s + mv.to(tl.float32) * 1.4426950408889634
    return s


# =============================================================================
# Forward
# =============================================================================


@triton.jit
def _sequence_bounds(CuQ, CuK, off_b, Lq, Lk, IS_VARLEN: tl.constexpr):
    """(q_start, k_start, seqlen_q, seqlen_k) of batch entry / packed sequence ``off_b``."""
    if IS_VARLEN:
        q_start = tl.load(CuQ + off_b)
        seqlen_q = tl.load(CuQ + off_b + 1) - q_start
        k_start = tl.load(CuK + off_b)
        seqlen_k = tl.load(CuK + off_b + 1) - k_start
    else:
        q_start = 0
        k_start = 0
        seqlen_q = Lq
        seqlen_k = Lk
    return q_start, k_start, seqlen_q, seqlen_k


@triton.jit
def _query_block(pid_m, seqlen_q, seqlen_k, causal_offset, IS_CAUSAL: tl.constexpr, CAUSAL_BR: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    """(number of query blocks, first row of this program's block, causal offset for the
    sequence). Causal grids take the heaviest (last) query blocks first: better tail balance."""
    num_m = (seqlen_q + BLOCK_M - 1) // BLOCK_M
    if IS_CAUSAL:
        start_m = (num_m - 1 - pid_m) * BLOCK_M
    else:
        start_m = pid_m * BLOCK_M
    c = causal_offset
    if CAUSAL_BR:
        c = c + seqlen_k - seqlen_q
    return num_m, start_m, c


@triton.jit
def online_softmax_step(acc, m_i, l_i, s, v, DOT_PREC: tl.constexpr):
    """Fold one key block into a running softmax-weighted sum.

    ``s`` are the block's scores in the log2 domain (scale already folded with
    log2(e), masked entries -inf); ``(acc, m_i, l_i)`` are the running output,
    row maximum and row sum. Shared by the dense and the paged kernels.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with no visible key so far has m_new = -inf: use 0 as the reference so
    # that exp2(-inf - ref) = 0 instead of NaN.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_ref)
    p = tl.math.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, mask_rows, rows_m, lo, hi,
               skn, svn, smn, seqlen_q, seqlen_k, qk_scale, c,
               HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, MASK_KIND: tl.constexpr,
               IS_CAUSAL: tl.constexpr, BOUNDARY: tl.constexpr, DOT_PREC: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Online-softmax sweep over key blocks [lo, hi).

    BOUNDARY=False is only used for blocks that lie entirely inside [0, seqlen_k) and
    entirely below the causal diagonal, so no per-element causal/bounds masking is needed.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows_m < seqlen_q
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(k_ptrs, cols, seqlen_k, offs_d, HEAD_DIM, BOUNDARY, EVEN_D)
        v = _load_rows(v_ptrs, cols, seqlen_k, offs_d, HEAD_DIM, BOUNDARY, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if MASK_KIND != 0:
            # built per iteration from two vectors: a loop-carried [BLOCK_M, BLOCK_N] pointer
            # tensor would cost 2 registers per element and spill.
            mask_ptrs = mask_rows[:, None] + (cols.to(tl.int64) * smn)[None, :]
            if BOUNDARY:
                s = _apply_user_mask(s, mask_ptrs, row_ok[:, None] & (cols[None, :] < seqlen_k), MASK_KIND)
            else:
                s = _apply_user_mask(s, mask_ptrs, row_ok[:, None], MASK_KIND)
        if BOUNDARY:
            keep = cols[None, :] < seqlen_k
            if IS_CAUSAL:
                keep = keep & (cols[None, :] <= rows_m[:, None] + c)
            s = tl.where(keep, s, float("-inf"))
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, s, v, DOT_PREC)
        k_ptrs += BLOCK_N * skn
        v_ptrs += BLOCK_N * svn
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["Lq", "Lk", "GROUP", "causal_offset"])
def _fwd_kernel(Q, K, V, Out, Lse, Mask, CuQ, CuK,
                sqb, sqh, sqm, sqd,
                skb, skh, skn, skd,
                svb, svh, svn, svd,
                sob, soh, som, sod,
                slb, slh, slm,
                smb, smh, smm, smn,
                Lq, Lk, GROUP, qk_scale, causal_offset,
                LQ_KEY, LK_KEY,  # autotune keys only (power-of-two length buckets)
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                IS_CAUSAL: tl.constexpr, CAUSAL_BR: tl.constexpr, MASK_KIND: tl.constexpr,
                IS_VARLEN: tl.constexpr, DOT_PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    off_hk = off_h // GROUP
    q_start, k_start, seqlen_q, seqlen_k = _sequence_bounds(CuQ, CuK, off_b, Lq, Lk, IS_VARLEN)
    num_m, start_m, c = _query_block(pid_m, seqlen_q, seqlen_k, causal_offset, IS_CAUSAL, CAUSAL_BR, BLOCK_M)
    if pid_m >= num_m:
        return

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows_m = start_m + offs_m
    b64 = off_b.to(tl.int64)
    h64 = off_h.to(tl.int64)
    hk64 = off_hk.to(tl.int64)
    qrow64 = (q_start + start_m).to(tl.int64)

    q_ptrs = Q + b64 * sqb + h64 * sqh + qrow64 * sqm + offs_m[:, None] * sqm + offs_d[None, :] * sqd
    q = _load_rows(q_ptrs, rows_m, seqlen_q, offs_d, HEAD_DIM, True, EVEN_D)

    k_ptrs = K + b64 * skb + hk64 * skh + offs_n[:, None] * skn + offs_d[None, :] * skd
    v_ptrs = V + b64 * svb + hk64 * svh + offs_n[:, None] * svn + offs_d[None, :] * svd
    if IS_VARLEN:
        k_ptrs += k_start.to(tl.int64) * skn
        v_ptrs += k_start.to(tl.int64) * svn
    mask_rows = Mask + b64 * smb + h64 * smh + rows_m.to(tl.int64) * smm

    if IS_CAUSAL:
        # last visible key of the last real row is min(start_m+BLOCK_M, seqlen_q) - 1 + c
        hi = tl.minimum(seqlen_k, tl.minimum(start_m + BLOCK_M, seqlen_q) + c)
        hi = tl.maximum(hi, 0)
        # key blocks ending at or before start_m + c + 1 are visible to every row
        full = tl.maximum(start_m + c + 1, 0) // BLOCK_N * BLOCK_N
        mid = tl.minimum(full, seqlen_k // BLOCK_N * BLOCK_N)
    else:
        hi = seqlen_k
        mid = seqlen_k // BLOCK_N * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Phase 1: interior blocks, no per-element causal / bounds masking.
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_ptrs, v_ptrs, mask_rows, rows_m, 0, mid,
                               skn, svn, smn, seqlen_q, seqlen_k, qk_scale, c,
                               HEAD_DIM, EVEN_D, MASK_KIND, IS_CAUSAL, False, DOT_PREC,
                               BLOCK_N, BLOCK_D)
    # Phase 2: diagonal and ragged-edge blocks, fully masked.
    mid64 = mid.to(tl.int64)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_ptrs + mid64 * skn, v_ptrs + mid64 * svn,
                               mask_rows, rows_m, mid, hi,
                               skn, svn, smn, seqlen_q, seqlen_k, qk_scale, c,
                               HEAD_DIM, EVEN_D, MASK_KIND, IS_CAUSAL, True, DOT_PREC,
                               BLOCK_N, BLOCK_D)

    row_has_keys = l_i > 0.0
    l_safe = tl.where(row_has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(row_has_keys, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))

    o_ptrs = Out + b64 * sob + h64 * soh + qrow64 * som + offs_m[:, None] * som + offs_d[None, :] * sod
    _store_rows(o_ptrs, out.to(Out.dtype.element_ty), rows_m, seqlen_q, offs_d, HEAD_DIM, EVEN_D)
    lse_ptrs = Lse + b64 * slb + h64 * slh + qrow64 * slm + offs_m * slm
    tl.store(lse_ptrs, lse, mask=rows_m < seqlen_q)


# =============================================================================
# Backward
# =============================================================================


@triton.jit(do_not_specialize=["L"])
def _bwd_preprocess(O, DO, Delta,
                    sob, soh, som, sod,
                    sdob, sdoh, sdom, sdod,
                    sdb, sdh, sdm,
                    L,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                    BLOCK_M: tl.constexpr):
    """delta[b, h, m] = sum_d dO[b, h, m, d] * O[b, h, m, d] (fp32)."""
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    start64 = (pid_m * BLOCK_M).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = pid_m * BLOCK_M + offs_m
    o = _load_rows(O + off_b * sob + off_h * soh + start64 * som + offs_m[:, None] * som + offs_d[None, :] * sod,
                   rows, L, offs_d, HEAD_DIM, True, EVEN_D)
    do = _load_rows(DO + off_b * sdob + off_h * sdoh + start64 * sdom + offs_m[:, None] * sdom
                    + offs_d[None, :] * sdod, rows, L, offs_d, HEAD_DIM, True, EVEN_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + off_b * sdb + off_h * sdh + start64 * sdm + offs_m * sdm, delta, mask=rows < L)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, mask_cols, cols, lo, hi,
                sqm, sdom, slm, sdlm, smm, seqlen_q, seqlen_k, qk_scale, c,
                HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, MASK_KIND: tl.constexpr,
                CAUSAL_MASK: tl.constexpr, DOT_PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Accumulate dK/dV of one key block over query blocks [lo, hi) of one query head.

    Works in the transposed score layout sT = K Q^T ([BLOCK_N, BLOCK_M]). Out-of-range
    query rows get lse = +inf so their probabilities are exactly 0; out-of-range key rows
    only produce values in dK/dV rows that are never stored.
    """
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < seqlen_q
        q = _load_rows(q_ptrs, rows, seqlen_q, offs_d, HEAD_DIM, True, EVEN_D)
        do = _load_rows(do_ptrs, rows, seqlen_q, offs_d, HEAD_DIM, True, EVEN_D)
        lse = tl.load(lse_ptrs, mask=row_ok, other=float("inf"))
        # fully-masked rows (lse = -inf) -> +inf so that p = exp2(s - lse) = 0, not NaN
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = tl.load(delta_ptrs, mask=row_ok, other=0.0)
        sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
        if MASK_KIND != 0:
            mask_ptrs = mask_cols[:, None] + (rows.to(tl.int64) * smm)[None, :]
            sT = _apply_user_mask(sT, mask_ptrs, (cols[:, None] < seqlen_k) & row_ok[None, :], MASK_KIND)
        if CAUSAL_MASK:
            sT = tl.where(cols[:, None] <= rows[None, :] + c, sT, float("-inf"))
        pT = tl.math.exp2(sT - lse2[None, :])
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PREC)
        q_ptrs += BLOCK_M * sqm
        do_ptrs += BLOCK_M * sdom
        lse_ptrs += BLOCK_M * slm
        delta_ptrs += BLOCK_M * sdlm
    return dk, dv


@triton.jit(do_not_specialize=["Lq", "Lk", "GROUP", "causal_offset"])
def _bwd_dkdv_kernel(Q, K, V, DO, Lse, Delta, DK, DV, Mask, CuQ, CuK,
                     sqb, sqh, sqm, sqd,
                     skb, skh, skn, skd,
                     svb, svh, svn, svd,
                     sdob, sdoh, sdom, sdod,
                     slb, slh, slm,
                     sdlb, sdlh, sdlm,
                     sdkb, sdkh, sdkn, sdkd,
                     sdvb, sdvh, sdvn, sdvd,
                     smb, smh, smm, smn,
                     Lq, Lk, GROUP, qk_scale, sm_scale, causal_offset,
                     LQ_KEY, LK_KEY,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                     IS_CAUSAL: tl.constexpr, CAUSAL_BR: tl.constexpr, MASK_KIND: tl.constexpr,
                     IS_VARLEN: tl.constexpr, DOT_PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    off_hk = tl.program_id(1)
    off_b = tl.program_id(2)
    q_start, k_start, seqlen_q, seqlen_k = _sequence_bounds(CuQ, CuK, off_b, Lq, Lk, IS_VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n >= seqlen_k:
        return
    c = causal_offset
    if CAUSAL_BR:
        c = c + seqlen_k - seqlen_q

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cols = start_n + offs_n
    b64 = off_b.to(tl.int64)
    hk64 = off_hk.to(tl.int64)
    krow64 = (k_start + start_n).to(tl.int64)
    if IS_VARLEN:
        q_start64 = q_start.to(tl.int64)
    else:
        q_start64 = b64 * 0

    k = _load_rows(K + b64 * skb + hk64 * skh + krow64 * skn + offs_n[:, None] * skn + offs_d[None, :] * skd,
                   cols, seqlen_k, offs_d, HEAD_DIM, True, EVEN_D)
    v = _load_rows(V + b64 * svb + hk64 * svh + krow64 * svn + offs_n[:, None] * svn + offs_d[None, :] * svd,
                   cols, seqlen_k, offs_d, HEAD_DIM, True, EVEN_D)

    if IS_CAUSAL:
        # query blocks before the one holding row start_n - c (the first row that sees key
        # start_n) are skipped. A single loop with the causal compare applied to every block
        # is used here (not a split loop as in the forward): two loop copies holding dK, dV,
        # K and V push the kernel into register spills.
        lo = tl.maximum(start_n - c, 0) // BLOCK_M * BLOCK_M
    else:
        lo = pid_n * 0

    lo64 = lo.to(tl.int64)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, GROUP):
        h64 = hk64 * GROUP + g
        q_ptrs = Q + b64 * sqb + h64 * sqh + q_start64 * sqm + offs_m[:, None] * sqm + offs_d[None, :] * sqd
        do_ptrs = DO + b64 * sdob + h64 * sdoh + q_start64 * sdom + offs_m[:, None] * sdom \
            + offs_d[None, :] * sdod
        lse_ptrs = Lse + b64 * slb + h64 * slh + q_start64 * slm + offs_m * slm
        delta_ptrs = Delta + b64 * sdlb + h64 * sdlh + q_start64 * sdlm + offs_m * sdlm
        mask_cols = Mask + b64 * smb + h64 * smh + cols.to(tl.int64) * smn
        dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs + lo64 * sqm, do_ptrs + lo64 * sdom,
                             lse_ptrs + lo64 * slm, delta_ptrs + lo64 * sdlm, mask_cols,
                             cols, lo, seqlen_q,
                             sqm, sdom, slm, sdlm, smm, seqlen_q, seqlen_k, qk_scale, c,
                             HEAD_DIM, EVEN_D, MASK_KIND, IS_CAUSAL, DOT_PREC, BLOCK_M, BLOCK_D)

    dk = dk * sm_scale
    _store_rows(DK + b64 * sdkb + hk64 * sdkh + krow64 * sdkn + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
                dk.to(DK.dtype.element_ty), cols, seqlen_k, offs_d, HEAD_DIM, EVEN_D)
    _store_rows(DV + b64 * sdvb + hk64 * sdvh + krow64 * sdvn + offs_n[:, None] * sdvn + offs_d[None, :] * sdvd,
                dv.to(DV.dtype.element_ty), cols, seqlen_k, offs_d, HEAD_DIM, EVEN_D)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, mask_rows, rows_m, lo, hi,
              skn, svn, smn, seqlen_q, seqlen_k, qk_scale, c,
              HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, MASK_KIND: tl.constexpr,
              IS_CAUSAL: tl.constexpr, BOUNDARY: tl.constexpr, DOT_PREC: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows_m < seqlen_q
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(k_ptrs, cols, seqlen_k, offs_d, HEAD_DIM, BOUNDARY, EVEN_D)
        v = _load_rows(v_ptrs, cols, seqlen_k, offs_d, HEAD_DIM, BOUNDARY, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if MASK_KIND != 0:
            # built per iteration from two vectors: a loop-carried [BLOCK_M, BLOCK_N] pointer
            # tensor would cost 2 registers per element and spill.
            mask_ptrs = mask_rows[:, None] + (cols.to(tl.int64) * smn)[None, :]
            if BOUNDARY:
                s = _apply_user_mask(s, mask_ptrs, row_ok[:, None] & (cols[None, :] < seqlen_k), MASK_KIND)
            else:
                s = _apply_user_mask(s, mask_ptrs, row_ok[:, None], MASK_KIND)
        if BOUNDARY:
            keep = cols[None, :] < seqlen_k
            if IS_CAUSAL:
                keep = keep & (cols[None, :] <= rows_m[:, None] + c)
            s = tl.where(keep, s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
        k_ptrs += BLOCK_N * skn
        v_ptrs += BLOCK_N * svn
    return dq


@triton.jit(do_not_specialize=["Lq", "Lk", "GROUP", "causal_offset"])
def _bwd_dq_kernel(Q, K, V, DO, Lse, Delta, DQ, Mask, CuQ, CuK,
                   sqb, sqh, sqm, sqd,
                   skb, skh, skn, skd,
                   svb, svh, svn, svd,
                   sdob, sdoh, sdom, sdod,
                   slb, slh, slm,
                   sdlb, sdlh, sdlm,
                   sdqb, sdqh, sdqm, sdqd,
                   smb, smh, smm, smn,
                   Lq, Lk, GROUP, qk_scale, sm_scale, causal_offset,
                   LQ_KEY, LK_KEY,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                   IS_CAUSAL: tl.constexpr, CAUSAL_BR: tl.constexpr, MASK_KIND: tl.constexpr,
                   IS_VARLEN: tl.constexpr, DOT_PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    off_hk = off_h // GROUP
    q_start, k_start, seqlen_q, seqlen_k = _sequence_bounds(CuQ, CuK, off_b, Lq, Lk, IS_VARLEN)
    num_m, start_m, c = _query_block(pid_m, seqlen_q, seqlen_k, causal_offset, IS_CAUSAL, CAUSAL_BR, BLOCK_M)
    if pid_m >= num_m:
        return

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows_m = start_m + offs_m
    row_ok = rows_m < seqlen_q
    b64 = off_b.to(tl.int64)
    h64 = off_h.to(tl.int64)
    hk64 = off_hk.to(tl.int64)
    qrow64 = (q_start + start_m).to(tl.int64)

    q = _load_rows(Q + b64 * sqb + h64 * sqh + qrow64 * sqm + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                   rows_m, seqlen_q, offs_d, HEAD_DIM, True, EVEN_D)
    do = _load_rows(DO + b64 * sdob + h64 * sdoh + qrow64 * sdom + offs_m[:, None] * sdom
                    + offs_d[None, :] * sdod, rows_m, seqlen_q, offs_d, HEAD_DIM, True, EVEN_D)
    lse = tl.load(Lse + b64 * slb + h64 * slh + qrow64 * slm + offs_m * slm, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(Delta + b64 * sdlb + h64 * sdlh + qrow64 * sdlm + offs_m * sdlm, mask=row_ok, other=0.0)

    k_ptrs = K + b64 * skb + hk64 * skh + offs_n[:, None] * skn + offs_d[None, :] * skd
    v_ptrs = V + b64 * svb + hk64 * svh + offs_n[:, None] * svn + offs_d[None, :] * svd
    if IS_VARLEN:
        k_ptrs += k_start.to(tl.int64) * skn
        v_ptrs += k_start.to(tl.int64) * svn
    mask_rows = Mask + b64 * smb + h64 * smh + rows_m.to(tl.int64) * smm

    if IS_CAUSAL:
        hi = tl.minimum(seqlen_k, tl.minimum(start_m + BLOCK_M, seqlen_q) + c)
        hi = tl.maximum(hi, 0)
        full = tl.maximum(start_m + c + 1, 0) // BLOCK_N * BLOCK_N
        mid = tl.minimum(full, seqlen_k // BLOCK_N * BLOCK_N)
    else:
        hi = seqlen_k
        mid = seqlen_k // BLOCK_N * BLOCK_N

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, mask_rows, rows_m, 0, mid,
                   skn, svn, smn, seqlen_q, seqlen_k, qk_scale, c,
                   HEAD_DIM, EVEN_D, MASK_KIND, IS_CAUSAL, False, DOT_PREC, BLOCK_N, BLOCK_D)
    mid64 = mid.to(tl.int64)
    dq = _dq_inner(dq, q, do, lse2, delta, k_ptrs + mid64 * skn, v_ptrs + mid64 * svn, mask_rows,
                   rows_m, mid, hi,
                   skn, svn, smn, seqlen_q, seqlen_k, qk_scale, c,
                   HEAD_DIM, EVEN_D, MASK_KIND, IS_CAUSAL, True, DOT_PREC, BLOCK_N, BLOCK_D)
    dq = dq * sm_scale
    _store_rows(DQ + b64 * sdqb + h64 * sdqh + qrow64 * sdqm + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
                dq.to(DQ.dtype.element_ty), rows_m, seqlen_q, offs_d, HEAD_DIM, EVEN_D)


# =============================================================================
# Autotuning
# =============================================================================


def _cfg(block_m: int, block_n: int, warps: int, stages: int) -> "triton.Config":
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# Candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) per head-dim class. Chosen by
# compiling every kernel for sm_90 and keeping the configurations without register spills
# and within the 227 KiB shared-memory limit of H100/H200 (throughput: bench/attention.py,
# docs/PERFORMANCE.md).
# Forward / dQ: BLOCK_M = query block (per program), BLOCK_N = key block (inner loop).
# dK/dV:        BLOCK_M = query block (inner loop),  BLOCK_N = key block (per program).
_FWD_BY_D = {
    64: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3),
         (128, 32, 4, 3), (64, 64, 4, 4)],
    128: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 8, 3),
          (64, 32, 4, 3), (128, 32, 8, 3)],
    256: [(64, 32, 8, 2), (64, 32, 8, 3), (128, 32, 8, 2), (64, 16, 4, 2)],
}
_DKDV_BY_D = {
    64: [(32, 128, 8, 2), (32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 2), (64, 64, 8, 3),
         (16, 128, 8, 2)],
    128: [(32, 128, 8, 2), (32, 128, 8, 3), (32, 64, 8, 2), (16, 128, 8, 2), (16, 64, 4, 3)],
    256: [(32, 32, 8, 2), (16, 32, 8, 1), (16, 32, 4, 2)],
}
_DQ_BY_D = {
    64: [(128, 64, 8, 3), (128, 32, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2),
         (64, 32, 4, 2)],
    128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 8, 2), (64, 32, 4, 3)],
    256: [(128, 32, 8, 3), (64, 32, 8, 2), (64, 32, 4, 2)],
}


def _all_configs(by_d):
    seen = []
    for specs in by_d.values():
        for spec in specs:
            if spec not in seen:
                seen.append(spec)
    return [_cfg(*spec) for spec in seen]


_AUTOTUNE_KEY = ["LQ_KEY", "LK_KEY", "HEAD_DIM", "IS_CAUSAL", "CAUSAL_BR", "MASK_KIND", "IS_VARLEN", "DOT_PREC"]
_PRE_BLOCK_M = 64


def _make_prune(by_d, outer_is_query: bool):
    """Keep the candidates of the head-dim class; drop 128-row query tiles for short query
    lengths (decode), and keep only two small tiles for IEEE fp32 (slow FMA path, long compiles)."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        block_d = int(args.get("BLOCK_D", 128))
        lq_key = int(args.get("LQ_KEY", 1 << 17))
        d_class = 64 if block_d <= 64 else (128 if block_d <= 128 else 256)
        allowed = set(by_d[d_class])
        spec = lambda cf: (cf.kwargs["BLOCK_M"], cf.kwargs["BLOCK_N"], cf.num_warps, cf.num_stages)  # noqa: E731
        keep = [cf for cf in configs if spec(cf) in allowed]
        if outer_is_query and lq_key <= 64:
            short = [cf for cf in keep if cf.kwargs["BLOCK_M"] <= 64]
            keep = short or keep
        if args.get("DOT_PREC") == "ieee":
            keep = sorted(keep, key=lambda cf: cf.kwargs["BLOCK_M"] * cf.kwargs["BLOCK_N"])[:2]
        return keep or [min(configs, key=lambda cf: cf.kwargs["BLOCK_M"] * cf.kwargs["BLOCK_N"])]

    return prune


if _INTERPRET:
    _fwd_tuned = _fwd_kernel
    _dkdv_tuned = _bwd_dkdv_kernel
    _dq_tuned = _bwd_dq_kernel
else:
    _fwd_tuned = triton.autotune(
        configs=_all_configs(_FWD_BY_D), key=_AUTOTUNE_KEY,
        prune_configs_by={"early_config_prune": _make_prune(_FWD_BY_D, True)},
    )(_fwd_kernel)
    _dkdv_tuned = triton.autotune(
        configs=_all_configs(_DKDV_BY_D), key=_AUTOTUNE_KEY,
        prune_configs_by={"early_config_prune": _make_prune(_DKDV_BY_D, False)},
    )(_bwd_dkdv_kernel)
    _dq_tuned = triton.autotune(
        configs=_all_configs(_DQ_BY_D), key=_AUTOTUNE_KEY,
        prune_configs_by={"early_config_prune": _make_prune(_DQ_BY_D, True)},
    )(_bwd_dq_kernel)


def _launch(name: str, kernel, tuned, grid_fn, args, meta) -> None:
    if _INTERPRET:
        block_m, block_n = INTERPRET_BLOCKS[name]
        full_meta = dict(meta, BLOCK_M=block_m, BLOCK_N=block_n)
        kernel[grid_fn(full_meta)](*args, **full_meta)
    else:
        tuned[grid_fn](*args, **meta)


# =============================================================================
# Validation helpers
# =============================================================================


def _device_ctx(t: torch.Tensor):
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _len_key(n: int) -> int:
    return min(max(triton.next_power_of_2(max(int(n), 1)), 16), 1 << 17)


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # Triton's default; ignored for fp16 / bf16 operands


def _check_tensor(name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")


def _check_qkv(q, k, v, varlen: bool) -> None:
    layout_q = "(T, Hq, D)" if varlen else "(B, Hq, Lq, D)"
    layout_kv = "(T, Hkv, D)" if varlen else "(B, Hkv, Lk, D)"
    ndim = 3 if varlen else 4
    _check_tensor("q", q, ndim, layout_q)
    _check_tensor("k", k, ndim, layout_kv)
    _check_tensor("v", v, ndim, layout_kv)
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"q dtype {q.dtype} is not supported (expected float16, bfloat16 or float32)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on the same device, got {q.device}, {k.device}, {v.device}")
    if not _INTERPRET and q.device.type != "cuda":
        raise ValueError(
            f"the Triton flash-attention kernels need CUDA tensors (got {q.device}); "
            "set TRITON_INTERPRET=1 before importing triton to run them on CPU"
        )
    head_axis = 1
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"batch size mismatch: q has {q.shape[0]}, k/v have {k.shape[0]}")
    d = q.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"head dim mismatch: q has D={d}, k/v have D={k.shape[-1]}")
    if not (_MIN_HEAD_DIM <= d <= _MAX_HEAD_DIM):
        raise ValueError(f"head dim D={d} is out of the supported range [{_MIN_HEAD_DIM}, {_MAX_HEAD_DIM}]")
    hq, hkv = q.shape[head_axis], k.shape[head_axis]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"number of query heads ({hq}) must be a multiple of the number of kv heads ({hkv})")
    if hq > 65535:
        raise ValueError(f"at most 65535 query heads are supported, got {hq}")


def _resolve_scale(scale, d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d)
    try:
        return float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a float or None, got {scale!r}") from None


def _resolve_causal(causal_offset, lq: int, lk: int, varlen: bool):
    """Return (is_causal, offset, per_sequence_bottom_right)."""
    if causal_offset is None:
        return False, 0, False
    if isinstance(causal_offset, str):
        if causal_offset == "top_left":
            return True, 0, False
        if causal_offset == "bottom_right":
            return (True, 0, True) if varlen else (True, lk - lq, False)
        raise ValueError(f"causal_offset string must be 'top_left' or 'bottom_right', got {causal_offset!r}")
    if isinstance(causal_offset, bool):
        raise ValueError("causal_offset must be None, an int or 'bottom_right'/'top_left' (SDPA is_causal=True is 0)")
    try:
        c = int(causal_offset.__index__())
    except (AttributeError, TypeError, ValueError, RuntimeError):
        raise ValueError(f"causal_offset must be None, an int or 'bottom_right', got {causal_offset!r}") from None
    return True, max(-_OFFSET_CLAMP, min(_OFFSET_CLAMP, c)), False


def _prepare_mask(mask, target, device):
    """Return (tensor to pass, MASK_KIND, 4 strides) without materialising the broadcast."""
    if mask is None:
        return None, 0, (0, 0, 0, 0)
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but q is on {device}")
    if mask.dim() > 4:
        raise ValueError(f"mask must have at most 4 dims (broadcastable to (B, Hq, Lq, Lk)), got {tuple(mask.shape)}")
    shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    strides = (0,) * (4 - mask.dim()) + tuple(mask.stride())
    for size, want in zip(shape, target):
        if size != 1 and size != want:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} is not broadcastable to (B, Hq, Lq, Lk) = {tuple(target)}"
            )
    strides = tuple(0 if size == 1 else st for size, st in zip(shape, strides))
    mask = mask.detach()
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), 1, strides
    if mask.is_floating_point():
        return mask, 2, strides
    raise ValueError(f"mask must be bool (True = attend) or floating (additive), got {mask.dtype}")


def _check_like(name: str, t, shape, dtype, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def _check_cu_seqlens(cu_q, cu_k, device):
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(f"{name} must be a 1-D tensor of N + 1 offsets")
        if cu.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 (or int64), got {cu.dtype}")
        if cu.device != device:
            raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length, got {cu_q.numel()} and {cu_k.numel()}"
        )
    n = cu_q.numel() - 1
    if n > 65535:
        raise ValueError(f"at most 65535 sequences per varlen call are supported, got {n}")
    return cu_q.to(torch.int32).contiguous(), cu_k.to(torch.int32).contiguous(), n


def _common_meta(d: int, dtype, is_causal: bool, br: bool, mask_kind: int, varlen: bool) -> dict:
    block_d = max(16, triton.next_power_of_2(d))
    return dict(
        HEAD_DIM=d, BLOCK_D=block_d, EVEN_D=(block_d == d), IS_CAUSAL=is_causal, CAUSAL_BR=br,
        MASK_KIND=mask_kind, IS_VARLEN=varlen, DOT_PREC=_dot_precision(dtype),
    )


# =============================================================================
# Kernel drivers (shared by the dense and varlen entry points)
#   tensors are passed with 4-D "(batch, head, row, dim)" strides; varlen uses batch
#   stride 0 and per-sequence row offsets from cu_seqlens.
# =============================================================================


def _run_forward(q, k, v, out, lse, qs, ks, vs, os_, ls, mask_t, ms, cu_q, cu_k,
                 n_batch, hq, lq, lk, group, sm_scale, c, meta):
    args = (
        q, k, v, out, lse, mask_t if mask_t is not None else q, cu_q, cu_k,
        *qs, *ks, *vs, *os_, *ls, *ms,
        lq, lk, group, sm_scale * _LOG2E, c, _len_key(lq), _len_key(lk),
    )
    grid = lambda m: (triton.cdiv(lq, m["BLOCK_M"]), hq, n_batch)  # noqa: E731
    with _device_ctx(q):
        _launch("fwd", _fwd_kernel, _fwd_tuned, grid, args, meta)


def _run_backward(do, q, k, v, out, lse, delta, dq, dk, dv,
                  dos, qs, ks, vs, os_, ls, dls, dqs, dks, dvs, mask_t, ms, cu_q, cu_k,
                  n_batch, hq, hkv, lq, lk, group, sm_scale, c, meta, pre_batch, pre_rows):
    block_d, even_d, head_dim = meta["BLOCK_D"], meta["EVEN_D"], meta["HEAD_DIM"]
    with _device_ctx(q):
        # delta = rowsum(dO * O): purely row-wise, so varlen runs it as one dense batch.
        pre_bm = INTERPRET_BLOCKS["bwd_pre"][0] if _INTERPRET else _PRE_BLOCK_M
        pre_kwargs = {} if _INTERPRET else {"num_warps": 4}
        _bwd_preprocess[(triton.cdiv(pre_rows, pre_bm), hq, pre_batch)](
            out, do, delta, *os_, *dos, *dls, pre_rows,
            HEAD_DIM=head_dim, BLOCK_D=block_d, EVEN_D=even_d, BLOCK_M=pre_bm, **pre_kwargs,
        )
        mask_arg = mask_t if mask_t is not None else q
        common = (lq, lk, group, sm_scale * _LOG2E, sm_scale, c, _len_key(lq), _len_key(lk))
        dkdv_args = (
            q, k, v, do, lse, delta, dk, dv, mask_arg, cu_q, cu_k,
            *qs, *ks, *vs, *dos, *ls, *dls, *dks, *dvs, *ms, *common,
        )
        grid_kv = lambda m: (triton.cdiv(lk, m["BLOCK_N"]), hkv, n_batch)  # noqa: E731
        _launch("bwd_dkdv", _bwd_dkdv_kernel, _dkdv_tuned, grid_kv, dkdv_args, meta)
        dq_args = (
            q, k, v, do, lse, delta, dq, mask_arg, cu_q, cu_k,
            *qs, *ks, *vs, *dos, *ls, *dls, *dqs, *ms, *common,
        )
        grid_q = lambda m: (triton.cdiv(lq, m["BLOCK_M"]), hq, n_batch)  # noqa: E731
        _launch("bwd_dq", _bwd_dq_kernel, _dq_tuned, grid_q, dq_args, meta)


# =============================================================================
# Public API
# =============================================================================

CausalOffset = Optional[Union[int, str]]


def flash_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    causal_offset: CausalOffset = None,
    scale: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention forward.

    Returns ``(out, lse)``: ``out`` ``(B, Hq, Lq, D)`` in ``q.dtype`` (contiguous) and
    ``lse`` ``(B, Hq, Lq)`` float32, the natural-log log-sum-exp of each row's scaled and
    masked scores (``-inf`` for rows that see no key, whose ``out`` is 0).
    """
    _check_qkv(q, k, v, varlen=False)
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    if b > 65535:
        raise ValueError(f"batch sizes above 65535 are not supported, got {b}")
    sm_scale = _resolve_scale(scale, d)
    is_causal, c, br = _resolve_causal(causal_offset, lq, lk, varlen=False)
    mask_t, mask_kind, ms = _prepare_mask(mask, (b, hq, lq, lk), q.device)
    out = torch.empty((b, hq, lq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if lk == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    meta = _common_meta(d, q.dtype, is_causal, br, mask_kind, False)
    _run_forward(
        q, k, v, out, lse, q.stride(), k.stride(), v.stride(), out.stride(), lse.stride(), mask_t, ms, q, q,
        b, hq, lq, lk, hq // hkv, sm_scale, c, meta,
    )
    return out, lse


def flash_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    causal_offset: CausalOffset = None,
    scale: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused attention backward. Returns contiguous ``(dq, dk, dv)`` shaped like ``q, k, v``;
    ``dk``/``dv`` are summed over the query heads of each GQA group. ``out`` and ``lse``
    are the outputs of :func:`flash_attention_forward` with the same arguments."""
    _check_qkv(q, k, v, varlen=False)
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    if b > 65535:
        raise ValueError(f"batch sizes above 65535 are not supported, got {b}")
    _check_like("grad_out", grad_out, q.shape, q.dtype, q.device)
    _check_like("out", out, q.shape, q.dtype, q.device)
    _check_like("lse", lse, (b, hq, lq), torch.float32, q.device)
    sm_scale = _resolve_scale(scale, d)
    is_causal, c, br = _resolve_causal(causal_offset, lq, lk, varlen=False)
    mask_t, mask_kind, ms = _prepare_mask(mask, (b, hq, lq, lk), q.device)
    dq = torch.empty((b, hq, lq, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, hkv, lk, d), dtype=q.dtype, device=q.device)
    dv = torch.empty((b, hkv, lk, d), dtype=q.dtype, device=q.device)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty((b, hq, lq), dtype=torch.float32, device=q.device)
    meta = _common_meta(d, q.dtype, is_causal, br, mask_kind, False)
    _run_backward(
        grad_out, q, k, v, out, lse, delta, dq, dk, dv,
        grad_out.stride(), q.stride(), k.stride(), v.stride(), out.stride(), lse.stride(), delta.stride(),
        dq.stride(), dk.stride(), dv.stride(), mask_t, ms, q, q,
        b, hq, hkv, lq, lk, hq // hkv, sm_scale, c, meta, pre_batch=b, pre_rows=lq,
    )
    return dq, dk, dv


def _varlen_strides(t: torch.Tensor):
    """(T, H, D) tensor -> 4-D (batch, head, row, dim) strides with batch stride 0."""
    return (0, t.stride(1), t.stride(0), t.stride(2))


def flash_attention_varlen_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal_offset: CausalOffset = None,
    scale: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed-sequence attention forward.

    ``q`` ``(Tq, Hq, D)``, ``k``/``v`` ``(Tk, Hkv, D)``; sequence ``i`` owns query rows
    ``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` and key rows ``cu_seqlens_k[i]:cu_seqlens_k[i+1]``.
    ``max_seqlen_q`` must be >= every query length (it sizes the grid; longer sequences
    would be truncated silently) and ``cu_seqlens_q[-1]`` must equal ``Tq`` (rows past it
    are left uninitialised). ``causal_offset`` applies per sequence; ``"bottom_right"``
    means ``len_k_i - len_q_i`` for each sequence.

    Returns ``(out, lse)``: ``out`` ``(Tq, Hq, D)`` in ``q.dtype`` and ``lse`` **``(Hq, Tq)``**
    float32 (head-major, like flash-attn's varlen API).
    """
    _check_qkv(q, k, v, varlen=True)
    cu_q, cu_k, n = _check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, q.device)
    tq, hq, d = q.shape
    tk, hkv = k.shape[0], k.shape[1]
    max_q, max_k = int(max_seqlen_q), int(max_seqlen_k)
    sm_scale = _resolve_scale(scale, d)
    is_causal, c, br = _resolve_causal(causal_offset, max_q, max_k, varlen=True)
    out = torch.empty((tq, hq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((hq, tq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if n == 0 or max_q <= 0 or tk == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    meta = _common_meta(d, q.dtype, is_causal, br, 0, True)
    lse_strides = (0, lse.stride(0), lse.stride(1))
    _run_forward(
        q, k, v, out, lse, _varlen_strides(q), _varlen_strides(k), _varlen_strides(v), _varlen_strides(out),
        lse_strides, None, (0, 0, 0, 0), cu_q, cu_k,
        n, hq, max_q, max(max_k, 1), hq // hkv, sm_scale, c, meta,
    )
    return out, lse


def flash_attention_varlen_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal_offset: CausalOffset = None,
    scale: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed-sequence attention backward; ``lse`` is the ``(Hq, Tq)`` tensor returned by
    :func:`flash_attention_varlen_forward`. Returns ``(dq, dk, dv)`` shaped like
    ``q, k, v``. ``max_seqlen_k`` must be >= every key length and ``cu_seqlens_k[-1]``
    must equal ``Tk`` (key rows outside every sequence are left uninitialised in dk/dv)."""
    _check_qkv(q, k, v, varlen=True)
    cu_q, cu_k, n = _check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, q.device)
    tq, hq, d = q.shape
    tk, hkv = k.shape[0], k.shape[1]
    _check_like("grad_out", grad_out, q.shape, q.dtype, q.device)
    _check_like("out", out, q.shape, q.dtype, q.device)
    _check_like("lse", lse, (hq, tq), torch.float32, q.device)
    max_q, max_k = int(max_seqlen_q), int(max_seqlen_k)
    sm_scale = _resolve_scale(scale, d)
    is_causal, c, br = _resolve_causal(causal_offset, max_q, max_k, varlen=True)
    dq = torch.empty((tq, hq, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((tk, hkv, d), dtype=q.dtype, device=q.device)
    dv = torch.empty((tk, hkv, d), dtype=q.dtype, device=q.device)
    if q.numel() == 0 or k.numel() == 0 or n == 0 or max_q <= 0 or max_k <= 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty((hq, tq), dtype=torch.float32, device=q.device)
    meta = _common_meta(d, q.dtype, is_causal, br, 0, True)
    lse_strides = (0, lse.stride(0), lse.stride(1))
    delta_strides = (0, delta.stride(0), delta.stride(1))
    _run_backward(
        grad_out, q, k, v, out, lse, delta, dq, dk, dv,
        _varlen_strides(grad_out), _varlen_strides(q), _varlen_strides(k), _varlen_strides(v),
        _varlen_strides(out), lse_strides, delta_strides,
        _varlen_strides(dq), _varlen_strides(dk), _varlen_strides(dv), None, (0, 0, 0, 0), cu_q, cu_k,
        n, hq, hkv, max_q, max_k, hq // hkv, sm_scale, c, meta, pre_batch=1, pre_rows=tq,
    )
    return dq, dk, dv
