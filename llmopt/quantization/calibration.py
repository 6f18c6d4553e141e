"""Quantization's calibration: the shared statistics collector, and block-by-block inputs.

The statistics themselves (absmax for SmoothQuant, input Hessians for GPTQ)
come from the one forward-hook collector shared with pruning,
:mod:`llmopt.calibration`; its names are re-exported here. What is
quantization's own: :func:`find_blocks` and :class:`BlockInputs`, which carry
calibration inputs one decoder block at a time (true-sequential GPTQ,
activation scaling).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from llmopt.calibration import (DEFAULT_CONTEXT, LayerStatistics, _collect, _device, _run_batch,
                                collect_statistics, token_batches)

__all__ = ["BlockInputs", "DEFAULT_CONTEXT", "LayerStatistics", "UnsupportedBlocks", "collect_statistics",
           "find_blocks", "token_batches"]

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
