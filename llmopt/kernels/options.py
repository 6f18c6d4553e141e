"""The ``kernels`` option group: which implementation each llmopt op runs.

``options={"kernels": {"attention": "triton"}}`` (or a :class:`KernelOptions`).
Every field is decided once, when the graph is compiled: the passes resolve it
with :mod:`llmopt.kernels.dispatch` against the example inputs' device, put
the resolved name into the op call (``impl=``), and record it in the Report.
Nothing here is read on a hot path.

Environment overrides (read once, by :meth:`KernelOptions.from_env`, when an
``LLMOptConfig`` is built; an explicit option wins over the variable):

=========================  ===================  =========================================
variable                   field                values
=========================  ===================  =========================================
``LLMOPT_ATTENTION_IMPL``  ``attention`` and    ``auto``, ``native``, ``torch``, ``sdpa``,
                           ``paged_attention``  ``triton`` (``gather_sdpa`` for paged)
``LLMOPT_NATIVE``          ``native``           ``0`` turns llmopt's C kernels off
``LLMOPT_QUANT_IMPL``      ``quantized_linear`` ``auto``, ``torch``, ``triton``
``LLMOPT_INT4_CPU_KERNEL`` ``int4_cpu_kernel``  ``native``, ``torch``
``LLMOPT_QUANT_CPU_DTYPE`` ``quant_cpu_dtype``  ``bfloat16``, ``float32`` (exactness mode)
=========================  ===================  =========================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

from llmopt.errors import LLMOptConfigError, check_bool, check_choice, checked_fields

__all__ = ["ATTENTION_IMPLS", "INT4_CPU_KERNELS", "PAGED_ATTENTION_IMPLS", "QUANT_CPU_DTYPES",
           "QUANTIZED_LINEAR_IMPLS", "KernelOptions"]

# Dense attention (llmopt::attention):
#   "auto":   the device's default (kernels/dispatch.py: DEFAULTS)
#   "native": CPU; llmopt's C kernel for decode-sized calls, PyTorch's CPU flash kernel otherwise
#   "torch":  PyTorch's own fused kernels only (CPU flash kernel; on CUDA, SDPA)
#   "sdpa":   F.scaled_dot_product_attention(enable_gqa=True), any device (the CUDA default)
#   "triton": llmopt's Triton kernels (CUDA; on CPU only under TRITON_INTERPRET=1)
ATTENTION_IMPLS = ("auto", "native", "torch", "sdpa", "triton")
# Paged attention (llmopt::paged_attention): as above, and
#   "gather_sdpa": gather each sequence's blocks, then SDPA (any device; the CUDA default)
PAGED_ATTENTION_IMPLS = ("auto", "native", "torch", "gather_sdpa", "triton")

# Quantized linears (llmopt::linear_int8/int4/fp8; w8a8 has PyTorch's path only):
#   "auto":   the device's default (PyTorch's kernels on CPU and CUDA)
#   "torch":  PyTorch's kernels (packed int8/int4 CPU kernels, dequantize + matmul, torch._int_mm)
#   "triton": llmopt's Triton kernels (CUDA; on CPU only under TRITON_INTERPRET=1)
QUANTIZED_LINEAR_IMPLS = ("auto", "torch", "triton")
# int4 weights on CPU under "torch": "native" installs llmopt's C kernel's layout (when it
# builds and kernels.native is on), "torch" PyTorch's packed int4 kernel.
INT4_CPU_KERNELS = ("native", "torch")
# What fp32 models' quantized layers compute in on CPU: "bfloat16" (the fast packed paths;
# int4 through the C kernel's int8 activations) or "float32" (exactness mode).
QUANT_CPU_DTYPES = ("bfloat16", "float32")

_ENV = {"attention": "LLMOPT_ATTENTION_IMPL", "native": "LLMOPT_NATIVE"}
_CHOICE_ENV = {  # field -> (variable, valid values)
    "quantized_linear": ("LLMOPT_QUANT_IMPL", QUANTIZED_LINEAR_IMPLS),
    "int4_cpu_kernel": ("LLMOPT_INT4_CPU_KERNEL", INT4_CPU_KERNELS),
    "quant_cpu_dtype": ("LLMOPT_QUANT_CPU_DTYPE", QUANT_CPU_DTYPES),
}


@dataclass(frozen=True)
class KernelOptions:
    """Attributes:
        attention: implementation of ``llmopt::attention`` (see ``ATTENTION_IMPLS``).
        paged_attention: implementation of ``llmopt::paged_attention`` (``PAGED_ATTENTION_IMPLS``).
        native: allow llmopt's C kernels (``kernels/native``) on CPU; False resolves
            ``"native"`` to ``"torch"`` (and int4 CPU layers get PyTorch's kernel).
        quantized_linear: implementation of ``llmopt::linear_int8/int4/fp8``
            (``QUANTIZED_LINEAR_IMPLS``).
        int4_cpu_kernel: int4 layers on CPU: llmopt's C kernel (``"native"``) or
            PyTorch's packed kernel (``"torch"``).
        quant_cpu_dtype: compute dtype of fp32 models' quantized layers on CPU:
            ``"bfloat16"`` or ``"float32"`` (exactness mode: fp32 scales and activations).
        merge_siblings: quantized sibling linears (same input, no bias: q/k/v,
            gate/up) share one kernel call; False keeps one call per layer.
    """

    attention: str = "auto"
    paged_attention: str = "auto"
    native: bool = True
    quantized_linear: str = "auto"
    int4_cpu_kernel: str = "native"
    quant_cpu_dtype: str = "bfloat16"
    merge_siblings: bool = True

    def __post_init__(self) -> None:
        check_choice("attention", self.attention, ATTENTION_IMPLS, group="kernels")
        check_choice("paged_attention", self.paged_attention, PAGED_ATTENTION_IMPLS, group="kernels")
        check_bool("native", self.native, group="kernels")
        check_bool("merge_siblings", self.merge_siblings, group="kernels")
        for name, (_, valid) in _CHOICE_ENV.items():
            check_choice(name, getattr(self, name), valid, group="kernels")

    @classmethod
    def from_options(cls, options: "Mapping[str, Any] | KernelOptions | None",
                     environ: Optional[Mapping[str, str]] = None) -> "KernelOptions":
        """The group from ``options={"kernels": {...}}``, over the environment overrides."""
        if isinstance(options, KernelOptions):
            return options
        if options is not None and not isinstance(options, Mapping):
            raise LLMOptConfigError(
                f"option 'kernels' must be a dict of kernel options, got {type(options).__name__}")
        given = checked_fields(cls, options or {}, "kernels option")
        return cls(**{**cls.env_overrides(os.environ if environ is None else environ), **given})

    @staticmethod
    def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
        """The fields the environment sets (documented in the module docstring)."""
        found: dict[str, Any] = {}
        impl = environ.get(_ENV["attention"], "").strip()
        if impl:
            if impl not in ATTENTION_IMPLS and impl not in PAGED_ATTENTION_IMPLS:
                raise LLMOptConfigError(
                    f"environment variable LLMOPT_ATTENTION_IMPL={impl!r}; valid values are "
                    f"{', '.join(repr(i) for i in dict.fromkeys(ATTENTION_IMPLS + PAGED_ATTENTION_IMPLS))}")
            if impl in ATTENTION_IMPLS:
                found["attention"] = impl
            if impl in PAGED_ATTENTION_IMPLS:
                found["paged_attention"] = impl
        if environ.get(_ENV["native"], "1") == "0":
            found["native"] = False
        for name, (variable, valid) in _CHOICE_ENV.items():
            value = environ.get(variable, "").strip()
            if not value:
                continue
            if value not in valid:
                raise LLMOptConfigError(f"environment variable {variable}={value!r}; valid values are "
                                        f"{', '.join(repr(v) for v in valid)}")
            found[name] = value
        return found


KERNEL_OPTION_NAMES = tuple(f.name for f in fields(KernelOptions))
