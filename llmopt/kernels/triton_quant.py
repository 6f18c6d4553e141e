"""Triton kernels for weight-quantized matmuls: int8 and int4 weight-only, fp8.

``out (M, N) = x (M, K) @ dequant(W).T`` in x's dtype, for the weight formats
of :mod:`llmopt.kernels.quantized_linear` (int8 per-channel, int4 group-wise
in the nibble layout, fp8 e4m3 per-channel). One kernel body, specialised by
``MODE`` (a constexpr), with two schedules:

* GEMV (decode, ``M <= GEMV_MAX_ROWS``): one program per (block of N output
  features, slice of K); it streams its ``(BLOCK_N, BLOCK_K)`` weight tiles
  once, dequantizes them in fp32 and reduces ``x * w`` over K for all M rows in
  registers, no ``tl.dot`` (which needs >= 16 rows). Split-K: decode-sized N
  alone gives too few programs to fill a GPU, so K is split until there are
  about ``GEMV_TARGET_PROGRAMS``; the fp32 partial sums are added afterwards.
* GEMM (prefill): classic ``(BLOCK_M, BLOCK_N)`` output tiles; each K step
  dequantizes the weight tile to x's dtype and feeds ``tl.dot`` (fp32
  accumulation, IEEE for fp32 inputs).

int8 and fp8 weights are exact in fp16/bf16/fp32, so their per-channel scale is
applied once to the accumulator; int4 is dequantized per tile with its
group's scale and zero (``BLOCK_K`` divides the group size, so one tile sits in
one group). Under ``TRITON_INTERPRET=1`` small fixed blocks keep CPU tests
quick; on GPU the blocks are fixed too (not autotuned, and not yet timed on a
GPU). fp8 weights need a GPU with fp8 conversions (compute capability 8.9+). The interpreter
has no bf16 ``tl.dot``: test fp32 / fp16 there.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

MODE_INT8, MODE_INT4, MODE_FP8 = 0, 1, 2
GEMV_MAX_ROWS = 8
# (BLOCK_M, BLOCK_N, BLOCK_K); the interpreter's cost grows with the tile, so keep them small there.
GEMM_BLOCKS = (16, 16, 32) if _INTERPRET else (64, 64, 64)
GEMV_BLOCKS = (16, 32) if _INTERPRET else (32, 64)  # (BLOCK_N, BLOCK_K)
# Programs a GEMV launch aims for: a few per SM on a GPU; under the interpreter
# enough for the test shapes to take the split-K path.
GEMV_TARGET_PROGRAMS = 4 if _INTERPRET else 512


@triton.jit
def _weight_tile(w_ptr, sz_ptr, offs_n, offs_k, k0, N, K, stride_wn, stride_sg, stride_sn,
                 GROUP_SIZE: tl.constexpr, MODE: tl.constexpr):
    """The (BLOCK_N, BLOCK_K) weight tile at output rows offs_n and K columns offs_k, fp32.

    int4 tiles come out dequantized; int8 / fp8 tiles unscaled (scaled after the K loop).
    """
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    if MODE == 1:
        packed = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] // 2, mask=mask, other=0)
        q = (packed.to(tl.int32) >> ((offs_k[None, :] & 1) * 4)) & 15
        group = k0 // GROUP_SIZE
        sz = sz_ptr + group * stride_sg + offs_n * stride_sn
        scale = tl.load(sz, mask=offs_n < N, other=0.0).to(tl.float32)
        zero = tl.load(sz + 1, mask=offs_n < N, other=0.0).to(tl.float32)
        return (q.to(tl.float32) - 8.0) * scale[:, None] + zero[:, None]
    # No ``other=``: it cannot be cast to fp8. Masked lanes are zeroed after the
    # conversion instead (their garbage could be an fp8 NaN, and NaN * 0 is NaN).
    w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask)
    return tl.where(mask, w.to(tl.float32), 0.0)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, partial_ptr, M, N, K, stride_xm, stride_wn, stride_sg, stride_sn,
                 GROUP_SIZE: tl.constexpr, MODE: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """partial[split, :M, block of N]: all M (<= ROWS) rows against one weight tile
    stream, over this program's share of K (split-K)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    blocks_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), tl.num_programs(1))
    k_begin = split * blocks_per_split * BLOCK_K
    k_end = tl.minimum(K, k_begin + blocks_per_split * BLOCK_K)
    rows = tl.arange(0, ROWS)
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :],
                    mask=(rows[:, None] < M) & (offs_k[None, :] < K), other=0.0).to(tl.float32)
        w = _weight_tile(w_ptr, s_ptr, offs_n, offs_k, k0, N, K, stride_wn, stride_sg, stride_sn,
                         GROUP_SIZE, MODE)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    if MODE != 1:
        acc *= tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out = partial_ptr + (split * M + rows[:, None]) * N + offs_n[None, :]
    tl.store(out, acc, mask=(rows[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K,
                 stride_xm, stride_wn, stride_sg, stride_sn, stride_om,
                 GROUP_SIZE: tl.constexpr, MODE: tl.constexpr, DOT_PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = _weight_tile(w_ptr, s_ptr, offs_n, offs_k, k0, N, K, stride_wn, stride_sg, stride_sn,
                         GROUP_SIZE, MODE)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=DOT_PREC)
    if MODE != 1:
        acc *= tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def int8_matmul(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    """x (M, K) @ (qweight int8 (N, K) * scales (N,)[:, None]).T."""
    return _launch(x, qweight, scales.float().contiguous(), MODE_INT8, group_size=1)


def fp8_matmul(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    """x (M, K) @ (qweight float8_e4m3fn (N, K) * scales (N,)[:, None]).T."""
    return _launch(x, qweight, scales.float().contiguous(), MODE_FP8, group_size=1)


def int4_matmul(x: Tensor, qweight: Tensor, scales_zeros: Tensor, group_size: int) -> Tensor:
    """x (M, K) @ dequant(nibble-packed qweight (N, Kp/2), scales_zeros (Kp/g, N, 2)).T; K <= Kp."""
    if x.shape[1] > qweight.shape[1] * 2:
        raise ValueError(f"int4_matmul: x has K={x.shape[1]} columns, the weight only {qweight.shape[1] * 2}")
    return _launch(x, qweight, scales_zeros.float().contiguous(), MODE_INT4, group_size)


# How many quantized matmuls these kernels have run in this process, read through
# launch_count() (tests check that a path really reached Triton); only this module writes it.
_LAUNCHES = [0]


def launch_count() -> int:
    """The number of quantized matmuls the Triton kernels ran so far in this process."""
    return _LAUNCHES[0]


def _launch(x: Tensor, w: Tensor, s: Tensor, mode: int, group_size: int) -> Tensor:
    _LAUNCHES[0] += 1
    if not _INTERPRET and x.device.type != "cuda":
        raise ValueError(
            f"the Triton quantized-matmul kernels need CUDA tensors (got {x.device}); "
            "set TRITON_INTERPRET=1 before importing triton to run them on CPU"
        )
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"Triton quantized matmul: x must be fp32, fp16 or bf16, got {x.dtype}")
    x, w = x.contiguous(), w.contiguous()
    m, k = x.shape
    n = w.shape[0]
    # int4 scale rows are groups of K: stride over groups, then over N (pairs of scale, zero).
    stride_sg, stride_sn = (s.stride(0), s.stride(1)) if mode == MODE_INT4 else (0, 1)
    stride = (x.stride(0), w.stride(0), stride_sg, stride_sn)
    if m <= GEMV_MAX_ROWS:
        return _gemv(x, w, s, mode, group_size, stride)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_m, block_n, block_k = GEMM_BLOCKS
    block_k = _fit_group(block_k, group_size, mode)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    prec = "ieee" if x.dtype == torch.float32 else "tf32"  # ignored for 16-bit inputs
    _gemm_kernel[grid](x, w, s, out, m, n, k, *stride, out.stride(0), GROUP_SIZE=group_size, MODE=mode,
                       DOT_PREC=prec, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def _gemv(x: Tensor, w: Tensor, s: Tensor, mode: int, group_size: int, stride: tuple) -> Tensor:
    m, k = x.shape
    n = w.shape[0]
    block_n, block_k = GEMV_BLOCKS
    block_k = _fit_group(block_k, group_size, mode)
    n_blocks, k_blocks = triton.cdiv(n, block_n), triton.cdiv(k, block_k)
    # Split K until there are enough programs to fill the GPU (decode-sized N alone
    # gives only a handful); each split writes fp32 partial sums, added below.
    split = max(1, min(k_blocks, triton.cdiv(GEMV_TARGET_PROGRAMS, n_blocks)))
    partial = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    _gemv_kernel[(n_blocks, split)](x, w, s, partial, m, n, k, *stride, GROUP_SIZE=group_size, MODE=mode,
                                    ROWS=triton.next_power_of_2(m), BLOCK_N=block_n, BLOCK_K=block_k)
    return partial.sum(dim=0).to(x.dtype)


def _fit_group(block_k: int, group_size: int, mode: int) -> int:
    """An int4 K tile must lie inside one group (group sizes are powers of two >= 32)."""
    return min(block_k, group_size) if mode == MODE_INT4 else block_k
