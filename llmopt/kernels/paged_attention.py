"""``llmopt::paged_attention``: attention of a continuous-batching step over a paged KV cache.

Contract
--------
A step packs the new tokens of N sequences into one flat batch:

* ``q`` ``(T, Hq, D)``, ``k``/``v`` ``(T, Hkv, D)``: the new tokens; sequence ``i`` owns
  rows ``query_start_loc[i]:query_start_loc[i+1]`` (``query_start_loc`` ``(N+1,)``).
* ``k_cache``/``v_cache`` ``(num_blocks, block_size, Hkv, D)`` (``block_size`` a power of
  two), mutated in place.
* ``slot_mapping`` ``(T,)``: cache slot ``block_id * block_size + offset`` of each new
  token; ``-1`` means "do not write".
* ``block_tables`` ``(N, max_blocks_per_seq)``: the physical block ids of each sequence,
  in order (entries past the sequence's last block are never read).
* ``seq_lens`` ``(N,)``: total tokens of each sequence after this step (prefix + new).
* ``max_query_len`` / ``max_seq_len``: upper bounds of the per-sequence new-token counts
  and ``seq_lens`` (they size the GPU grids; ``max_query_len == 1`` selects decode).
* ``scale`` None means ``1 / sqrt(D)``.
* ``append_masks`` (the Python CPU and ``gather_sdpa`` paths only, not the op's schema):
  ``{sequence index: (q_len, q_len) bool}`` replaces the causal rule among that sequence's
  new tokens: row ``r`` sees the cached prefix and the new tokens ``c`` with
  ``mask[r, c]`` (a token tree: tree speculation, lookahead decoding). The tokens'
  positions come from the caller (RoPE), not from their order.

The op first writes ``k[t]``, ``v[t]`` into the caches at ``slot_mapping[t]``, then for
sequence ``i`` with ``q_len`` new tokens and ``seq_len`` total, query row ``r`` sits at
position ``seq_len - q_len + r`` and attends the cached keys at positions ``0 ..`` that
position (bottom-right causal), read through ``block_tables[i]``. Query head ``h`` reads
kv head ``h // (Hq // Hkv)``; repeated heads are never materialised. fp16 / bf16 / fp32
(q, k, v and the caches share one dtype), fp32 accumulation, output ``(T, Hq, D)`` in
``q.dtype``. Output rows not owned by any sequence are unspecified (zero on CPU).

Implementations
---------------
* ``triton``: the kernels of :mod:`llmopt.kernels.triton_paged` (cache write kernel,
  split-KV decode kernel + reduction for ``max_query_len == 1``, prefill/append kernel
  otherwise). No host synchronisation.
* CPU: the cache is written with ``index_copy_``; the blocks of all sequences are gathered
  with one ``index_select`` and every sequence runs PyTorch's fused CPU flash-attention
  kernel on strided views of the gathered keys. A decode row (``q_len == 1``) folds the
  query heads of each GQA group into the query-length axis (no mask needed); a longer
  chunk puts the group into the batch axis with the key/value heads broadcast by a
  stride-0 view, and a bottom-right causal mask (or the kernel's own causal mode for a
  fresh prefill). A short causal append (``1 < q_len <= 16`` after a cached prefix, no
  ``append_masks`` entry: a speculative verification step) runs as ``q_len`` decode rows,
  row ``r`` of length ``seq_len - q_len + r + 1``: with the native decode kernel each
  row's output is then bit-identical to decoding that token alone (what plain greedy
  decoding computes), which int4 models need for speculation to be token-identical
  (their int8 activation rounding turns last-bit differences into whole steps). The
  PyTorch decode path (``impl="torch"``) batches rows in one flash call, which is not
  bit-invariant to the rows beside it.
* ``gather_sdpa``: plain PyTorch on any device (the CUDA default until the Triton
  kernels have a GPU record, see :mod:`llmopt.kernels.dispatch`): per sequence, gather
  its blocks and run ``scaled_dot_product_attention`` with ``enable_gqa``.
* The ``impl`` argument chooses: ``"auto"`` (the device's default: ``"native"`` on CPU,
  ``"gather_sdpa"`` on CUDA), ``"native"``, ``"torch"`` (the CPU path without the C
  kernel), ``"gather_sdpa"``, ``"triton"`` (CUDA, or CPU tensors under
  ``TRITON_INTERPRET=1``, so tests can drive the kernels through the op).
"""

from __future__ import annotations

import ctypes
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from llmopt.kernels import dispatch

__all__ = ["paged_attention"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)
_MIN_HEAD_DIM = 16
_MAX_HEAD_DIM = 256


# Triton's own switch (read once): lets tests run impl="triton" on CPU tensors, under the interpreter.
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def resolve_impl(impl: str, device: torch.device, native: bool = True) -> str:
    """The implementation a call with ``impl`` runs on ``device`` (:mod:`llmopt.kernels.dispatch`);
    ``native=False`` is the ``kernels.native`` option turned off."""
    return dispatch.resolve("paged_attention", impl, device.type, triton_interpret=_TRITON_INTERPRET,
                            native=native)


def uses_cpu_plan(impl: str) -> bool:
    """Whether a resolved ``impl`` is the planned CPU path (``paged_attention_cpu_planned``),
    which the runtime's layer op calls directly."""
    return impl in ("native", "torch")


@torch.library.custom_op("llmopt::paged_attention", mutates_args=("k_cache", "v_cache"))
def paged_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    max_query_len: int,
    max_seq_len: int,
    scale: Optional[float] = None,
    impl: str = "auto",
) -> Tensor:
    _validate(q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, query_start_loc,
              max_query_len, max_seq_len, scale)
    impl = resolve_impl(impl, q.device)
    if impl == "triton":
        from llmopt.kernels import triton_paged

        return triton_paged.paged_attention_forward(
            q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, query_start_loc,
            max_query_len, max_seq_len, scale,
        )
    if impl == "gather_sdpa":
        return _paged_attention_gather_sdpa(q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens,
                                            query_start_loc, scale)
    return _paged_attention_cpu(q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens,
                                query_start_loc, scale, native=impl == "native")


@paged_attention.register_fake
def _(q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, query_start_loc, max_query_len,
      max_seq_len, scale=None, impl="auto"):
    return q.new_empty(q.shape)


# ----------------------------------------------------------------------------- validation


def _fail(msg: str):
    raise ValueError(f"llmopt::paged_attention: {msg}")


def _validate(q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, query_start_loc,
              max_query_len, max_seq_len, scale) -> None:
    """Shape / dtype / device checks only (no data-dependent checks: no device sync)."""
    for name, t, nd, layout in (
        ("q", q, 3, "(T, Hq, D)"), ("k", k, 3, "(T, Hkv, D)"), ("v", v, 3, "(T, Hkv, D)"),
        ("k_cache", k_cache, 4, "(num_blocks, block_size, Hkv, D)"),
        ("v_cache", v_cache, 4, "(num_blocks, block_size, Hkv, D)"),
        ("slot_mapping", slot_mapping, 1, "(T,)"), ("block_tables", block_tables, 2, "(N, max_blocks_per_seq)"),
        ("seq_lens", seq_lens, 1, "(N,)"), ("query_start_loc", query_start_loc, 1, "(N + 1,)"),
    ):
        if t.dim() != nd:
            _fail(f"{name} must be {nd}-D {layout}, got shape {tuple(t.shape)}")
    if q.dtype not in _SUPPORTED_DTYPES:
        _fail(f"q dtype {q.dtype} is not supported (expected float16, bfloat16 or float32)")
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            _fail(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    for name, t in (("slot_mapping", slot_mapping), ("block_tables", block_tables), ("seq_lens", seq_lens),
                    ("query_start_loc", query_start_loc)):
        if t.dtype not in _INDEX_DTYPES:
            _fail(f"{name} must be int32 or int64, got {t.dtype}")
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache), ("slot_mapping", slot_mapping),
                    ("block_tables", block_tables), ("seq_lens", seq_lens), ("query_start_loc", query_start_loc)):
        if t.device != q.device:
            _fail(f"{name} is on {t.device} but q is on {q.device}")
    num_tokens, q_heads, head_dim = q.shape
    if tuple(k.shape) != tuple(v.shape):
        _fail(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != num_tokens:
        _fail(f"k/v have {k.shape[0]} tokens but q has {num_tokens}")
    if k.shape[2] != head_dim:
        _fail(f"head dim mismatch: q has D={head_dim}, k/v have D={k.shape[2]}")
    if not (_MIN_HEAD_DIM <= head_dim <= _MAX_HEAD_DIM):
        _fail(f"head dim D={head_dim} is out of the supported range [{_MIN_HEAD_DIM}, {_MAX_HEAD_DIM}]")
    kv_heads = k.shape[1]
    if kv_heads == 0 or q_heads % kv_heads != 0:
        _fail(f"number of query heads ({q_heads}) must be a multiple of the number of kv heads ({kv_heads})")
    if tuple(k_cache.shape) != tuple(v_cache.shape):
        _fail(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    block_size = k_cache.shape[1]
    if tuple(k_cache.shape[2:]) != (kv_heads, head_dim):
        _fail(f"caches must be (num_blocks, block_size, Hkv={kv_heads}, D={head_dim}), got {tuple(k_cache.shape)}")
    if block_size <= 0 or block_size & (block_size - 1):
        _fail(f"block_size must be a power of two, got {block_size}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        _fail("caches must be contiguous along the head dim (stride(-1) == 1)")
    if slot_mapping.shape[0] != num_tokens:
        _fail(f"slot_mapping must have one entry per new token ({num_tokens}), got {slot_mapping.shape[0]}")
    num_seqs = block_tables.shape[0]
    if seq_lens.shape[0] != num_seqs:
        _fail(f"seq_lens must have one entry per sequence ({num_seqs} block-table rows), got {seq_lens.shape[0]}")
    if query_start_loc.shape[0] != num_seqs + 1:
        _fail(f"query_start_loc must have N + 1 = {num_seqs + 1} entries, got {query_start_loc.shape[0]}")
    if num_seqs > 65535 or q_heads > 65535:
        _fail(f"at most 65535 sequences and 65535 query heads are supported, got {num_seqs} and {q_heads}")
    for name, val in (("max_query_len", max_query_len), ("max_seq_len", max_seq_len)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            _fail(f"{name} must be a non-negative int, got {val!r}")
    if max_query_len > max_seq_len:
        _fail(f"max_query_len ({max_query_len}) cannot exceed max_seq_len ({max_seq_len})")
    if scale is not None and not isinstance(scale, (int, float)):
        _fail(f"scale must be a float or None, got {scale!r}")


# ----------------------------------------------------------------------------- CPU path


def _write_cache_cpu(k, v, k_cache, v_cache, slot_mapping) -> None:
    if slot_mapping.numel() == 0:
        return
    slots = slot_mapping.to(torch.int64)
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    if bool((slots >= num_blocks * block_size).any()):
        _fail(f"slot_mapping holds slots past the cache's {num_blocks * block_size} slots")
    valid = slots >= 0
    if not bool(valid.all()):
        slots, k, v = slots[valid], k[valid], v[valid]
    for cache, new in ((k_cache, k), (v_cache, v)):
        if cache.is_contiguous():
            cache.view(num_blocks * block_size, kv_heads, head_dim).index_copy_(0, slots, new)
        else:
            cache.index_put_((slots // block_size, slots % block_size), new)


def _paged_attention_cpu(q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, query_start_loc,
                         scale, native=True):
    plan = plan_cpu_step(block_tables, seq_lens, query_start_loc, k_cache.shape[1], k_cache.shape[0],
                         q.shape[0], q.dtype)
    return paged_attention_cpu_planned(q, k, v, k_cache, v_cache, slot_mapping, plan, scale, native=native)


def _paged_attention_gather_sdpa(q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens,
                                 query_start_loc, scale, append_masks=None):
    """Plain PyTorch on any device (the CUDA default until the Triton kernels have a
    GPU record): write the cache, then per sequence gather its blocks and run
    ``scaled_dot_product_attention`` with ``enable_gqa`` and a bottom-right causal
    mask. Reads the step's lengths on the host (one sync a call)."""
    num_tokens, q_heads, head_dim = q.shape
    num_blocks, block_size, kv_heads, _ = k_cache.shape
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    _write_cache_cpu(k, v, k_cache, v_cache, slot_mapping)
    out = q.new_zeros(q.shape)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for i, q0, q1, seq_len, nb in _sequence_spans(block_tables, seq_lens, query_start_loc,
                                                 block_size, num_tokens):
        q_len = q1 - q0
        blocks = block_tables[i, :nb].to(torch.int64)
        if bool(((blocks < 0) | (blocks >= num_blocks)).any()):
            _fail(f"block_tables holds block ids outside [0, {num_blocks})")
        keys = k_cache.index_select(0, blocks).reshape(-1, kv_heads, head_dim)[:seq_len].transpose(0, 1)
        values = v_cache.index_select(0, blocks).reshape(-1, kv_heads, head_dim)[:seq_len].transpose(0, 1)
        mask = None
        if append_masks and i in append_masks:
            mask = append_mask(append_masks[i], seq_len, torch.bool).to(q.device)[0, 0]
        elif 1 < q_len < seq_len:  # bottom-right causal; q_len == seq_len is the kernel's own causal mode
            rows = torch.arange(q_len, device=q.device).unsqueeze(1)
            mask = torch.arange(seq_len, device=q.device).unsqueeze(0) <= rows + (seq_len - q_len)
        o = sdpa(q[q0:q1].transpose(0, 1)[None], keys[None], values[None], attn_mask=mask,
                 is_causal=mask is None and q_len == seq_len and q_len > 1, scale=scale,
                 enable_gqa=q_heads != kv_heads)
        out[q0:q1] = o[0].transpose(0, 1)
    return out


@dataclass
class _PrefillPlan:
    q0: int
    q1: int
    seq_len: int
    blocks: Tensor  # the sequence's block ids, in order
    mask: Optional[Tensor]  # bottom-right causal (1, 1, q_len, seq_len) additive mask; None: fresh prefill


@dataclass
class _DecodeGroup:
    rows: Tensor  # (n,) query rows of these decode sequences
    blocks: Tensor  # (n * width,) block ids, padded with block 0
    mask: Tensor  # (n, 1, 1, width * block_size) additive: -inf past each sequence's end


@dataclass
class _NativeDecode:
    rows: Tensor  # (n,) int64 query rows of the decode sequences
    seq_lens: Tensor  # (n,) int64
    block_tables: Tensor  # (n, max_blocks) int64, contiguous


class CpuStepPlan:
    """What every layer of one step shares on the CPU path: computed once, used L times.

    Decode rows (one new token) run in the native kernel
    (``kernels/native/paged_decode.c``), which reads each sequence's blocks in
    place. Without it they are attended in a few batched calls: the sequences
    sorted by length and cut into groups of similar length, each group's
    blocks gathered into a padded layout with an additive mask hiding the
    padding (sorting keeps the padding, and the copy, small). Short causal
    appends are decode rows too (one per new token, see :func:`plan_cpu_step`);
    longer chunks, fresh prefills and token trees run one call each.
    """

    def __init__(self, decode: list, table: Tensor, block_size: int, dtype, prefills: list[_PrefillPlan]):
        self.prefills = prefills
        self._decode = sorted(decode, key=lambda entry: entry[1])
        self._table = table
        self._block_size = block_size
        self._dtype = dtype
        self._groups: Optional[list[_DecodeGroup]] = None
        self._native: Optional[_NativeDecode] = None

    @property
    def decode_groups(self) -> list[_DecodeGroup]:
        if self._groups is None:
            entries = self._decode
            self._groups = [_decode_group(entries[i:i + _DECODE_GROUP], self._table, self._block_size,
                                          self._dtype) for i in range(0, len(entries), _DECODE_GROUP)]
        return self._groups

    @property
    def native_decode(self) -> Optional[_NativeDecode]:
        if self._native is None and self._decode:
            rows = torch.tensor([e[0] for e in self._decode], dtype=torch.int64)
            lens = torch.tensor([e[1] for e in self._decode], dtype=torch.int64)
            index = torch.tensor([e[3] for e in self._decode], dtype=torch.int64)
            self._native = _NativeDecode(rows, lens, self._table.index_select(0, index).contiguous())
        return self._native


def _sequence_spans(block_tables, seq_lens, query_start_loc, block_size: int, num_tokens: int):
    """``(i, q0, q1, seq_len, blocks)`` for each sequence with new tokens, checked against the
    step's layout (read on the host: one sync a call)."""
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    max_blocks = block_tables.shape[1]
    for i, seq_len in enumerate(lens):
        q0, q1 = starts[i], starts[i + 1]
        q_len = q1 - q0
        if q_len < 0 or q_len > seq_len:
            _fail(f"sequence {i} has {q_len} new tokens but seq_len {seq_len}")
        if q1 > num_tokens:
            _fail(f"query_start_loc[{i + 1}] = {q1} exceeds the {num_tokens} query rows")
        if q_len == 0:
            continue
        nb = -(-seq_len // block_size)
        if nb > max_blocks:
            _fail(f"sequence {i} needs {nb} blocks for seq_len {seq_len}, block_tables has {max_blocks} columns")
        yield i, q0, q1, seq_len, nb


_DECODE_GROUP = 16  # sequences per batched decode call (PyTorch path)
# Causal appends of at most this many new tokens (not fresh prefills, not token trees) run
# as that many decode rows: bit-identical to decoding the tokens one by one (speculative
# verification must reproduce plain greedy decoding exactly), at the cost of reading the
# sequence's cache once per row instead of once.
_APPEND_AS_DECODE = 16


def plan_cpu_step(block_tables, seq_lens, query_start_loc, block_size: int, num_blocks: int,
                  num_tokens: int, dtype, append_masks=None) -> CpuStepPlan:
    """``append_masks``: ``{sequence index: (q_len, q_len) bool}``, see the module's contract.

    Decode entries are ``(query row, seq_len, blocks, sequence index)``; a causal append of
    ``1 < q_len <= _APPEND_AS_DECODE`` tokens after a cached prefix becomes ``q_len`` of
    them (row ``r`` sees the first ``seq_len - q_len + r + 1`` cached tokens: the step's
    own are written before attention), so the native kernel computes each exactly as a
    one-token decode step would."""
    table = block_tables.to(torch.int64)
    decode, prefills = [], []
    for i, q0, q1, seq_len, nb in _sequence_spans(block_tables, seq_lens, query_start_loc,
                                                 block_size, num_tokens):
        q_len = q1 - q0
        if append_masks and i in append_masks:
            prefills.append(_PrefillPlan(q0, q1, seq_len, table[i, :nb],
                                         append_mask(append_masks[i], seq_len, dtype)))
        elif q_len == 1:
            decode.append((q0, seq_len, nb, i))
        elif q_len <= _APPEND_AS_DECODE and q_len < seq_len:
            # A short causal append (a verification step): row r is the decode of the token at
            # position seq_len - q_len + r, whose keys (this step's included) are cached by now,
            # so it gets exactly the arithmetic plain decoding gives that token.
            for r in range(q_len):
                row_len = seq_len - q_len + r + 1
                decode.append((q0 + r, row_len, -(-row_len // block_size), i))
        else:
            mask = None if q_len == seq_len else _bottom_right_mask(q_len, seq_len, dtype)
            prefills.append(_PrefillPlan(q0, q1, seq_len, table[i, :nb], mask))
    used = [table[i, :nb] for _, _, nb, i in decode] + [p.blocks for p in prefills]
    if used:
        ids = torch.cat(used)
        if bool(((ids < 0) | (ids >= num_blocks)).any()):
            _fail(f"block_tables holds block ids outside [0, {num_blocks})")
    return CpuStepPlan(decode, table, block_size, dtype, prefills)


def _decode_group(entries, table, block_size: int, dtype) -> _DecodeGroup:
    width = max(nb for _, _, nb, _ in entries)
    blocks = torch.zeros((len(entries), width), dtype=torch.int64)
    mask = torch.full((len(entries), width * block_size), float("-inf"), dtype=dtype)
    for row, (_, seq_len, nb, i) in enumerate(entries):
        blocks[row, :nb] = table[i, :nb]
        mask[row, :seq_len] = 0.0
    rows = torch.tensor([q0 for q0, _, _, _ in entries], dtype=torch.int64)
    return _DecodeGroup(rows, blocks.flatten(), mask[:, None, None, :])


_NATIVE_DTYPES = {torch.float32: "paged_decode_f32", torch.bfloat16: "paged_decode_bf16"}


def _native_decode_fn(q: Tensor, k_cache: Tensor):
    """The native decode kernel for these tensors, or None (then the PyTorch path runs)."""
    if q.dtype not in _NATIVE_DTYPES:
        return None
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    if q.shape[1] // kv_heads > 32 or head_dim > 256 or block_size > 128 or not k_cache.is_contiguous():
        return None  # the kernel's fixed per-thread buffers
    from llmopt.kernels import native
    lib = native.load("paged_decode")
    return None if lib is None else getattr(lib, _NATIVE_DTYPES[q.dtype])


def _run_native_decode(fn, q, k_cache, v_cache, out, plan: _NativeDecode, scale: float) -> None:
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    ptr = ctypes.c_void_p
    status = fn(ptr(q.data_ptr()), ptr(k_cache.data_ptr()), ptr(v_cache.data_ptr()), ptr(out.data_ptr()),
                ptr(plan.rows.data_ptr()), ptr(plan.seq_lens.data_ptr()), ptr(plan.block_tables.data_ptr()),
                ctypes.c_int64(plan.block_tables.shape[1]), ctypes.c_int64(plan.rows.shape[0]),
                ctypes.c_int64(q.shape[1]), ctypes.c_int64(kv_heads), ctypes.c_int64(head_dim),
                ctypes.c_int64(block_size), ctypes.c_float(scale))
    if status != 0:
        _fail("the native paged decode kernel rejected its shapes")


def paged_attention_cpu_planned(q, k, v, k_cache, v_cache, slot_mapping, plan: CpuStepPlan, scale,
                                native: bool = True):
    """The CPU implementation, given the step's plan (see :func:`plan_cpu_step`);
    ``native=False`` (impl ``"torch"``) keeps decode rows off the C kernel."""
    num_tokens, q_heads, head_dim = q.shape
    num_blocks, block_size, kv_heads, _ = k_cache.shape
    group = q_heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    _write_cache_cpu(k, v, k_cache, v_cache, slot_mapping)  # after the plan's checks: no half-done step
    out = q.new_zeros((num_tokens, q_heads, head_dim))
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    native = _native_decode_fn(q, k_cache) if native and plan.native_decode is not None else None
    if native is not None:
        _run_native_decode(native, q.contiguous(), k_cache, v_cache, out, plan.native_decode, scale)
    for group_plan in ([] if native is not None else plan.decode_groups):
        n = group_plan.rows.shape[0]
        # (n, Hkv, Lpad, D) strided views of the gathered blocks; the group's query
        # heads are the rows of one query tile (no causal mask: each row is last).
        keys = k_cache.index_select(0, group_plan.blocks).view(n, -1, kv_heads, head_dim)
        values = v_cache.index_select(0, group_plan.blocks).view(n, -1, kv_heads, head_dim)
        qd = q.index_select(0, group_plan.rows).view(n, kv_heads, group, head_dim)
        o, _ = flash(qd, keys.transpose(1, 2), values.transpose(1, 2), 0.0, False,
                     attn_mask=group_plan.mask, scale=scale)
        out.index_copy_(0, group_plan.rows, o.reshape(n, q_heads, head_dim))
    for p in plan.prefills:
        q_len = p.q1 - p.q0
        kh = k_cache.index_select(0, p.blocks).view(-1, kv_heads, head_dim)[:p.seq_len]
        vh = v_cache.index_select(0, p.blocks).view(-1, kv_heads, head_dim)[:p.seq_len]
        # Group in the batch axis: (G, Hkv, q_len, D) queries against stride-0 broadcast keys.
        qb = q[p.q0:p.q1].view(q_len, kv_heads, group, head_dim).permute(2, 1, 0, 3)
        kb = kh.transpose(0, 1).unsqueeze(0).expand(group, kv_heads, p.seq_len, head_dim)
        vb = vh.transpose(0, 1).unsqueeze(0).expand(group, kv_heads, p.seq_len, head_dim)
        if p.mask is None:
            o, _ = flash(qb, kb, vb, 0.0, True, scale=scale)  # top-left == bottom-right here
        else:
            o, _ = flash(qb, kb, vb, 0.0, False, attn_mask=p.mask, scale=scale)
        out[p.q0:p.q1] = o.permute(2, 1, 0, 3).reshape(q_len, q_heads, head_dim)
    return out


def _bottom_right_mask(q_len: int, seq_len: int, dtype) -> Tensor:
    """(1, 1, q_len, seq_len) additive mask: row r sees keys <= seq_len - q_len + r."""
    rows = torch.arange(q_len).unsqueeze(1)
    cols = torch.arange(seq_len).unsqueeze(0)
    hidden = cols > rows + (seq_len - q_len)
    return torch.zeros((q_len, seq_len), dtype=dtype).masked_fill_(hidden, float("-inf"))[None, None]


def append_mask(visible: Tensor, seq_len: int, dtype) -> Tensor:
    """(1, 1, q_len, seq_len) mask: every row sees the cached prefix, and among the new
    tokens those ``visible`` (q_len, q_len) marks. Additive (0 / -inf) for a float
    ``dtype``, boolean (True: attend) for ``torch.bool``."""
    q_len = visible.shape[0]
    if tuple(visible.shape) != (q_len, q_len) or q_len > seq_len:
        _fail(f"an append mask must be (q_len, q_len) with q_len <= seq_len ({seq_len}), "
              f"got {tuple(visible.shape)}")
    if not bool(visible.diagonal().all()):
        _fail("an append mask must let every new token see itself (its diagonal all True)")
    seen = torch.ones((q_len, seq_len), dtype=torch.bool)
    seen[:, seq_len - q_len:] = visible.to(device="cpu", dtype=torch.bool)
    if dtype == torch.bool:
        return seen[None, None]
    return torch.zeros((q_len, seq_len), dtype=dtype).masked_fill_(~seen, float("-inf"))[None, None]
