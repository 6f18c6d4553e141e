"""The one place an llmopt op's implementation is chosen: a pure function.

``resolve(op, impl, device_type, triton_interpret=False, native=True)`` turns
an option value (``"auto"`` or a name) into the implementation that runs, for
a device type. The passes call it once per rewritten site when the graph is
compiled (the result becomes the op call's ``impl`` argument and is recorded
in the Report); an op called directly with ``impl="auto"`` calls it per call,
which is a couple of dict look-ups.

Safe defaults on CUDA: llmopt's Triton kernels have not run on a GPU yet. A
CUDA default names a kernel only once ``bench/results/`` holds a record from a
real GPU showing it matches its reference (see docs/ARCHITECTURE.md, "Kernel
options and dispatch"); until then CUDA inputs get PyTorch's kernels and the
Triton ones are one option away (``kernels={"attention": "triton"}``).
"""

from __future__ import annotations

__all__ = ["DEFAULTS", "IMPLS", "resolve"]

# Implementations each op has, by the devices they run on.
IMPLS = {
    "attention": {"native": ("cpu",), "torch": ("cpu", "cuda"), "sdpa": ("cpu", "cuda"), "triton": ("cuda",)},
    "paged_attention": {"native": ("cpu",), "torch": ("cpu",), "gather_sdpa": ("cpu", "cuda"),
                        "triton": ("cuda",)},
    # llmopt::linear_int8/int4/fp8 (on CPU, the int4 kernel is the installed layout's, chosen by the
    # quantize pass from kernels.int4_cpu_kernel / kernels.native)
    "quantized_linear": {"torch": ("cpu", "cuda"), "triton": ("cuda",)},
}

# (op, device type) -> the default. A CUDA entry changes only with its GPU record
# (bench/results/<kernel>-gpu-*.json matching the reference), named beside it.
DEFAULTS = {
    ("attention", "cpu"): "native",
    ("attention", "cuda"): "sdpa",  # triton_flash: no GPU record yet
    ("paged_attention", "cpu"): "native",
    ("paged_attention", "cuda"): "gather_sdpa",  # triton_paged: no GPU record yet
    ("quantized_linear", "cpu"): "torch",
    ("quantized_linear", "cuda"): "torch",  # triton_quant: no GPU record yet (dequantize + matmul, torch._int_mm)
}

# What a name means where it has no implementation of its own.
_ALIASES = {("attention", "torch", "cuda"): "sdpa", ("paged_attention", "torch", "cuda"): "gather_sdpa"}

_cache: dict = {}


def resolve(op: str, impl: str, device_type: str, *, triton_interpret: bool = False, native: bool = True) -> str:
    """The implementation of ``op`` that runs for option value ``impl`` on ``device_type``.

    ``triton_interpret``: Triton's interpreter is on (``TRITON_INTERPRET=1``), so
    ``"triton"`` may run on CPU tensors (tests). ``native=False`` (the
    ``kernels.native`` option) turns ``"native"`` into ``"torch"``. Raises
    ValueError for a name ``op`` does not have or one that cannot run there.
    """
    key = (op, impl, device_type, triton_interpret, native)
    found = _cache.get(key)
    if found is None:
        found = _cache[key] = _resolve(*key)
    return found


def _resolve(op, impl, device_type, triton_interpret, native) -> str:
    if op not in IMPLS:
        raise ValueError(f"llmopt: no op {op!r} to dispatch; ops: {', '.join(IMPLS)}")
    device = device_type if device_type in ("cpu", "cuda") else "cuda"  # other GPU backends: PyTorch's paths
    if impl == "auto":
        impl = DEFAULTS[(op, "cpu" if device == "cpu" else "cuda")]
    impl = _ALIASES.get((op, impl, device), impl)
    if impl == "native" and not native:
        impl = "torch"
    runs_on = IMPLS[op].get(impl)
    if runs_on is None:
        raise ValueError(f"llmopt::{op}: no implementation {impl!r}; choose one of "
                         f"{', '.join(repr(i) for i in ('auto', *IMPLS[op]))}")
    if device not in runs_on and not (impl == "triton" and device == "cpu" and triton_interpret):
        where = "CUDA tensors (or CPU ones under TRITON_INTERPRET=1)" if impl == "triton" else \
            " or ".join(runs_on).replace("cpu", "CPU").replace("cuda", "CUDA") + " tensors"
        raise ValueError(f"llmopt::{op}: implementation {impl!r} runs on {where}, not {device_type}")
    return impl
