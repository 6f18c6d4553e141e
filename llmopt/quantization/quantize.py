"""Weights -> packed quantized tensors, SmoothQuant factors, whole models.

The formats are those of :mod:`llmopt.kernels.quantized_linear` (its
docstring has the formulas); how int4 grids are chosen is in
:mod:`llmopt.quantization.int4`. Scales and zero points are kept in fp32
whatever the weight's dtype (int4 grids hold bf16-exact values); the compiler
casts them to what each kernel wants when it installs them.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmopt.kernels.quantized_linear import pack_int4
from llmopt.quantization import int4
from llmopt.quantization.calibration import (BlockInputs, LayerStatistics, UnsupportedBlocks, collect_statistics,
                                             find_blocks)
from llmopt.quantization.config import QuantConfig
from llmopt.quantization.layers import QuantizedLinear
from llmopt.quantization.storage import QuantizedWeights
from llmopt.quantization.tune import tune_grids

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
_TINY = 1e-12  # all-zero rows / groups get a tiny scale instead of dividing by zero


# How many weights quantize_weight has quantized in this process, read through
# quantize_count() (tests check that saved or shared weights are not quantized again);
# only this module writes it.
_QUANTIZED = [0]


def quantize_count() -> int:
    """The number of weights :func:`quantize_weight` quantized so far in this process."""
    return _QUANTIZED[0]


def quantize_weight(
    weight: Tensor,
    mode: str,
    group_size: int = 128,
    smooth: Optional[Tensor] = None,
    method: str = "rtn",
    hessian: Optional[Tensor] = None,
) -> QuantizedLinear:
    """Quantize a ``(out_features, in_features)`` linear weight (not modified).

    ``method`` (int4 only: ``"rtn"``, ``"mse"``, ``"gptq"``) and ``hessian``
    (``sum x x^T`` of the layer's calibration inputs, ``(in, in)``; weighs
    ``"mse"``, required by ``"gptq"``) are described in
    :mod:`llmopt.quantization.int4`.
    """
    QuantConfig(mode=mode, group_size=group_size, method=method)  # validates all three
    _QUANTIZED[0] += 1
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_weight: expected a 2-D floating weight, got {tuple(weight.shape)} {weight.dtype}")
    w = weight.detach().float()
    n, k = w.shape
    if mode == "int8":
        tensors = _symmetric_int8(w, method)
    elif mode == "w8a8":
        tensors = _symmetric_int8(w if smooth is None else w * smooth.float()[None, :])
        if smooth is not None:
            tensors["smooth"] = smooth.float().clone()
    elif mode == "fp8":
        scales = w.abs().amax(dim=1).clamp(min=_TINY) / FP8_MAX
        tensors = {"qweight": (w / scales[:, None]).to(torch.float8_e4m3fn), "scales": scales}
    else:
        tensors = _asymmetric_int4(w, group_size, method, hessian)
    return QuantizedLinear(mode, k, n, tensors, group_size if mode == "int4" else None)


# int8 "mse": the fractions of each row's max |w| tried as its clipping range.
INT8_CLIP = tuple(1.0 - 0.02 * i for i in range(16))  # 1.0 down to 0.70


def _symmetric_int8(w: Tensor, method: str = "rtn") -> dict[str, Tensor]:
    # 127, not 128: a symmetric range keeps -x and x equally precise.
    absmax = w.abs().amax(dim=1).clamp(min=_TINY)
    scales = absmax / 127.0
    if method == "mse":
        # Per row, the clipping range of least squared error (the unclipped one is a
        # candidate, so never worse than rounding to nearest on max |w|).
        best = _int8_error(w, scales)
        for fraction in INT8_CLIP[1:]:
            candidate = absmax * fraction / 127.0
            error = _int8_error(w, candidate)
            better = error < best
            best = torch.where(better, error, best)
            scales = torch.where(better, candidate, scales)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return {"qweight": q, "scales": scales}


def _int8_error(w: Tensor, scales: Tensor) -> Tensor:
    q = torch.round(w / scales[:, None]).clamp_(-127, 127)
    return (q.mul_(scales[:, None]).sub_(w)).square_().sum(1)


def _asymmetric_int4(w: Tensor, group_size: int, method: str, hessian: Optional[Tensor]) -> dict[str, Tensor]:
    if method == "gptq" and hessian is None:
        raise ValueError("int4 method 'gptq' needs the layer's input Hessian (calibration batches)")
    k = w.shape[1]
    if hessian is not None and tuple(hessian.shape) != (k, k):
        raise ValueError(f"hessian is {tuple(hessian.shape)}; the weight has {k} input features")
    padded = int4.pad_to_groups(w, group_size)  # whole groups; inputs are zero-padded to match
    n, kp = padded.shape
    groups = padded.reshape(n, -1, group_size)
    if method == "rtn":
        scales, lows = int4.minmax_grid(groups)
    elif method == "hqq":
        scales, lows = int4.hqq_grid(groups, _importance(None, k, kp).reshape(-1, group_size))
    else:
        scales, lows = int4.search_grid(groups, _importance(hessian, k, kp).reshape(-1, group_size))
    if method == "gptq":
        hessian = hessian.to(w.device)
        levels = int4.gptq(padded, hessian, scales, lows, group_size)
    else:
        levels = int4.round_to_grid(groups, scales[..., None], lows[..., None]).reshape(n, kp)
    # (q - 8) * scale + zero == q * scale + low: PyTorch's int4 convention (see the kernels' docs).
    scales_zeros = torch.stack((scales.t(), int4.zero_points(scales, lows).t()), dim=-1).contiguous()
    return {"qweight": pack_int4(levels), "scales_zeros": scales_zeros}


def _importance(hessian: Optional[Tensor], k: int, width: int) -> Tensor:
    """Weight of each column's rounding error: ``E[x_j^2]`` up to a constant (the
    Hessian's diagonal), or 1 without calibration; 0 on the padding columns."""
    diagonal = torch.ones(k) if hessian is None else torch.diagonal(hessian).float().clamp(min=0).cpu()
    return F.pad(diagonal, (0, width - k))


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


def calibrate(model: nn.Module, batches: Iterable[Any]) -> dict[str, Tensor]:
    """Run ``batches`` through ``model`` (eagerly) and record, for every ``nn.Linear``,
    the largest ``|x|`` seen on each input feature: ``{layer name: (in_features,)}``.

    A batch is a tensor (passed as the only argument) or a dict of keyword arguments.
    """
    return collect_statistics(model, batches, hessians=False).absmax


# ---------------------------------------------------------------- whole models


def quantize_weights(model: nn.Module, config: "QuantConfig | str", calibration: Optional[Iterable[Any]] = None):
    """Quantize every ``nn.Linear`` of ``model`` that ``config.skip`` does not exclude.

    Returns a :class:`~llmopt.quantization.storage.QuantizedWeights` keyed by
    module path (``"model.layers.0.mlp.up_proj"``), ready for
    :func:`~llmopt.quantization.storage.save_quantized` or the compile option
    ``quantized_weights``. The model is not modified.

    ``calibration``: batches of sample inputs (tensors, or dicts of keyword
    arguments; :func:`~llmopt.quantization.calibration.token_batches` cuts token
    ids into windows), run through the model once. ``w8a8`` computes
    SmoothQuant factors from them; ``int4`` uses them for GPTQ (the default
    method with calibration) or to weigh ``"mse"``. Other modes take none.
    """
    if isinstance(config, str):
        config = QuantConfig(mode=config)
    if calibration is not None and config.mode not in ("w8a8", "int4"):
        raise ValueError(f"calibration batches are used by modes 'w8a8' and 'int4', not {config.mode!r}")
    method = config.resolved_method(calibrated=calibration is not None)
    if method == "gptq" and calibration is None:
        raise ValueError("int4 method 'gptq' needs calibration batches (quantize_weights(..., calibration=...))")
    linears = {name: m for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not config.skip_pattern(name)}
    stats = None
    if calibration is not None:
        calibration = list(calibration)
    if config.mode == "int4" and method == "gptq" and config.sequential:
        layers = _quantize_int4_sequential(model, linears, config.group_size, calibration)
    elif calibration is not None:
        stats = collect_statistics(model, calibration, hessians=config.mode == "int4",
                                   absmax=config.mode == "w8a8", layers=set(linears))
    if config.mode == "int4":
        if stats is not None or calibration is None:
            layers = _quantize_int4_layers(linears, config.group_size, method, stats)
        if config.tune_steps:
            if calibration is None:
                raise ValueError("tune_steps: tuning int4 grids needs calibration batches")
            layers = tune_grids(model, layers, calibration, config.tune_steps, lr=config.tune_lr)
    else:
        layers = {}
        for name, module in linears.items():
            smooth = None
            if stats is not None and name in stats.absmax:
                smooth = smoothing_factors(stats.absmax[name], module.weight, config.smoothquant_alpha)
            layers[name] = quantize_weight(module.weight, config.mode, config.group_size, smooth,
                                           method=method if config.mode == "int8" else "rtn")
    group_size = config.group_size if config.mode == "int4" else None
    return QuantizedWeights(config.mode, group_size, layers, method=method)


def _quantize_int4_layers(linears: dict[str, nn.Linear], group_size: int, method: str,
                          stats: Optional[LayerStatistics]) -> dict[str, QuantizedLinear]:
    """int4 layers; those sharing a Hessian (the same inputs) are quantized stacked, in one
    GPTQ sweep: its rows are independent, and one sweep over the columns costs the same
    whatever the number of rows."""
    stacks: dict[str, list[str]] = {}  # layers quantized together, keyed by the first one
    for name in linears:
        owner = stats.hessian_owner.get(name) if stats is not None else None
        if method == "gptq" and owner is None:
            raise ValueError(f"int4 method 'gptq': calibration never reached layer {name!r}")
        stacks.setdefault(owner if method == "gptq" else name, []).append(name)
    layers = {}
    for names in stacks.values():
        hessian = stats.hessian(names[0]) if stats is not None else None
        weight = torch.cat([linears[n].weight.detach().float() for n in names]) if len(names) > 1 \
            else linears[names[0]].weight
        stacked = quantize_weight(weight, "int4", group_size, method=method, hessian=hessian)
        layers.update(zip(names, _split_rows(stacked, [linears[n].out_features for n in names])))
    return {name: layers[name] for name in linears}  # in the model's order


def _quantize_int4_sequential(model: nn.Module, linears: dict[str, nn.Linear], group_size: int,
                              calibration: list[Any]) -> dict[str, QuantizedLinear]:
    """GPTQ one Hessian group at a time, each from the inputs the layers quantized before it make.

    Decoder blocks run one at a time on cached hidden states
    (:class:`~llmopt.quantization.calibration.BlockInputs`); inside a block, the
    layers sharing an input are quantized in the order they run, and the block
    runs again after each group so that the next one sees the rounded weights.
    Layers outside the blocks (an lm_head) get their Hessians from one pass of
    the whole model with the blocks' weights rounded. The model's weights are
    restored before returning. Falls back to one pass of float statistics when
    the blocks cannot be run alone.
    """
    blocks = find_blocks(model, set(linears))
    originals: dict[str, Tensor] = {}
    layers: dict[str, QuantizedLinear] = {}

    def install(name: str) -> None:
        module = linears[name]
        originals.setdefault(name, module.weight.data)
        module.weight.data = layers[name].dequantize(module.weight.dtype).to(module.weight.device)

    try:
        inputs = BlockInputs(model, blocks, calibration) if blocks else None
    except UnsupportedBlocks:
        inputs = None
    try:
        if inputs is not None:
            for index, (path, _) in enumerate(blocks):
                prefix = path + "."
                pending = [name[len(prefix):] for name in linears if name.startswith(prefix)]
                while pending:
                    stats = inputs.collect(index, set(pending))
                    owner = next(iter(stats.hessians))  # the first group to run
                    names = [n for n in pending if stats.hessian_owner.get(n) == owner]
                    stats.hessian_owner = {prefix + n: prefix + o for n, o in stats.hessian_owner.items()}
                    stats.hessians = {prefix + owner: stats.hessians[owner]}
                    group = {prefix + n: linears[prefix + n] for n in names}
                    layers.update(_quantize_int4_layers(group, group_size, "gptq", stats))
                    for name in group:
                        install(name)
                    pending = [n for n in pending if n not in names]
                if index + 1 < len(blocks):
                    inputs.advance(index)
        rest = {name: module for name, module in linears.items() if name not in layers}
        if rest:
            stats = collect_statistics(model, calibration, hessians=True, absmax=False, layers=set(rest))
            layers.update(_quantize_int4_layers(rest, group_size, "gptq", stats))
    finally:
        for name, weight in originals.items():
            linears[name].weight.data = weight
    return {name: layers[name] for name in linears}


# The output-feature axis of each stored tensor: int4 scales/zeros are (groups, N, 2),
# every other tensor has N first.
_ROW_DIMS = {"scales_zeros": 1}


def _split_rows(layer: QuantizedLinear, sizes: list[int]) -> list[QuantizedLinear]:
    """A layer of stacked weights -> one layer per block of output rows."""
    if len(sizes) == 1:
        return [layer]
    parts = {name: t.split(sizes, dim=_ROW_DIMS.get(name, 0)) for name, t in layer.tensors.items()}
    return [
        QuantizedLinear(layer.mode, layer.in_features, n, {name: p[i].contiguous() for name, p in parts.items()},
                        layer.group_size)
        for i, n in enumerate(sizes)
    ]


def stack_rows(layers: list[QuantizedLinear]) -> QuantizedLinear:
    """Inverse of :func:`_split_rows`: layers of one mode and input width stacked along
    the output features (rows are quantized independently, so this equals quantizing
    the stacked float weight)."""
    if len(layers) == 1:
        return layers[0]
    first = layers[0]
    tensors = {name: torch.cat([layer.tensors[name] for layer in layers], dim=_ROW_DIMS.get(name, 0))
               for name in first.tensors}
    out_features = sum(layer.out_features for layer in layers)
    return QuantizedLinear(first.mode, first.in_features, out_features, tensors, first.group_size)
