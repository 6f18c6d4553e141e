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
import functools
from typing import Any, Callable, Iterable, Mapping, Optional

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
    device = _device(model)
    return _collect(model, [functools.partial(_run_batch, model, batch, device) for batch in batches],
                    hessians, absmax, layers)


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _run_batch(model: nn.Module, batch: Any, device: torch.device, **extra: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}, **extra)
    return model(batch.to(device), **extra)


def _collect(root: nn.Module, runs: list[Callable[[], Any]], hessians: bool, absmax: bool,
             layers: Optional[set[str]]) -> LayerStatistics:
    """Statistics of the linear layers under ``root`` (paths relative to it) over ``runs``, one per batch."""
    stats = LayerStatistics()
    collector = _Collector(stats, hessians, absmax)
    handles = [
        module.register_forward_pre_hook(collector.hook(name))
        for name, module in root.named_modules()
        if isinstance(module, nn.Linear) and (layers is None or name in layers)
    ]
    try:
        for run in runs:
            collector.start_batch()
            run()
    finally:
        for handle in handles:
            handle.remove()
        collector.start_batch()  # drop the last input it held
    if not stats.absmax and not stats.hessians:
        raise ValueError("calibration reached no linear layer (no batches, or no nn.Linear in the model)")
    return stats


# ---------------------------------------------------------------- block by block


def find_blocks(model: nn.Module, layers: set[str]) -> list[tuple[str, nn.Module]]:
    """The repeated blocks (decoder layers) holding most of ``layers``: the items of the
    ``nn.ModuleList`` that contains the most of them, as ``(path, block)``; [] if none does."""
    best: list[tuple[str, nn.Module]] = []
    best_count = 0
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList):
            continue
        prefix = f"{path}." if path else ""
        count = sum(1 for name in layers if name.startswith(prefix) and name[len(prefix):].split(".")[0].isdigit())
        if count > best_count:
            best = [(f"{prefix}{index}", block) for index, block in enumerate(module)]
            best_count = count
    return best


class BlockInputs:
    """Calibration inputs of a stack of blocks, carried one block at a time.

    Every batch runs through the model once; a hook on each block keeps its
    keyword arguments (attention mask, positions: the same whatever the
    weights) and the first block's input. :meth:`collect` then runs one block
    on what the blocks before it made (with whatever weights they hold now),
    and :meth:`advance` moves to the next block. A key-value cache the model
    passes is dropped (``past_key_values=None``, ``use_cache=False``), so
    running a block again repeats nothing.
    """

    def __init__(self, model: nn.Module, blocks: list[tuple[str, nn.Module]], batches: Iterable[Any]):
        self.blocks = blocks
        self.kwargs: list[list[dict[str, Any]]] = [[] for _ in blocks]
        self.hidden: list[Tensor] = []
        index_of = {id(block): i for i, (_, block) in enumerate(blocks)}

        def keep(module, args, kwargs):
            i = index_of[id(module)]
            if len(args) != 1 or not isinstance(args[0], Tensor):
                raise UnsupportedBlocks(f"block {blocks[i][0]} takes {len(args)} positional arguments, not a hidden state")
            if i == 0:
                self.hidden.append(args[0].detach())
            kwargs = dict(kwargs)
            if "past_key_values" in kwargs:
                kwargs["past_key_values"] = None
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            self.kwargs[i].append(kwargs)

        handles = [block.register_forward_pre_hook(keep, with_kwargs=True) for _, block in blocks]
        device = _device(model)
        try:
            with torch.no_grad():
                for batch in batches:
                    _run_batch(model, batch, device)
                    if any(len(k) != len(self.hidden) for k in self.kwargs):
                        raise UnsupportedBlocks("the blocks do not run once each per forward")
        finally:
            for handle in handles:
                handle.remove()

    def _runs(self, index: int) -> list[Callable[[], Any]]:
        block = self.blocks[index][1]
        return [functools.partial(block, hidden, **kwargs) for hidden, kwargs in zip(self.hidden, self.kwargs[index])]

    @torch.no_grad()
    def collect(self, index: int, layers: set[str]) -> LayerStatistics:
        """Hessians of ``layers`` (paths relative to the block) in block ``index``."""
        return _collect(self.blocks[index][1], self._runs(index), True, False, layers)

    @torch.no_grad()
    def advance(self, index: int) -> None:
        """Block ``index``'s outputs become the next block's inputs."""
        outputs = []
        for run in self._runs(index):
            out = run()
            out = out[0] if isinstance(out, (tuple, list)) else out
            if not isinstance(out, Tensor) or out.shape != self.hidden[len(outputs)].shape:
                raise UnsupportedBlocks(f"block {self.blocks[index][0]} does not return its hidden state")
            outputs.append(out.detach())
        self.hidden = outputs


class UnsupportedBlocks(Exception):
    """The model's blocks cannot be run one at a time (the caller falls back to one pass)."""


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
