"""Quantized linear layers as custom ops: ``llmopt::linear_int8``, ``linear_int4``,
``linear_fp8`` and ``linear_w8a8``.

Each op computes ``x @ dequant(W).T (+ bias)`` for ``x`` of shape ``(..., K)``
and returns ``(..., N)`` in ``x``'s dtype. Weight formats (``N`` output
features, ``K`` input features; :mod:`llmopt.quantization` produces them):

* int8 (weight-only, symmetric, per output channel): ``qweight`` int8
  ``(N, K)``, ``scales`` ``(N,)``; ``W = qweight * scales[:, None]``.
* int4 (weight-only, asymmetric, group-wise along K): ``qweight`` uint8
  ``(N, Kp/2)`` with ``Kp`` = K rounded up to the group size (the padding
  columns are zero weights; inputs are zero-padded to match), and
  ``scales_zeros`` ``(Kp/g, N, 2)``; for ``k`` in group ``j``,
  ``W[n, k] = (q[n, k] - 8) * scales_zeros[j, n, 0] + scales_zeros[j, n, 1]``
  with ``q`` in 0..15 (the "float zero point" convention of PyTorch's int4
  kernels). Three layouts of ``qweight``: ``"nibble"`` (byte ``k // 2``, low
  nibble for even ``k``: the saved format, read by the Triton kernels),
  ``"cpu_tiled"`` (what ``aten._convert_weight_to_int4pack_for_cpu`` makes of
  it; same shape, different order) and ``"cpu_native"`` (llmopt's C kernel,
  below: same shapes, tiles of 16 rows, bf16 scales in tile order).
* fp8: ``qweight`` ``float8_e4m3fn`` ``(N, K)``, ``scales`` ``(N,)``.
* w8a8: int8 weights as for int8, activations quantized per token
  (symmetric int8, scale ``max|x_row| / 127``) on every call; optional
  ``smooth`` ``(K,)`` (SmoothQuant): the weight was multiplied by it before
  quantization, so ``x`` is divided by it here.

What PyTorch 2.13's CPU build offers (checked against fp64 references):

* ``aten._weight_int8pack_mm(x (M, K), qweight int8 (N, K), scales (N,))``:
  ``x`` fp32, bf16 or fp16, ``scales`` in ``x``'s dtype. fp32 and fp16 take
  any N and K; bf16 needs ``K % 16 == 0`` (otherwise NaN / garbage, or a
  segfault). So int8 weights installed for CPU are zero-padded to a multiple
  of 16 columns (``qweight`` may be wider than ``x``; ``x`` is zero-padded to
  match), and the op never hands that kernel a bf16 K that is not.
* ``aten._convert_weight_to_int4pack_for_cpu(q int32 (N, K) in 0..15, 1)`` ->
  uint8 ``(N, K/2)`` (a tiled order, not plain nibbles; the inner-k-tiles
  argument makes no difference on CPU); requires ``N % 16 == 0``.
  ``aten._weight_int4pack_mm_for_cpu(x, packed, g, scales_zeros (K/g, N, 2))``:
  ``x`` fp32, bf16 or fp16 with ``scales_zeros`` in the same dtype, ``g`` in
  {32, 64, 128, 256}, ``K % g == 0``; computes the formula above.
* Both packed kernels are far slower with fp32 activations than with bf16, so
  fp32 inputs run in bf16 (:func:`cpu_compute_dtype`; int8 keeps its fp32
  scales, applied after the kernel; int4 scales are installed in bf16).
* ``torch._int_mm(a int8 (M, K), b int8 (K, N)) -> int32``: any M, N, K on
  CPU (CUDA wants M > 16 and multiples of 8); exact.
* fp8: no CPU fp8 matmul. The CPU path is emulated: the e4m3 weight is
  converted to ``x``'s dtype on every call and the per-channel scale applied to
  the product, so it saves memory but not time. On CUDA a Triton fp8 GEMM runs.

int4 on CPU, ``"cpu_native"`` (what the quantize pass installs when the kernel
builds; ``kernels/native/int4_gemv.c``): like llama.cpp's Q4 x Q8 dot
products, the activation row is quantized in the kernel, once per call, to
int8 per block of 32 columns (symmetric, scale ``max|x| / 127``), and each
block's dot product with the 4-bit weights is exact integer arithmetic
(AVX-512 VNNI ``vpdpbusd``; AVX2 / AVX-VNNI and portable C paths too); per
block the scales apply in fp32, the zero point through the block's int8 sum.
Any N, any M (rows four at a time over each tile of 16 weight rows), fp32 /
bf16 / fp16 inputs, output in ``x``'s dtype. Error: the activation rounding,
at most ``max|x_block| / 254`` per element (tests check the bound); against
the bf16 activations of PyTorch's kernel it is the same order (int8 per block
of 32 is ~7 bits with a local scale, bf16 8 bits). One layout serves every
M (decode rows and prefill), so there is no second copy for large M (its
timings against PyTorch's kernel: docs/PERFORMANCE.md).
The option ``kernels={"int4_cpu_kernel": "torch"}`` installs PyTorch's layout instead,
as does exactness mode (``kernels={"quant_cpu_dtype": "float32"}``: no activation
rounding; a native-layout weight called with ``compute_dtype=torch.float32``
dequantizes to fp32), and a missing C compiler or ``kernels={"native": False}``. CPU calls of ``linear_int4``
reach its body straight from the dispatcher: the op is defined with
``torch.library`` rather than ``custom_op``, whose Python wrappers cost about
as much a call as the kernel of a small decode layer (docs/PERFORMANCE.md).

Other dtypes (fp64), int4 weights whose N is not a multiple of 16 without the
native kernel (kept in the nibble layout) and int8/int4 on a device without a kernel run a
dequantize-then-matmul reference. On CUDA, int8/int4/fp8 run the Triton
kernels of :mod:`llmopt.kernels.triton_quant` when ``impl="triton"`` (the
option ``kernels={"quantized_linear": "triton"}``; with ``TRITON_INTERPRET=1``
CPU tensors too, for tests).

Every switch is an argument of the op call, decided once by the quantize pass
(``passes/quantize_linear.py``) from the ``kernels`` options and recorded in the
Report: ``impl`` (``"auto"``, ``"torch"``, ``"triton"``) and, for int8/int4,
``compute_dtype`` (what fp32 inputs compute in on CPU; None: bf16). Nothing
here reads the environment or any process-wide switch per call.
"""

from __future__ import annotations

import ctypes
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from llmopt.kernels import dispatch

__all__ = [
    "INT4_LAYOUTS",
    "cpu_compute_dtype",
    "dequantize_fp8",
    "dequantize_int4",
    "dequantize_int8",
    "linear_fp8",
    "linear_int4",
    "linear_int8",
    "linear_w8a8",
    "pack_int4",
    "pad_int8_for_cpu",
    "quantize_per_token",
    "to_cpu_int4_layout",
    "to_cpu_native_int4_layout",
    "from_cpu_native_int4_layout",
    "native_int4_available",
    "unpack_int4",
]

INT4_LAYOUTS = ("nibble", "cpu_tiled", "cpu_native")
CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's own switch, read once


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation (``"torch"`` or ``"triton"``) option value ``impl`` runs on ``device``
    (:mod:`llmopt.kernels.dispatch`, op ``"quantized_linear"``). ValueError for one that cannot
    run there (``"triton"`` for CPU tensors without ``TRITON_INTERPRET=1``)."""
    return dispatch.resolve("quantized_linear", impl, device.type, triton_interpret=_TRITON_INTERPRET)


def use_triton(device: torch.device, impl: str = "auto") -> bool:
    """Whether the Triton kernels run for ``impl`` on ``device``. By default no: on CUDA too
    the PyTorch paths run (dequantize + matmul, ``torch._int_mm``) until ``triton_quant`` has
    a GPU record; ``impl="triton"`` selects them."""
    return impl != "torch" and resolve_impl(impl, device) == "triton"


# ---------------------------------------------------------------- formats


def pack_int4(q: Tensor) -> Tensor:
    """``(N, K)`` integers in 0..15 (K even) -> uint8 ``(N, K/2)``, low nibble = even k."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``(N, K/2)`` -> uint8 ``(N, K)``."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def to_cpu_int4_layout(packed: Tensor) -> Tensor:
    """Nibble layout -> the tiled layout ``aten._weight_int4pack_mm_for_cpu`` reads."""
    # The converter takes one int32 per weight (0..15): unpack straight into int32.
    shifts = torch.tensor([0, 4], dtype=torch.int32, device=packed.device)
    q = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 15
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.flatten(-2), 1)


NATIVE_TILE = 16  # rows per tile of the "cpu_native" layout (see kernels/native/int4_gemv.c)


def _tile_spans(n: int):
    """``(start, stop, rows per tile)`` of the full 16-row tiles, then of the last, partial one."""
    full = n - n % NATIVE_TILE
    if full:
        yield 0, full, NATIVE_TILE
    if n > full:
        yield full, n, n - full


def _to_tiles(t: Tensor, inner: int) -> Tensor:
    """``(N, *middle, inner)`` -> flat, tile by tile: each tile of 16 rows (the last one
    of N % 16) ordered ``(*middle, row, inner)``."""
    parts = []
    for start, stop, rows in _tile_spans(t.shape[0]):
        block = t[start:stop].reshape((stop - start) // rows, rows, *t.shape[1:])
        order = (0, *range(2, t.dim()), 1, t.dim())
        parts.append(block.permute(order).reshape(-1))
    return torch.cat(parts)


def _from_tiles(flat: Tensor, shape: tuple) -> Tensor:
    """Inverse of :func:`_to_tiles` for a tensor of ``shape`` ``(N, *middle, inner)``."""
    n, middle, inner = shape[0], tuple(shape[1:-1]), shape[-1]
    per_row = flat.numel() // n
    parts = []
    for start, stop, rows in _tile_spans(n):
        block = flat[start * per_row: stop * per_row].reshape((stop - start) // rows, *middle, rows, inner)
        order = (0, len(middle) + 1, *range(1, len(middle) + 1), len(middle) + 2)
        parts.append(block.permute(order).reshape(stop - start, *middle, inner))
    return torch.cat(parts)


def to_cpu_native_int4_layout(packed: Tensor, scales_zeros: Tensor) -> tuple[Tensor, Tensor]:
    """Nibble layout + ``(Kp/g, N, 2)`` scales -> the ``"cpu_native"`` layout of the C kernel.

    Same shapes (``(N, Kp/2)`` uint8, ``(Kp/g, N, 2)``), reordered by tiles of 16
    rows; the scales and zero points are bf16 (the int4 grids are bf16-exact, and
    the PyTorch kernel takes them in bf16 too). Weight tile order: per block of 32
    columns, 4 chunks of 8 columns, 4 bytes per row: column ``8c + i`` in the low
    nibble of byte ``i``, ``8c + 4 + i`` in its high nibble.
    """
    n, half_kp = packed.shape
    q = unpack_int4(packed).reshape(n, half_kp // 16, 4, 2, 4)  # (row, block, chunk, nibble half, i)
    q = q[..., 0, :] | (q[..., 1, :] << 4)  # (row, block, chunk, 4 bytes)
    weight = _to_tiles(q.reshape(n, half_kp // 16 * 4, 4), 4).reshape(n, half_kp)
    sz = scales_zeros.to(torch.bfloat16).transpose(0, 1)  # (N, G, 2)
    return weight, _to_tiles(sz, 2).reshape(scales_zeros.shape)


def from_cpu_native_int4_layout(weight: Tensor, scales: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`to_cpu_native_int4_layout`: nibble layout and ``(Kp/g, N, 2)`` bf16 scales."""
    n, half_kp = weight.shape
    b = _from_tiles(weight.reshape(-1), (n, half_kp // 16 * 4, 4)).reshape(n, half_kp // 16, 4, 4)
    q = torch.stack((b & 15, b >> 4), dim=-2).reshape(n, -1)  # (row, Kp) in k order
    groups = scales.shape[0]
    sz = _from_tiles(scales.reshape(-1), (n, groups, 2)).transpose(0, 1).contiguous()
    return pack_int4(q), sz


def dequantize_int8(qweight: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    return (qweight.to(dtype) * scales.to(dtype)[:, None])


def dequantize_int4(packed: Tensor, scales_zeros: Tensor, group_size: int, dtype: torch.dtype) -> Tensor:
    """Nibble-layout int4 -> ``(N, Kp)`` weights (the padding columns included)."""
    q = unpack_int4(packed).to(dtype)
    scales = scales_zeros[..., 0].to(dtype).t().repeat_interleave(group_size, dim=1)
    zeros = scales_zeros[..., 1].to(dtype).t().repeat_interleave(group_size, dim=1)
    return (q - 8) * scales + zeros


def dequantize_fp8(qweight: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    return qweight.to(dtype) * scales.to(dtype)[:, None]


def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per row: ``x ~ q * scale``, ``scale`` (M, 1) fp32."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127.0
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale


# ---------------------------------------------------------------- ops


@torch.library.custom_op("llmopt::linear_int8", mutates_args=())
def linear_int8(x: Tensor, qweight: Tensor, scales: Tensor, bias: Optional[Tensor] = None,
                impl: str = "auto", compute_dtype: Optional[torch.dtype] = None) -> Tensor:
    x2 = _rows(x)
    if use_triton(x.device, impl):
        from llmopt.kernels import triton_quant

        out = triton_quant.int8_matmul(x2, qweight, scales)
    elif _cpu_int8_kernel_ok(x, qweight):
        x2 = _pad_columns(x2, qweight.shape[1])
        if (x.dtype == torch.float32 and cpu_compute_dtype(x.dtype, compute_dtype) == torch.bfloat16
                and qweight.shape[1] % 16 == 0):
            # Unit scales in the kernel, the fp32 scales after: no per-channel bf16 scale error.
            ones = torch.ones(qweight.shape[0], dtype=torch.bfloat16)
            out = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), qweight, ones).float() * scales
        else:
            out = torch.ops.aten._weight_int8pack_mm(x2, qweight, scales.to(x.dtype))
    else:
        out = x2 @ dequantize_int8(qweight, scales, x.dtype)[:, : x2.shape[1]].t()
    return _finish(out, x, bias)


@linear_int8.register_fake
def _(x, qweight, scales, bias=None, impl="auto", compute_dtype=None):
    return _out_like(x, qweight.shape[0])


def _linear_int4(
    x: Tensor,
    qweight: Tensor,
    scales_zeros: Tensor,
    group_size: int,
    layout: str = "nibble",
    bias: Optional[Tensor] = None,
    impl: str = "auto",
    compute_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    if layout == "cpu_native":
        return _linear_int4_native(x, qweight, scales_zeros, group_size, bias, compute_dtype)
    x2 = _rows(x)
    if layout == "cpu_tiled":
        if x.device.type != "cpu" or x.dtype not in CPU_KERNEL_DTYPES:
            raise ValueError(
                f"llmopt::linear_int4: layout 'cpu_tiled' needs CPU inputs in fp32/bf16/fp16, "
                f"got {x.dtype} on {x.device}"
            )
        x2 = _pad_columns(x2, qweight.shape[1] * 2)
        dtype = cpu_compute_dtype(x.dtype, compute_dtype)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(dtype), qweight, group_size, scales_zeros.to(dtype))
    elif layout != "nibble":
        raise ValueError(f"llmopt::linear_int4: layout {layout!r}; valid choices are {INT4_LAYOUTS}")
    elif use_triton(x.device, impl):
        from llmopt.kernels import triton_quant

        out = triton_quant.int4_matmul(x2, qweight, scales_zeros, group_size)
    else:
        weight = dequantize_int4(qweight, scales_zeros, group_size, x.dtype)[:, : x2.shape[1]]
        out = x2 @ weight.t()
    return _finish(out, x, bias)


# Defined through torch.library directly rather than custom_op: an op custom_op made
# costs several times this one's dispatch a call even with a plain CPU kernel, and
# a decode step of SmolLM2-135M makes 211 calls of small kernels (docs/PERFORMANCE.md).
# The body returns fresh tensors (no aliasing); no autograd (frozen weights).
_LIB = torch.library.Library("llmopt", "FRAGMENT")
_LIB.define("linear_int4(Tensor x, Tensor qweight, Tensor scales_zeros, SymInt group_size, "
            "str layout=\"nibble\", Tensor? bias=None, str impl=\"auto\", "
            "ScalarType? compute_dtype=None) -> Tensor")
_LIB.impl("linear_int4", _linear_int4, "CompositeExplicitAutograd")
linear_int4 = torch.ops.llmopt.linear_int4.default


def native_int4_available() -> bool:
    """Whether the ``"cpu_native"`` int4 kernel is built (the ``kernels`` options
    ``int4_cpu_kernel`` and ``native`` decide whether the quantize pass uses it)."""
    return _native_int4_fn() is not None


_NATIVE_INT4: list = []  # [the C function, or None], filled on first use


def _native_int4_fn():
    if not _NATIVE_INT4:
        from llmopt.kernels import native

        _NATIVE_INT4.append(native.function(
            "int4_gemv", "llmopt_int4_gemv", [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_int] * 2))
    return _NATIVE_INT4[0]


def _linear_int4_native(x: Tensor, qweight: Tensor, scales: Tensor, group_size: int,
                        bias: Optional[Tensor], compute_dtype: Optional[torch.dtype] = None) -> Tensor:
    """The ``"cpu_native"`` layout: int8 activations (per block of 32) times int4 weights in C.

    Exactness (``compute_dtype=torch.float32`` for fp32 inputs) and a missing library
    dequantize instead (fp32 weights, no activation quantization). Kept lean: this
    runs 211 times per decoded token of SmolLM2-135M.
    """
    dtype = x.dtype
    if not x.is_cpu or dtype not in CPU_KERNEL_DTYPES:
        raise ValueError(
            f"llmopt::linear_int4: layout 'cpu_native' needs CPU inputs in fp32/bf16/fp16, "
            f"got {dtype} on {x.device}"
        )
    if scales.dtype != torch.bfloat16 or not (qweight.is_contiguous() and scales.is_contiguous()):
        raise ValueError("llmopt::linear_int4: layout 'cpu_native' wants contiguous weights and bf16 scales "
                         "(made by to_cpu_native_int4_layout)")
    n, kp, k = qweight.shape[0], qweight.shape[1] * 2, x.shape[-1]
    fn = _NATIVE_INT4[0] if _NATIVE_INT4 else _native_int4_fn()
    if fn is None or (dtype == torch.float32 and cpu_compute_dtype(dtype, compute_dtype) == torch.float32):
        nibbles, scales_zeros = from_cpu_native_int4_layout(qweight, scales)
        weight = dequantize_int4(nibbles, scales_zeros, group_size, dtype)[:, :k]
        return _finish(_rows(x) @ weight.t(), x, bias)
    x2 = x  # the kernel reads rows of kp contiguous values: x itself when it has them
    if k != kp or dtype == torch.float16 or not x.is_contiguous():
        x2 = _pad_columns(x.reshape(-1, k).float() if dtype == torch.float16 else _rows(x), kp)
    out = torch.empty((*x.shape[:-1], n), dtype=x2.dtype)
    bf16 = int(dtype == torch.bfloat16)
    if fn(x2.data_ptr(), qweight.data_ptr(), scales.data_ptr(), out.data_ptr(), x2.numel() // kp, n, kp,
          group_size, bf16, bf16) != 0:
        raise ValueError(f"llmopt::linear_int4: the native kernel rejected K={kp}, group size {group_size}")
    if bias is not None:
        out.add_(bias.to(out.dtype))
    return out if dtype != torch.float16 else out.to(dtype)


@torch.library.register_fake("llmopt::linear_int4")
def _(x, qweight, scales_zeros, group_size, layout="nibble", bias=None, impl="auto", compute_dtype=None):
    return _out_like(x, qweight.shape[0])


@torch.library.custom_op("llmopt::linear_fp8", mutates_args=())
def linear_fp8(x: Tensor, qweight: Tensor, scales: Tensor, bias: Optional[Tensor] = None,
               impl: str = "auto") -> Tensor:
    x2 = _rows(x)
    if use_triton(x.device, impl):
        from llmopt.kernels import triton_quant

        out = triton_quant.fp8_matmul(x2, qweight, scales)
    else:
        # Emulated: e4m3 values are exact in fp16/bf16/fp32, so convert, multiply,
        # and apply the per-channel scale to the (M, N) product rather than the weight.
        out = (x2 @ qweight.to(x.dtype).t()) * scales.to(x.dtype)
    return _finish(out, x, bias)


@linear_fp8.register_fake
def _(x, qweight, scales, bias=None, impl="auto"):
    return _out_like(x, qweight.shape[0])


@torch.library.custom_op("llmopt::linear_w8a8", mutates_args=())
def linear_w8a8(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    smooth: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
) -> Tensor:
    x2 = _rows(x)
    if smooth is not None:
        x2 = x2 / smooth.to(x.dtype)
    xq, x_scale = quantize_per_token(x2)
    acc = _int8_matmul(xq, qweight)
    out = (acc.float() * x_scale * scales.float()).to(x.dtype)
    return _finish(out, x, bias)


@linear_w8a8.register_fake
def _(x, qweight, scales, smooth=None, bias=None):
    return _out_like(x, qweight.shape[0])


# ---------------------------------------------------------------- helpers


def _int8_matmul(xq: Tensor, qweight: Tensor) -> Tensor:
    """int8 (M, K) @ int8 (N, K).T -> int32, exact."""
    m, k = xq.shape
    n = qweight.shape[0]
    if xq.device.type == "cpu":
        return torch._int_mm(xq, qweight.t())
    if k % 8 == 0 and n % 8 == 0:
        # cuBLASLt's int8 GEMM wants M > 16: pad decode-sized batches with zero rows.
        rows = F.pad(xq, (0, 0, 0, 17 - m)) if m <= 16 else xq
        return torch._int_mm(rows, qweight.t())[:m]
    # Other shapes: fp64 holds every partial sum (|sum| <= 127^2 * K) exactly.
    return (xq.double() @ qweight.double().t()).to(torch.int32)


def cpu_compute_dtype(dtype: torch.dtype, compute_dtype: Optional[torch.dtype] = None) -> torch.dtype:
    """The activation dtype PyTorch's packed CPU int8/int4 kernels run in for ``dtype`` inputs.

    fp32 activations go in as bf16: those kernels' fp32 paths are many times slower
    than their bf16 paths at decode shapes (docs/PERFORMANCE.md), and a weight-only quantized layer has
    already traded more precision than bf16 rounding of its input costs.
    ``compute_dtype`` (the op call's argument, which the quantize pass sets from the
    ``kernels.quant_cpu_dtype`` option) decides for fp32 inputs; None: bf16.
    """
    if dtype != torch.float32:
        return dtype
    if compute_dtype is not None:
        return compute_dtype
    return torch.bfloat16


def _cpu_int8_kernel_ok(x: Tensor, qweight: Tensor) -> bool:
    if x.device.type != "cpu" or x.dtype not in CPU_KERNEL_DTYPES:
        return False
    return x.dtype != torch.bfloat16 or qweight.shape[1] % 16 == 0  # see the module docstring


def pad_int8_for_cpu(qweight: Tensor) -> Tensor:
    """Zero columns up to a multiple of 16, which the CPU kernel needs for bf16 inputs."""
    return _pad_columns(qweight, qweight.shape[1] + (-qweight.shape[1] % 16))


def _rows(x: Tensor) -> Tensor:
    """``(..., K)`` -> contiguous ``(M, K)``: the kernels want plain row-major rows."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def _pad_columns(x2: Tensor, width: int) -> Tensor:
    return x2 if x2.shape[1] == width else F.pad(x2, (0, width - x2.shape[1]))


def _finish(out: Tensor, x: Tensor, bias: Optional[Tensor]) -> Tensor:
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.to(x.dtype).reshape(*x.shape[:-1], out.shape[-1])


def _out_like(x: Tensor, n: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], n))
