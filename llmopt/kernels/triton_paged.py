"""Triton kernels for attention over a paged KV cache (``llmopt::paged_attention``).

Layouts (the op's contract, see :mod:`llmopt.kernels.paged_attention`)
-------------------------------------------------------------------
* ``q`` ``(T, Hq, D)``, ``k``/``v`` ``(T, Hkv, D)``: the new tokens of N sequences, packed;
  sequence ``i`` owns rows ``query_start_loc[i]:query_start_loc[i+1]``.
* ``k_cache``/``v_cache`` ``(num_blocks, block_size, Hkv, D)``, any strides.
* ``slot_mapping`` ``(T,)``: cache slot ``block * block_size + offset`` of each new token,
  ``-1`` = not written.
* ``block_tables`` ``(N, max_blocks_per_seq)``: physical block ids of each sequence; token
  position ``p`` lives at ``block_tables[i, p // block_size]``, offset ``p % block_size``.
* ``seq_lens`` ``(N,)``: tokens of each sequence after this step (cached prefix + new).
  Query row ``r`` of sequence ``i`` sits at position ``seq_len - q_len + r`` and attends
  positions ``0 ..`` that position (bottom-right causal).

Kernels
-------
* ``_kv_write_kernel``: one program per (new token, group of kv heads); writes the
  token's K and V rows into their cache slot (skipped for slot ``-1``). No host sync.
* ``_decode_kernel`` (flash-decoding, ``max_query_len == 1``): one program per
  (sequence, kv head, split of the key range). The query heads of the GQA group are the
  rows of the query tile (padded to 16 for ``tl.dot``), so every K/V tile is loaded once
  per group. Keys are gathered through the block table ``BLOCK_N`` positions at a time
  (independent of the cache block size). With one split the program writes the final
  output; otherwise it writes a normalised partial output and its log-sum-exp and
  ``_decode_reduce_kernel`` (one program per (sequence, query head)) combines them.
* ``_prefill_kernel`` (``max_query_len > 1``: chunked prefill, prefix-cache hits, mixed
  batches): one program per (query block, query head, sequence); online softmax over the
  sequence's cached keys. Key tiles that every row of the query block may see run
  without per-element masking, tiles past the causal limit of the block's last row are
  never visited.

All softmax statistics are fp32 in the log2 domain (``exp2`` with ``scale * log2(e)``
folded into the scores); matmuls accumulate in fp32; outputs are in ``q.dtype``. fp32
inputs use IEEE fp32 dots unless ``torch.get_float32_matmul_precision()`` allows TF32.

On GPU the block sizes are autotuned; under ``TRITON_INTERPRET=1`` one small
configuration (``INTERPRET_BLOCKS``) is used so CPU tests stay fast. The interpreter
has no bf16 ``tl.dot``: test fp32 and fp16 there.

Nothing here calls ``.item()`` / ``.tolist()``: the launchers never synchronise with the
device (CUDA-graph friendly), so they trust the metadata (``seq_lens[i] >=`` the sequence's
query count, block tables long enough, ``max_query_len``/``max_seq_len`` upper bounds).
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from llmopt.kernels.triton_flash import _LOG2E, online_softmax_step

__all__ = [
    "write_kv_cache",
    "paged_decode",
    "paged_prefill",
    "paged_attention_forward",
    "decode_num_splits",
]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Block sizes used under the interpreter (tests may monkeypatch): decode key tile,
# prefill (query tile, key tile). 16 is the smallest tile tl.dot accepts.
INTERPRET_BLOCKS = {"decode": 16, "prefill": (16, 16)}

# Split-KV sizing. Each split covers at least DECODE_MIN_SPLIT_TOKENS keys (a few cache
# blocks); on GPU enough splits are used to give every SM ~2 programs, at most
# DECODE_MAX_SPLITS. Split lengths are multiples of DECODE_SPLIT_ALIGN (a multiple of
# every autotuned BLOCK_N, so no split ends in a ragged tile). Under the interpreter
# the split size is INTERPRET_SPLIT_TOKENS, small so that the tests' short sequences
# take several splits and exercise the reduction (decode_num_splits takes another).
DECODE_MIN_SPLIT_TOKENS = 256
DECODE_MAX_SPLITS = 64
DECODE_SPLIT_ALIGN = 128
INTERPRET_SPLIT_TOKENS = 32


# =============================================================================
# Kernels
# =============================================================================


@triton.jit
def _kv_write_kernel(K, V, KC, VC, Slots,
                     skt, skh, skd, svt, svh, svd,
                     kcb, kco, kch, kcd, vcb, vco, vch, vcd,
                     HKV,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
                     BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    slot = tl.load(Slots + t).to(tl.int64)
    # Slot -1 -> no head is written. (Integer arithmetic rather than a scalar bool in the
    # mask: the interpreter rejects masks built from scalar comparisons.)
    h_limit = tl.minimum(tl.maximum(slot + 1, 0), 1) * HKV
    slot = tl.maximum(slot, 0)
    blk = slot // PAGE_SIZE
    off = slot % PAGE_SIZE
    m = (offs_h[:, None] < h_limit) & (offs_d[None, :] < HEAD_DIM)
    h64 = offs_h.to(tl.int64)[:, None]
    d64 = offs_d.to(tl.int64)[None, :]
    kv = tl.load(K + t * skt + h64 * skh + d64 * skd, mask=m, other=0.0)
    tl.store(KC + blk * kcb + off * kco + h64 * kch + d64 * kcd, kv.to(KC.dtype.element_ty), mask=m)
    vv = tl.load(V + t * svt + h64 * svh + d64 * svd, mask=m, other=0.0)
    tl.store(VC + blk * vcb + off * vco + h64 * vch + d64 * vcd, vv.to(VC.dtype.element_ty), mask=m)


@triton.jit
def _page_offsets(bt_row, sbt, pos, pos_ok, PAGE_SIZE: tl.constexpr, MASKED: tl.constexpr):
    """Per-position (physical block, in-block offset) as int64, through the block table.

    Masked-off positions read block id 0 (never dereferenced: their loads are masked)."""
    logical = pos // PAGE_SIZE
    if MASKED:
        phys = tl.load(bt_row + logical * sbt, mask=pos_ok, other=0)
    else:
        phys = tl.load(bt_row + logical * sbt)
    return phys.to(tl.int64), (pos % PAGE_SIZE).to(tl.int64)


@triton.jit
def _load_kv_tile(C, phys, off, pos_ok, hk64, scb, sco, sch, scd, offs_d,
                  HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a [BLOCK_N, BLOCK_D] tile of one kv head at the gathered positions (0 outside)."""
    ptrs = C + phys[:, None] * scb + off[:, None] * sco + hk64 * sch + offs_d[None, :] * scd
    if MASKED:
        if EVEN_D:
            t = tl.load(ptrs, mask=pos_ok[:, None], other=0.0)
        else:
            t = tl.load(ptrs, mask=pos_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if EVEN_D:
            t = tl.load(ptrs)
        else:
            t = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return t


@triton.jit(do_not_specialize=["split_tokens"])
def _decode_kernel(Q, KC, VC, BT, SeqLens, QSL, Out, MidO, MidL,
                   sqt, sqh, sqd,
                   skb, sko, skh, skd,
                   svb, svo, svh, svd,
                   sbn, sbb,
                   sot, soh, sod,
                   smn, smh, sms, smd,
                   sln, slh, sls,
                   GROUP, split_tokens, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                   PAGE_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, DIRECT: tl.constexpr,
                   DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    seq = tl.program_id(0)
    hk = tl.program_id(1)
    split = tl.program_id(2)
    q_row = tl.load(QSL + seq)
    q_len = tl.load(QSL + seq + 1) - q_row
    seq_len = tl.load(SeqLens + seq)
    start = split * split_tokens
    end = tl.minimum(start + split_tokens, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < GROUP
    # Rows of the group that exist for this sequence (none if it has no query this step).
    g_live = offs_g < tl.minimum(q_len, 1) * GROUP
    heads64 = (hk * GROUP + offs_g).to(tl.int64)
    hk64 = hk.to(tl.int64)
    seq64 = seq.to(tl.int64)
    q_ptrs = Q + q_row.to(tl.int64) * sqt + heads64[:, None] * sqh + offs_d[None, :] * sqd
    q_mask = g_live[:, None]
    if not EVEN_D:
        q_mask = q_mask & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)

    bt_row = BT + seq64 * sbn
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        pos_ok = pos < end
        phys, off = _page_offsets(bt_row, sbb, pos, pos_ok, PAGE_SIZE, True)
        k = _load_kv_tile(KC, phys, off, pos_ok, hk64, skb, sko, skh, skd, offs_d, HEAD_DIM, True, EVEN_D)
        v = _load_kv_tile(VC, phys, off, pos_ok, hk64, svb, svo, svh, svd, offs_d, HEAD_DIM, True, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        s = tl.where(pos_ok[None, :], s, float("-inf"))
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, s, v, DOT_PREC)

    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    out = acc / l_safe[:, None]
    if DIRECT:
        o_ptrs = Out + q_row.to(tl.int64) * sot + heads64[:, None] * soh + offs_d[None, :] * sod
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=q_mask)
    else:
        # Every split writes (empty ones: out 0, lse -inf) so the reduction needs no bounds.
        mo_ptrs = MidO + seq64 * smn + heads64[:, None] * smh + split * sms + offs_d[None, :] * smd
        st_mask = g_ok[:, None]
        if not EVEN_D:
            st_mask = st_mask & (offs_d[None, :] < HEAD_DIM)
        tl.store(mo_ptrs, out, mask=st_mask)
        lse2 = tl.where(has, m_i + tl.math.log2(l_safe), float("-inf"))
        tl.store(MidL + seq64 * sln + heads64 * slh + split * sls, lse2, mask=g_ok)


@triton.jit
def _decode_reduce_kernel(MidO, MidL, QSL, Out,
                          smn, smh, sms, smd,
                          sln, slh, sls,
                          sot, soh, sod,
                          NUM_SPLITS,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    q_row = tl.load(QSL + seq)
    q_len = tl.load(QSL + seq + 1) - q_row
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < NUM_SPLITS
    lse2 = tl.load(MidL + seq * sln + h * slh + offs_s * sls, mask=s_ok, other=float("-inf"))
    m = tl.max(lse2, 0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse2 - m_ref)  # 0 for empty splits
    o = tl.load(MidO + seq * smn + h * smh + offs_s[:, None] * sms + offs_d[None, :] * smd,
                mask=s_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    num = tl.sum(o * w[:, None], 0)
    den = tl.sum(w, 0)
    out = num / tl.where(den > 0.0, den, 1.0)
    tl.store(Out + q_row.to(tl.int64) * sot + h * soh + offs_d * sod, out.to(Out.dtype.element_ty),
             mask=offs_d < tl.minimum(q_len, 1) * HEAD_DIM)


@triton.jit
def _prefill_inner(acc, m_i, l_i, q, bt_row, sbb, KC, VC, hk64,
                   skb, sko, skh, skd, svb, svo, svh, svd,
                   rows, lo, hi, ctx, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                   PAGE_SIZE: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """Online softmax over key positions [lo, hi). MASKED=False only for tiles that lie
    entirely inside the sequence and below the causal limit of every row of the block."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + offs_n
        pos_ok = pos < hi
        phys, off = _page_offsets(bt_row, sbb, pos, pos_ok, PAGE_SIZE, MASKED)
        k = _load_kv_tile(KC, phys, off, pos_ok, hk64, skb, sko, skh, skd, offs_d, HEAD_DIM, MASKED, EVEN_D)
        v = _load_kv_tile(VC, phys, off, pos_ok, hk64, svb, svo, svh, svd, offs_d, HEAD_DIM, MASKED, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if MASKED:
            keep = pos_ok[None, :] & (pos[None, :] <= rows[:, None] + ctx)
            s = tl.where(keep, s, float("-inf"))
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, s, v, DOT_PREC)
    return acc, m_i, l_i


@triton.jit
def _prefill_kernel(Q, KC, VC, BT, SeqLens, QSL, Out,
                    sqt, sqh, sqd,
                    skb, sko, skh, skd,
                    svb, svo, svh, svd,
                    sbn, sbb,
                    sot, soh, sod,
                    GROUP, qk_scale,
                    MAXQ_KEY,  # autotune key only
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                    PAGE_SIZE: tl.constexpr, DOT_PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(QSL + seq)
    q_len = tl.load(QSL + seq + 1) - q_start
    num_m = (q_len + BLOCK_M - 1) // BLOCK_M
    if pid_m >= num_m:
        return
    # Heaviest (last) query blocks first: better tail balance.
    start_m = (num_m - 1 - pid_m) * BLOCK_M
    seq_len = tl.load(SeqLens + seq)
    ctx = seq_len - q_len  # cached prefix length: row r sees keys 0 .. ctx + r

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m
    row_ok = rows < q_len
    hk64 = (h // GROUP).to(tl.int64)
    h64 = h.to(tl.int64)
    trow64 = (q_start + rows).to(tl.int64)
    q_mask = row_ok[:, None]
    if not EVEN_D:
        q_mask = q_mask & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + trow64[:, None] * sqt + h64 * sqh + offs_d[None, :] * sqd, mask=q_mask, other=0.0)

    # Keys visible to the last real row of the block: [0, hi). Keys < ctx + start_m + 1
    # are visible to every row; whole BLOCK_N tiles of them need no masking.
    hi = ctx + tl.minimum(start_m + BLOCK_M, q_len)
    mid = (ctx + start_m + 1) // BLOCK_N * BLOCK_N

    bt_row = BT + seq.to(tl.int64) * sbn
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, m_i, l_i = _prefill_inner(acc, m_i, l_i, q, bt_row, sbb, KC, VC, hk64,
                                   skb, sko, skh, skd, svb, svo, svh, svd,
                                   rows, 0, mid, ctx, qk_scale,
                                   HEAD_DIM, BLOCK_D, EVEN_D, PAGE_SIZE, False, DOT_PREC, BLOCK_N)
    acc, m_i, l_i = _prefill_inner(acc, m_i, l_i, q, bt_row, sbb, KC, VC, hk64,
                                   skb, sko, skh, skd, svb, svo, svh, svd,
                                   rows, mid, hi, ctx, qk_scale,
                                   HEAD_DIM, BLOCK_D, EVEN_D, PAGE_SIZE, True, DOT_PREC, BLOCK_N)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(Out + trow64[:, None] * sot + h64 * soh + offs_d[None, :] * sod, out.to(Out.dtype.element_ty),
             mask=q_mask)


# =============================================================================
# Autotuning (GPU only)
# =============================================================================

# (BLOCK_N, num_warps, num_stages): decode is bandwidth bound, the tile only sets how
# many cache rows are in flight per program. Every BLOCK_N divides DECODE_SPLIT_ALIGN.
_DECODE_CONFIGS = [(32, 4, 2), (64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 2), (64, 8, 3)]
# (BLOCK_M, BLOCK_N, num_warps, num_stages) for the prefill kernel. Compiled for sm_90
# (Triton 3.9, fp16): none of these spills registers at D <= 128 except where pruned below;
# at D = 256 only _PREFILL_D256 are spill-free (128-row tiles spill there).
_PREFILL_CONFIGS = [(64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 2),
                    (128, 64, 8, 2), (32, 32, 4, 2), (64, 32, 8, 2), (64, 64, 8, 2)]
_PREFILL_D256 = {(64, 32, 8, 2), (64, 64, 8, 2), (32, 32, 4, 2)}


def _prune_decode(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    block_d = int(args.get("BLOCK_D", 128))
    keep = configs
    if block_d > 128:  # large tiles spill at D=256
        keep = [c for c in configs if c.kwargs["BLOCK_N"] <= 64] or configs
    if args.get("DOT_PREC") == "ieee":
        keep = sorted(keep, key=lambda c: c.kwargs["BLOCK_N"])[:2]
    return keep


def _prune_prefill(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    block_d = int(args.get("BLOCK_D", 128))
    maxq = int(args.get("MAXQ_KEY", 1 << 16))
    keep = list(configs)
    if block_d > 128:
        spec = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)  # noqa: E731
        keep = [c for c in keep if spec(c) in _PREFILL_D256] or keep
    if maxq <= 64:
        keep = [c for c in keep if c.kwargs["BLOCK_M"] <= 64] or keep
    if args.get("DOT_PREC") == "ieee":
        keep = sorted(keep, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])[:2]
    return keep


if _INTERPRET:
    _decode_tuned = _decode_kernel
    _prefill_tuned = _prefill_kernel
else:
    _decode_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s) for n, w, s in _DECODE_CONFIGS],
        key=["HEAD_DIM", "PAGE_SIZE", "BLOCK_G", "DIRECT", "DOT_PREC"],
        prune_configs_by={"early_config_prune": _prune_decode},
    )(_decode_kernel)
    _prefill_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                 for m, n, w, s in _PREFILL_CONFIGS],
        key=["MAXQ_KEY", "HEAD_DIM", "PAGE_SIZE", "DOT_PREC"],
        prune_configs_by={"early_config_prune": _prune_prefill},
    )(_prefill_kernel)


# =============================================================================
# Launchers
# =============================================================================


def _device_ctx(t: torch.Tensor):
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # Triton's default; ignored for fp16 / bf16 operands


def _head_meta(d: int, page_size: int, dtype: torch.dtype) -> dict:
    block_d = max(16, triton.next_power_of_2(d))
    return dict(HEAD_DIM=d, BLOCK_D=block_d, EVEN_D=(block_d == d), PAGE_SIZE=page_size,
                DOT_PREC=_dot_precision(dtype))


def _as_i32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int32 and t.is_contiguous() else t.to(torch.int32).contiguous()


def _check_device(*tensors: torch.Tensor) -> None:
    if not _INTERPRET and any(t.device.type != "cuda" for t in tensors):
        raise ValueError(
            "the Triton paged-attention kernels need CUDA tensors; set TRITON_INTERPRET=1 before "
            "importing triton to run them on CPU"
        )


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def decode_num_splits(num_seqs: int, kv_heads: int, max_seq_len: int,
                      device: torch.device = torch.device("cpu"),
                      interpret_split_tokens: int = INTERPRET_SPLIT_TOKENS) -> tuple[int, int]:
    """Return ``(num_splits, split_tokens)`` for the split-KV decode kernel.

    One split for short sequences; otherwise enough splits (each at least
    ``DECODE_MIN_SPLIT_TOKENS`` keys) to give every SM about two programs. Under the
    Triton interpreter every split holds ``interpret_split_tokens`` keys (at least 16)."""
    max_seq_len = max(int(max_seq_len), 1)
    if _INTERPRET:
        split_tokens = max(16, int(interpret_split_tokens))
        return triton.cdiv(max_seq_len, split_tokens), split_tokens
    programs = max(num_seqs * kv_heads, 1)
    want = triton.cdiv(2 * _sm_count(device), programs)
    by_len = max_seq_len // DECODE_MIN_SPLIT_TOKENS
    splits = max(1, min(want, by_len, DECODE_MAX_SPLITS))
    split_tokens = triton.cdiv(triton.cdiv(max_seq_len, splits), DECODE_SPLIT_ALIGN) * DECODE_SPLIT_ALIGN
    return triton.cdiv(max_seq_len, split_tokens), split_tokens


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Write ``k[t]``/``v[t]`` to cache slot ``slot_mapping[t]`` (in place; ``-1`` skipped)."""
    _check_device(k, v, k_cache, v_cache, slot_mapping)
    t, hkv, d = k.shape
    if t == 0:
        return
    page = k_cache.shape[1]
    block_d = max(16, triton.next_power_of_2(d))
    block_h = max(1, min(triton.next_power_of_2(hkv), 4096 // block_d))
    slots = slot_mapping if slot_mapping.is_contiguous() else slot_mapping.contiguous()
    kwargs = {} if _INTERPRET else {"num_warps": 4}
    with _device_ctx(k):
        _kv_write_kernel[(t, triton.cdiv(hkv, block_h))](
            k, v, k_cache, v_cache, slots,
            *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
            hkv, HEAD_DIM=d, BLOCK_D=block_d, PAGE_SIZE=page, BLOCK_H=block_h, **kwargs,
        )


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, query_start_loc: torch.Tensor, max_seq_len: int,
                 scale: Optional[float] = None, num_splits: Optional[int] = None,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Split-KV decode attention: every sequence has at most one new query row (its last
    position), already written to the cache. Returns ``(T, Hq, D)`` in ``q.dtype``.

    ``num_splits`` forces the number of key-range splits (tests); by default it comes
    from :func:`decode_num_splits`. Rows of sequences with no query are left untouched.
    """
    _check_device(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    t, hq, d = q.shape
    hkv = k_cache.shape[2]
    page = k_cache.shape[1]
    n = block_tables.shape[0]
    group = hq // hkv
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if t == 0 or n == 0:
        return out
    sm_scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    max_seq_len = max(int(max_seq_len), 1)
    if num_splits is None:
        num_splits, split_tokens = decode_num_splits(n, hkv, max_seq_len, q.device)
    else:
        # Forced (tests): exact split length, so splits may end inside a key tile.
        split_tokens = triton.cdiv(max_seq_len, max(1, int(num_splits)))
        num_splits = triton.cdiv(max_seq_len, split_tokens)
    bt, sl, qsl = _as_i32(block_tables), _as_i32(seq_lens), _as_i32(query_start_loc)
    direct = num_splits == 1
    block_d = max(16, triton.next_power_of_2(d))
    if direct:
        mid_o = torch.empty((1, 1, 1, 1), dtype=torch.float32, device=q.device)
        mid_l = torch.empty((1, 1, 1), dtype=torch.float32, device=q.device)
    else:
        mid_o = torch.empty((n, hq, num_splits, block_d), dtype=torch.float32, device=q.device)
        mid_l = torch.empty((n, hq, num_splits), dtype=torch.float32, device=q.device)
    meta = _head_meta(d, page, q.dtype)
    meta.update(BLOCK_G=max(16, triton.next_power_of_2(group)), DIRECT=direct)
    args = (
        q, k_cache, v_cache, bt, sl, qsl, out, mid_o, mid_l,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *bt.stride(), *out.stride(),
        *mid_o.stride(), *mid_l.stride(),
        group, split_tokens, sm_scale * _LOG2E,
    )
    with _device_ctx(q):
        if _INTERPRET:
            _decode_kernel[(n, hkv, num_splits)](*args, **meta, BLOCK_N=INTERPRET_BLOCKS["decode"])
        else:
            _decode_tuned[(n, hkv, num_splits)](*args, **meta)
        if not direct:
            kwargs = {} if _INTERPRET else {"num_warps": 4}
            _decode_reduce_kernel[(n, hq)](
                mid_o, mid_l, qsl, out, *mid_o.stride(), *mid_l.stride(), *out.stride(), num_splits,
                HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(num_splits)), **kwargs,
            )
    return out


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  seq_lens: torch.Tensor, query_start_loc: torch.Tensor, max_query_len: int,
                  scale: Optional[float] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of packed query rows (any number per sequence, <= ``max_query_len``) over
    each sequence's cached keys, bottom-right causal. The new tokens must already be in
    the cache. Returns ``(T, Hq, D)`` in ``q.dtype``."""
    _check_device(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    t, hq, d = q.shape
    hkv = k_cache.shape[2]
    page = k_cache.shape[1]
    n = block_tables.shape[0]
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    max_q = int(max_query_len)
    if t == 0 or n == 0 or max_q <= 0:
        return out
    sm_scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    bt, sl, qsl = _as_i32(block_tables), _as_i32(seq_lens), _as_i32(query_start_loc)
    meta = _head_meta(d, page, q.dtype)
    maxq_key = min(max(triton.next_power_of_2(max_q), 16), 1 << 16)
    args = (
        q, k_cache, v_cache, bt, sl, qsl, out,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *bt.stride(), *out.stride(),
        hq // hkv, sm_scale * _LOG2E, maxq_key,
    )
    with _device_ctx(q):
        if _INTERPRET:
            block_m, block_n = INTERPRET_BLOCKS["prefill"]
            _prefill_kernel[(triton.cdiv(max_q, block_m), hq, n)](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n)
        else:
            grid = lambda m: (triton.cdiv(max_q, m["BLOCK_M"]), hq, n)  # noqa: E731
            _prefill_tuned[grid](*args, **meta)
    return out


def paged_attention_forward(q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens,
                            query_start_loc, max_query_len: int, max_seq_len: int,
                            scale: Optional[float] = None, num_splits: Optional[int] = None) -> torch.Tensor:
    """Write the step's K/V into the cache, then attend (decode kernel when
    ``max_query_len == 1``, else the prefill kernel). Inputs are assumed validated."""
    write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    if int(max_query_len) == 1:
        return paged_decode(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, max_seq_len,
                            scale=scale, num_splits=num_splits)
    return paged_prefill(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, max_query_len,
                         scale=scale)
