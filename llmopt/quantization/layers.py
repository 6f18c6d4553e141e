"""Quantized layers as data: one linear layer's packed tensors (and how to read
them back), and a whole model's, keyed by module path.

A leaf of the quantization package (the quantizers make these, storage saves
and loads them, grid tuning refits them, the options check the type), so
those modules import it and not each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from llmopt.kernels.quantized_linear import dequantize_fp8, dequantize_int4, dequantize_int8

__all__ = ["QuantizedLinear", "QuantizedWeights"]


@dataclass
class QuantizedLinear:
    """One linear layer's quantized weight (``tensors`` as named in the kernel docs)."""

    mode: str
    in_features: int
    out_features: int
    tensors: dict[str, Tensor]
    group_size: Optional[int] = None  # int4 only

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The ``(out_features, in_features)`` weight the kernels multiply by (reference)."""
        t = self.tensors
        if self.mode == "int4":
            weight = dequantize_int4(t["qweight"], t["scales_zeros"], self.group_size, dtype)
            weight = weight[:, : self.in_features]
        elif self.mode == "fp8":
            weight = dequantize_fp8(t["qweight"], t["scales"], dtype)
        else:
            weight = dequantize_int8(t["qweight"], t["scales"], dtype)
        if "smooth" in t:  # w8a8 with SmoothQuant: the kernel divides x by it
            weight = weight / t["smooth"].to(dtype)
        return weight


@dataclass
class QuantizedWeights:
    """Quantized linear weights keyed by module path."""

    mode: str
    group_size: Optional[int]
    layers: dict[str, QuantizedLinear] = field(default_factory=dict)
    method: Optional[str] = None  # how they were rounded ("rtn", "mse", "gptq"); None: not recorded

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers.values())

    def label(self) -> str:
        return f"int4 g{self.group_size}" if self.mode == "int4" else self.mode
