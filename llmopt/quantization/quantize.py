"""Weights -> packed quantized tensors, and SmoothQuant calibration.

The formats are those of :mod:`llmopt.kernels.quantized_linear` (its
docstring has the formulas). Scales and zero points are computed and kept in
fp32 whatever the weight's dtype; the compiler casts them to what each
kernel wants when it installs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmopt.kernels.quantized_linear import dequantize_fp8, dequantize_int4, dequantize_int8, pack_int4
from llmopt.quantization.config import QuantConfig

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
_TINY = 1e-12  # all-zero rows / groups get a tiny scale instead of dividing by zero


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


def quantize_weight(
    weight: Tensor, mode: str, group_size: int = 128, smooth: Optional[Tensor] = None
) -> QuantizedLinear:
    """Quantize a ``(out_features, in_features)`` linear weight (not modified)."""
    QuantConfig(mode=mode, group_size=group_size)  # validates both
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_weight: expected a 2-D floating weight, got {tuple(weight.shape)} {weight.dtype}")
    w = weight.detach().float()
    n, k = w.shape
    if mode == "int8":
        tensors = _symmetric_int8(w)
    elif mode == "w8a8":
        tensors = _symmetric_int8(w if smooth is None else w * smooth.float()[None, :])
        if smooth is not None:
            tensors["smooth"] = smooth.float().clone()
    elif mode == "fp8":
        scales = w.abs().amax(dim=1).clamp(min=_TINY) / FP8_MAX
        tensors = {"qweight": (w / scales[:, None]).to(torch.float8_e4m3fn), "scales": scales}
    else:
        tensors = _asymmetric_int4(w, group_size)
    return QuantizedLinear(mode, k, n, tensors, group_size if mode == "int4" else None)


def _symmetric_int8(w: Tensor) -> dict[str, Tensor]:
    # 127, not 128: a symmetric range keeps -x and x equally precise.
    scales = w.abs().amax(dim=1).clamp(min=_TINY) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return {"qweight": q, "scales": scales}


def _asymmetric_int4(w: Tensor, group_size: int) -> dict[str, Tensor]:
    n, k = w.shape
    padded = -k % group_size  # zero columns up to a whole group; inputs are zero-padded to match
    groups = F.pad(w, (0, padded)).reshape(n, -1, group_size)
    low, high = torch.aminmax(groups, dim=2)
    scales = ((high - low) / 15.0).clamp(min=_TINY)
    # In place on the padded copy: weights are large and this runs for every layer.
    q = groups.sub_(low[..., None]).div_(scales[..., None]).round_().clamp_(0, 15)
    # q * scale + low == (q - 8) * scale + zero with zero = low + 8 * scale (PyTorch's int4 convention)
    zeros = low + 8.0 * scales
    scales_zeros = torch.stack((scales.t(), zeros.t()), dim=-1).contiguous()  # (groups, N, 2)
    return {"qweight": pack_int4(q.reshape(n, -1)), "scales_zeros": scales_zeros}


# ---------------------------------------------------------------- SmoothQuant


def smoothing_factors(activation_absmax: Tensor, weight: Tensor, alpha: float = 0.5) -> Tensor:
    """Per-input-channel ``s``: quantize ``W * s`` and ``x / s`` instead of ``W`` and ``x``.

    ``s_j = max|x_j|^alpha / max|W_:j|^(1 - alpha)`` (SmoothQuant) moves the
    activations' outlier channels into the weights, which int8 quantizes per
    output channel without trouble. Channels never seen active keep ``s = 1``.
    """
    act = activation_absmax.float().to(weight.device)
    w = weight.detach().float().abs().amax(dim=0).clamp(min=1e-5)
    s = act.clamp(min=1e-5).pow(alpha) / w.pow(1.0 - alpha)
    return torch.where(act > 0, s, torch.ones_like(s)).clamp(min=1e-5)


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any]) -> dict[str, Tensor]:
    """Run ``batches`` through ``model`` (eagerly) and record, for every ``nn.Linear``,
    the largest ``|x|`` seen on each input feature: ``{layer name: (in_features,)}``.

    A batch is a tensor (passed as the only argument) or a dict of keyword arguments.
    """
    absmax: dict[str, Tensor] = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
            absmax[name] = torch.maximum(absmax[name], x) if name in absmax else x
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in model.named_modules()
               if isinstance(m, nn.Linear)]
    try:
        for batch in batches:
            model(**batch) if isinstance(batch, Mapping) else model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return absmax


# ---------------------------------------------------------------- whole models


def quantize_weights(model: nn.Module, config: "QuantConfig | str", calibration: Optional[Iterable[Any]] = None):
    """Quantize every ``nn.Linear`` of ``model`` that ``config.skip`` does not exclude.

    Returns a :class:`~llmopt.quantization.storage.QuantizedWeights` keyed by
    module path (``"model.layers.0.mlp.up_proj"``), ready for
    :func:`~llmopt.quantization.storage.save_quantized` or the compile option
    ``quantized_weights``. The model is not modified. With ``mode="w8a8"`` and
    ``calibration`` batches, SmoothQuant factors are computed from them first.
    """
    from llmopt.quantization.storage import QuantizedWeights

    if isinstance(config, str):
        config = QuantConfig(mode=config)
    if calibration is not None and config.mode != "w8a8":
        raise ValueError(f"calibration batches are only used by mode 'w8a8', not {config.mode!r}")
    absmax = calibrate(model, calibration) if calibration is not None else {}
    layers = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or config.skip_pattern(name):
            continue
        smooth = None
        if name in absmax:
            smooth = smoothing_factors(absmax[name], module.weight, config.smoothquant_alpha)
        layers[name] = quantize_weight(module.weight, config.mode, config.group_size, smooth)
    return QuantizedWeights(config.mode, config.group_size if config.mode == "int4" else None, layers)
