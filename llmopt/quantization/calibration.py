"""Calibration statistics of every linear layer's inputs, from a forward pass over sample text.

``collect_statistics`` runs the model eagerly on calibration batches with a
forward pre-hook on each ``nn.Linear`` and keeps, per layer, what the
quantizers need: the largest ``|x_j|`` per input feature (SmoothQuant) and the
input Hessian ``H = sum x x^T`` over all calibration tokens (GPTQ, and its
diagonal ``sum x_j^2`` as the importance of feature ``j``).

Layers fed the very same tensor (q/k/v projections of one attention block,
gate/up of one MLP) share one Hessian: it is computed and stored once.
``Hessians`` take ``sum(K^2)`` floats over the distinct inputs (about 400 MB
for SmolLM2-135M); a model much larger than that would want them collected
block by block, which this does not do yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

DEFAULT_CONTEXT = 512


@dataclass
class LayerStatistics:
    """What calibration saw at each linear layer's input (keyed by module path)."""

    absmax: dict[str, Tensor] = field(default_factory=dict)  # (K,) largest |x_j|
    hessians: dict[str, Tensor] = field(default_factory=dict)  # owner layer -> (K, K) sum x x^T, fp32
    hessian_owner: dict[str, str] = field(default_factory=dict)  # layer -> the layer whose Hessian it shares
    tokens: int = 0

    def hessian(self, layer: str) -> Optional[Tensor]:
        owner = self.hessian_owner.get(layer)
        return None if owner is None else self.hessians[owner]


def token_batches(tokens: Tensor, context_length: int = DEFAULT_CONTEXT) -> list[Tensor]:
    """1-D token ids -> ``(1, L)`` windows that do not overlap (each token passes once)."""
    tokens = tokens.flatten()
    if tokens.numel() < 2:
        raise ValueError("calibration needs at least 2 tokens")
    return [tokens[i:i + context_length][None, :] for i in range(0, tokens.numel(), context_length)]


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    hessians: bool = True,
    absmax: bool = True,
    layers: Optional[set[str]] = None,
) -> LayerStatistics:
    """Run ``batches`` through ``model`` (eagerly) and record its linear layers' inputs.

    A batch is a tensor (passed as the only argument) or a dict of keyword
    arguments. ``layers`` limits the work to those module paths (default: all).
    """
    stats = LayerStatistics()
    collector = _Collector(stats, hessians, absmax)
    handles = [
        module.register_forward_pre_hook(collector.hook(name))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (layers is None or name in layers)
    ]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        for batch in batches:
            collector.start_batch()
            if isinstance(batch, Mapping):
                model(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()})
            else:
                model(batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
        collector.start_batch()  # drop the last input it held
    if not stats.absmax and not stats.hessians:
        raise ValueError("calibration reached no linear layer (no batches, or no nn.Linear in the model)")
    return stats


class _Collector:
    """The hooks' shared state: which tensor the previous linear layer got, and from whom."""

    def __init__(self, stats: LayerStatistics, hessians: bool, absmax: bool):
        self.stats, self.hessians, self.absmax = stats, hessians, absmax
        self.counted = False  # this batch's tokens were counted
        self.last_input: Optional[Tensor] = None  # held, so `is` cannot match a recycled object
        self.last_owner = ""

    def start_batch(self) -> None:
        self.counted = False
        self.last_input, self.last_owner = None, ""

    def hook(self, name: str):
        def record(module, args):
            self.record(name, args[0])
        return record

    def record(self, name: str, x: Tensor) -> None:
        shared = x is self.last_input
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        if self.absmax:
            amax = rows.abs().amax(dim=0)
            old = self.stats.absmax.get(name)
            self.stats.absmax[name] = amax if old is None else torch.maximum(old, amax)
        if self.hessians:
            self._hessian(name, rows, shared)
        if not shared:
            self.last_input, self.last_owner = x, name
        if not self.counted:  # the batch's first linear layer sees every token of it
            self.stats.tokens += rows.shape[0]
            self.counted = True

    def _hessian(self, name: str, rows: Tensor, shared: bool) -> None:
        owners = self.stats.hessian_owner
        owner = self.last_owner if shared else name
        if name not in owners:
            owners[name] = owner
        elif owners[name] != owner:
            raise RuntimeError(
                f"calibration: layer {name!r} shared its input with {owners[name]!r} in one batch "
                f"but not in another; the model's forward is not the same for every batch"
            )
        if shared:
            return
        product = rows.t() @ rows
        old = self.stats.hessians.get(name)
        self.stats.hessians[name] = product if old is None else old.add_(product)
