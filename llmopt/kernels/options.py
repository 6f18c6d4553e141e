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
=========================  ===================  =========================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

from llmopt.errors import LLMOptConfigError, check_bool, check_choice, checked_fields

__all__ = ["ATTENTION_IMPLS", "PAGED_ATTENTION_IMPLS", "KernelOptions"]

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

_ENV = {"attention": "LLMOPT_ATTENTION_IMPL", "native": "LLMOPT_NATIVE"}


@dataclass(frozen=True)
class KernelOptions:
    """Attributes:
        attention: implementation of ``llmopt::attention`` (see ``ATTENTION_IMPLS``).
        paged_attention: implementation of ``llmopt::paged_attention`` (``PAGED_ATTENTION_IMPLS``).
        native: allow llmopt's C kernels (``kernels/native``) on CPU; False resolves
            ``"native"`` to ``"torch"``.
    """

    attention: str = "auto"
    paged_attention: str = "auto"
    native: bool = True

    def __post_init__(self) -> None:
        check_choice("attention", self.attention, ATTENTION_IMPLS, group="kernels")
        check_choice("paged_attention", self.paged_attention, PAGED_ATTENTION_IMPLS, group="kernels")
        check_bool("native", self.native, group="kernels")

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
        return found


KERNEL_OPTION_NAMES = tuple(f.name for f in fields(KernelOptions))
