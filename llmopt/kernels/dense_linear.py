"""``llmopt::dense_linear``: an fp32 linear layer whose few-row calls (decode) run llmopt's C kernel.

``dense_linear(x, weight, bias=None, min_rows=1, max_rows=8)`` computes
``F.linear(x, weight, bias)``. When ``x`` and ``weight`` are fp32 CPU tensors, ``weight``
is contiguous and ``x`` holds ``min_rows`` to ``max_rows`` rows, it runs
``kernels/native/f32_gemv.c``: the weight rows split over the OpenMP threads and
streamed once, each row used for every activation row. Every other call (prefill,
other dtypes and devices, a missing C compiler) is ``F.linear``.

Why: an fp32 decode step is one read of every weight, and PyTorch's CPU linear
(MKL) reads it well below the memory's rate for a few rows: from 3 rows on, on
Intel and AMD, because MKL switches from a matrix-vector to a matrix-matrix
product; and at 1 or 2 rows on AMD, where MKL's matrix-vector product runs on
one thread. On an Intel CPU MKL's 1- and 2-row products already stream at the
memory's rate, slightly faster than this kernel. :func:`default_min_rows` says
which rows go to the kernel on this CPU; the measurements are in
docs/PERFORMANCE.md (``bench/dense_linear.py``). Results differ from
``F.linear`` by the order of fp32 additions only (tests bound them against fp64).

The op reads the weight it is given (no copy, no packed layout), so a model's
parameters stay its parameters. No autograd: ``passes/route_dense_linear.py`` installs
it only in graphs that compute no gradients. Defined with ``torch.library`` directly,
like ``llmopt::linear_int4``: a decode step makes about 200 of these calls, and
``custom_op``'s Python wrappers would cost about as much as a small layer's kernel.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DEFAULT_NATIVE_ROWS", "default_min_rows", "dense_linear", "native_dense_available",
           "native_dense_calls"]

# Rows up to which the C kernel runs; above it MKL's sgemm (which blocks for cache)
# takes over. Chosen from bench/dense_linear.py's crossover.
DEFAULT_NATIVE_ROWS = 8


def default_min_rows() -> int:
    """The fewest rows the kernel takes on this CPU: 3 on an Intel CPU (MKL's 1- and
    2-row products already read at the memory's rate there), 1 elsewhere."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return 3 if "GenuineIntel" in line else 1
    except OSError:
        pass
    return 1

_NATIVE: list = []  # [the C function, or None], filled on first use
_CALLS = [0]  # calls the C kernel answered in this process (native_dense_calls)


def native_dense_calls() -> int:
    """How many calls the C kernel answered in this process (the others ran ``F.linear``)."""
    return _CALLS[0]


def _native_fn():
    if not _NATIVE:
        from llmopt.kernels import native

        _NATIVE.append(native.function("f32_gemv", "llmopt_f32_gemv", [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3))
    return _NATIVE[0]


def native_dense_available() -> bool:
    """Whether the C kernel builds on this machine (else every call is ``F.linear``)."""
    return _native_fn() is not None


def _dense_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, min_rows: int = 1,
                  max_rows: int = DEFAULT_NATIVE_ROWS) -> Tensor:
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    fn = _NATIVE[0] if _NATIVE else _native_fn()
    if (fn is None or rows > max_rows or rows < max(min_rows, 1) or x.dtype != torch.float32
            or weight.dtype != torch.float32 or not x.is_cpu or not weight.is_cpu
            or not weight.is_contiguous() or weight.shape[1] != k):
        return F.linear(x, weight, bias)
    x2 = x if x.is_contiguous() else x.contiguous()
    n = weight.shape[0]
    out = torch.empty((*x.shape[:-1], n), dtype=torch.float32)
    _CALLS[0] += 1
    if fn(x2.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, n, k) != 0:
        raise ValueError(f"llmopt::dense_linear: the native kernel rejected rows={rows}, N={n}, K={k}")
    if bias is not None:
        out.add_(bias)
    return out


_LIB = torch.library.Library("llmopt", "FRAGMENT")
_LIB.define("dense_linear(Tensor x, Tensor weight, Tensor? bias=None, SymInt min_rows=1, "
            f"SymInt max_rows={DEFAULT_NATIVE_ROWS}) -> Tensor")
_LIB.impl("dense_linear", _dense_linear, "CompositeExplicitAutograd")
dense_linear = torch.ops.llmopt.dense_linear.default


@torch.library.register_fake("llmopt::dense_linear")
def _(x, weight, bias=None, min_rows=1, max_rows=DEFAULT_NATIVE_ROWS):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
