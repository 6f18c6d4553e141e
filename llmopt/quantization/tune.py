"""End-to-end tuning of int4 grids on calibration text, the integer levels kept.

After GPTQ (or plain rounding) has fixed every weight's level ``q``, each
group's grid ``low + q * scale`` still has two free numbers. Layer by layer
they are already the best for that layer's own output (the ``"mse"`` search,
or GPTQ's compensation); here they are trained together, so that the
quantized model's next-token distributions match the float model's: the loss
is the KL divergence ``KL(p_float || p_quant)`` per token, averaged over a
calibration window, and each step takes one window (cycling through them).
The float model is the teacher, run on the same window at every step; its
weights are never changed (the quantized weights enter through
``torch.func.functional_call``).

The parameters are relative: ``scale = scale0 * (1 + a)`` and
``low = low0 + b * scale0`` with ``a = b = 0`` at the start, trained with
Adam, so one learning rate suits every layer. The grids are made bf16-exact
at the end (:func:`llmopt.quantization.int4.exact_grid`), like every other
int4 grid. Each window is best seen once (windows of new text every step):
on SmolLM2 repeating a few windows fits them much better than it helps other
text.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmopt.kernels.quantized_linear import unpack_int4
from llmopt.quantization import int4
from llmopt.quantization.config import DEFAULT_TUNE_LR
from llmopt.quantization.layers import QuantizedLinear

def tune_grids(model: nn.Module, layers: Mapping[str, Any], batches: Iterable[Any], steps: int,
               lr: float = DEFAULT_TUNE_LR) -> dict[str, Any]:
    """int4 ``layers`` (``{module path: QuantizedLinear}``) with grids tuned on ``batches``.

    ``batches`` are calibration inputs as :func:`~llmopt.quantization.quantize_weights`
    takes them (token tensors or dicts of keyword arguments); ``steps`` windows
    are used, cycling through them. Returns new layers (same levels, new
    ``scales_zeros``); ``model`` is left as it is.
    """
    batches = list(batches)
    if steps < 1 or not batches:
        raise ValueError(f"tuning int4 grids needs calibration batches and steps >= 1 (got {steps} steps)")
    device = next(model.parameters()).device
    grids = {name: _Grid(layer, device) for name, layer in layers.items() if layer.mode == "int4"}
    parameters = [p for grid in grids.values() for p in (grid.a, grid.b)]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    was_training = model.training
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in frozen:
        p.requires_grad_(False)  # only the grids learn; no gradients land on the model
    try:
        for step in range(steps):
            batch = batches[step % len(batches)]
            with torch.no_grad():
                teacher = F.log_softmax(_logits(_call(model, batch, device)).float(), dim=-1)
            weights = {f"{name}.weight": grid.weight(model.get_submodule(name).weight.dtype)
                       for name, grid in grids.items()}
            student = F.log_softmax(_logits(_call(model, batch, device, weights)).float(), dim=-1)
            loss = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        model.train(was_training)
        for p, requires_grad in frozen:
            p.requires_grad_(requires_grad)
    tuned = dict(layers)
    for name, grid in grids.items():
        layer = layers[name]
        scales, lows = grid.exact()
        scales_zeros = torch.stack((scales.t(), int4.zero_points(scales, lows).t()), dim=-1).contiguous()
        tuned[name] = QuantizedLinear("int4", layer.in_features, layer.out_features,
                                      {"qweight": layer.tensors["qweight"],
                                       "scales_zeros": scales_zeros.to(layer.tensors["scales_zeros"].device)},
                                      layer.group_size)
    return tuned


class _Grid:
    """One layer's levels (fixed) and trainable relative grid corrections."""

    def __init__(self, layer, device: torch.device):
        g = layer.group_size
        levels = unpack_int4(layer.tensors["qweight"]).float().to(device)
        sz = layer.tensors["scales_zeros"].float().to(device)
        self.scales0 = sz[..., 0].t().contiguous()  # (N, G)
        self.lows0 = sz[..., 1].t() - 8.0 * self.scales0
        self.levels = levels.reshape(levels.shape[0], -1, g)  # (N, G, g)
        self.in_features = layer.in_features
        self.a = nn.Parameter(torch.zeros_like(self.scales0))
        self.b = nn.Parameter(torch.zeros_like(self.scales0))

    def grid(self) -> tuple[Tensor, Tensor]:
        return self.scales0 * (1.0 + self.a), self.lows0 + self.b * self.scales0

    def weight(self, dtype: torch.dtype) -> Tensor:
        scales, lows = self.grid()
        w = self.levels * scales[..., None] + lows[..., None]
        return w.reshape(w.shape[0], -1)[:, : self.in_features].to(dtype)

    @torch.no_grad()
    def exact(self) -> tuple[Tensor, Tensor]:
        scales, lows = self.grid()
        # A scale trained to (almost) nothing would collapse its group: keep the original there.
        keep = scales > 0.05 * self.scales0
        return int4.exact_grid(torch.where(keep, scales, self.scales0), torch.where(keep, lows, self.lows0))


def _call(model: nn.Module, batch: Any, device: torch.device, weights: "dict[str, Tensor] | None" = None):
    if isinstance(batch, Mapping):
        args, kwargs = (), {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    else:
        args, kwargs = (batch.to(device),), {}
    if weights is None:
        return model(*args, **kwargs)
    # Untied: a quantized lm_head must not replace the embedding it shares its weight with.
    return torch.func.functional_call(model, weights, args, kwargs, tie_weights=False, strict=False)


def _logits(output: Any) -> Tensor:
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    return output

