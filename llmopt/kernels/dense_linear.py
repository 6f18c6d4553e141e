"""``llmopt::dense_linear``: an fp32 linear layer whose few-row calls (decode) run llmopt's C kernel.

``dense_linear(x, weight, bias=None, native_rows=8)`` computes ``F.linear(x, weight, bias)``.
When ``x`` and ``weight`` are fp32 CPU tensors, ``weight`` is contiguous and ``x`` holds at
most ``native_rows`` rows, it runs ``kernels/native/f32_gemv.c``: the weight rows split
over the OpenMP threads and streamed once, each row used for every activation row. Every
other call (prefill, other dtypes and devices, a missing C compiler) is ``F.linear``.

Why: for one or two rows PyTorch's CPU linear runs MKL's sgemv, which reads the weight
at about one core's bandwidth whatever the thread count, and an fp32 decode step is
one read of every weight (docs/PERFORMANCE.md has the measurements). Results differ
from ``F.linear`` by the order of fp32 additions only (tests bound them against fp64).

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

__all__ = ["DEFAULT_NATIVE_ROWS", "dense_linear", "native_dense_available"]

# Rows up to which the C kernel runs; above it MKL's sgemm (which does use every thread
# and blocks for cache) takes over. Chosen from bench/dense_linear.py's crossover.
DEFAULT_NATIVE_ROWS = 8

_NATIVE: list = []  # [the C function, or None], filled on first use


def _native_fn():
    if not _NATIVE:
        from llmopt.kernels import native

        lib = native.load("f32_gemv")
        fn = None
        if lib is not None:
            fn = lib.llmopt_f32_gemv
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
        _NATIVE.append(fn)
    return _NATIVE[0]


def native_dense_available() -> bool:
    """Whether the C kernel builds on this machine (else every call is ``F.linear``)."""
    return _native_fn() is not None


def _dense_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                  native_rows: int = DEFAULT_NATIVE_ROWS) -> Tensor:
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    fn = _NATIVE[0] if _NATIVE else _native_fn()
    if (fn is None or rows > native_rows or rows == 0 or x.dtype != torch.float32
            or weight.dtype != torch.float32 or not x.is_cpu or not weight.is_cpu
            or not weight.is_contiguous() or weight.shape[1] != k):
        return F.linear(x, weight, bias)
    x2 = x if x.is_contiguous() else x.contiguous()
    n = weight.shape[0]
    out = torch.empty((*x.shape[:-1], n), dtype=torch.float32)
    if fn(x2.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, n, k) != 0:
        raise ValueError(f"llmopt::dense_linear: the native kernel rejected rows={rows}, N={n}, K={k}")
    if bias is not None:
        out.add_(bias)
    return out


_LIB = torch.library.Library("llmopt", "FRAGMENT")
_LIB.define("dense_linear(Tensor x, Tensor weight, Tensor? bias=None, "
            f"SymInt native_rows={DEFAULT_NATIVE_ROWS}) -> Tensor")
_LIB.impl("dense_linear", _dense_linear, "CompositeExplicitAutograd")
dense_linear = torch.ops.llmopt.dense_linear.default


@torch.library.register_fake("llmopt::dense_linear")
def _(x, weight, bias=None, native_rows=DEFAULT_NATIVE_ROWS):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
