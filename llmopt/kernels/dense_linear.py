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
memory's rate, slightly faster than this kernel. :func:`default_min_rows` and
:func:`default_max_rows` say which rows go to the kernel on this CPU, and :func:`default_blocking` which of the
kernel's two blockings runs ("narrow", tuned on a Xeon; "wide", more weight rows
streamed at once, tuned on an EPYC); the measurements are in docs/PERFORMANCE.md
(``bench/dense_linear.py``). Results differ from
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

__all__ = ["BLOCKINGS", "DEFAULT_NATIVE_ROWS", "default_blocking", "default_max_rows", "default_min_rows", "dense_linear",
           "native_dense_available", "native_dense_calls", "native_dense_linear"]

# Rows up to which the op's C kernel runs by default; above it MKL's sgemm (which
# blocks for cache) takes over. Chosen from bench/dense_linear.py's crossover on a
# Xeon; default_max_rows() is what the pass uses on this CPU.
DEFAULT_NATIVE_ROWS = 8


# The kernel's blockings (kernels/native/f32_gemv.c): their exported C symbols.
BLOCKINGS = {"narrow": "llmopt_f32_gemv", "wide": "llmopt_f32_gemv_wide"}


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def default_min_rows() -> int:
    """The fewest rows the kernel takes on this CPU: 3 on an Intel CPU (MKL's 1- and
    2-row products already read at the memory's rate there), 1 elsewhere."""
    return 3 if _cpu_vendor() == "GenuineIntel" else 1


def default_max_rows() -> int:
    """The most rows the kernel takes on this CPU: 8 on an Intel CPU (above it MKL's
    matrix-matrix product is the faster there), 16 elsewhere (on an AMD EPYC the
    "wide" kernel still read 1.4x faster than MKL at 16 rows)."""
    return DEFAULT_NATIVE_ROWS if _cpu_vendor() == "GenuineIntel" else 16


def default_blocking() -> str:
    """The kernel's blocking for this CPU: "narrow" (4 weight rows at a time, software
    prefetch) on Intel CPUs, where it was tuned; "wide" (16 weight rows at a time with
    AVX-512, 12 with AVX2, no software prefetch) elsewhere: on an AMD EPYC (Zen 4) it
    reads the weights about 1.5x faster than "narrow" at 1-2 rows."""
    return "narrow" if _cpu_vendor() == "GenuineIntel" else "wide"


_NATIVE: dict = {}  # blocking -> the C function, or None; filled on first use
_DEFAULT: list = []  # [the C function of the default blocking, or None]
_CALLS = [0]  # calls the C kernel answered in this process (native_dense_calls)


def native_dense_calls() -> int:
    """How many calls the C kernel answered in this process (the others ran ``F.linear``)."""
    return _CALLS[0]


def _native_fn(blocking: Optional[str] = None):
    if blocking is None:
        if not _DEFAULT:
            _DEFAULT.append(_native_fn(default_blocking()))
        return _DEFAULT[0]
    if blocking not in BLOCKINGS:
        raise ValueError(f"unknown blocking {blocking!r}; expected one of {sorted(BLOCKINGS)}")
    if blocking not in _NATIVE:
        from llmopt.kernels import native

        _NATIVE[blocking] = native.function("f32_gemv", BLOCKINGS[blocking],
                                            [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3)
    return _NATIVE[blocking]


def native_dense_available() -> bool:
    """Whether the C kernel builds on this machine (else every call is ``F.linear``)."""
    return _native_fn() is not None


def _dense_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, min_rows: int = 1,
                  max_rows: int = DEFAULT_NATIVE_ROWS) -> Tensor:
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    fn = _DEFAULT[0] if _DEFAULT else _native_fn()
    if (fn is None or rows > max_rows or rows < max(min_rows, 1) or x.dtype != torch.float32
            or weight.dtype != torch.float32 or not x.is_cpu or not weight.is_cpu
            or not weight.is_contiguous() or weight.shape[1] != k):
        return F.linear(x, weight, bias)
    _CALLS[0] += 1
    out = _run_kernel(fn, x if x.is_contiguous() else x.contiguous(), weight, rows)
    if bias is not None:
        out.add_(bias)
    return out


def _run_kernel(fn, x: Tensor, weight: Tensor, rows: int) -> Tensor:
    """``x @ weight.T`` by the C function ``fn``; x contiguous with ``rows`` rows of K."""
    n, k = weight.shape
    out = torch.empty((*x.shape[:-1], n), dtype=torch.float32)
    if fn(x.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, n, k) != 0:
        raise ValueError(f"llmopt::dense_linear: the native kernel rejected rows={rows}, N={n}, K={k}")
    return out


def native_dense_linear(x: Tensor, weight: Tensor, blocking: Optional[str] = None) -> Tensor:
    """``x @ weight.T`` by the C kernel with the given blocking (default: this CPU's),
    whatever the row count: for benchmarks and tests of each blocking. ``x`` (m, k) and
    ``weight`` (n, k) must be contiguous fp32 CPU tensors."""
    fn = _native_fn(blocking)
    if fn is None:
        raise RuntimeError("llmopt::dense_linear: the C kernel f32_gemv does not build on this machine")
    if (x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1] or x.dtype != torch.float32
            or weight.dtype != torch.float32 or not x.is_cpu or not weight.is_cpu or not x.is_contiguous()
            or not weight.is_contiguous()):
        raise ValueError("native_dense_linear takes contiguous fp32 CPU tensors x (m, k) and weight (n, k); got "
                         f"{tuple(x.shape)} {x.dtype} and {tuple(weight.shape)} {weight.dtype}")
    return _run_kernel(fn, x, weight, x.shape[0])


_LIB = torch.library.Library("llmopt", "FRAGMENT")
_LIB.define("dense_linear(Tensor x, Tensor weight, Tensor? bias=None, SymInt min_rows=1, "
            f"SymInt max_rows={DEFAULT_NATIVE_ROWS}) -> Tensor")
_LIB.impl("dense_linear", _dense_linear, "CompositeExplicitAutograd")
dense_linear = torch.ops.llmopt.dense_linear.default


@torch.library.register_fake("llmopt::dense_linear")
def _(x, weight, bias=None, min_rows=1, max_rows=DEFAULT_NATIVE_ROWS):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
