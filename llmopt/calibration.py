"""One calibration collector: forward hooks on every linear layer's input, shared
by quantization (SmoothQuant absmax, GPTQ Hessians) and pruning (Wanda's
input-channel norms).

:func:`collect_statistics` runs the model eagerly on calibration batches with
a forward pre-hook on each ``nn.Linear`` and keeps, per layer, what was asked
for: the largest ``|x_j|`` per input feature (``absmax``), the sum of squares
``sum x_j^2`` per input feature (``squares``; Wanda's norms are their square
roots) and the input Hessian ``H = sum x x^T`` over all calibration tokens
(``hessians``; its diagonal is ``squares``).

Layers fed the very same tensor (q/k/v projections of one attention block,
gate/up of one MLP) share one Hessian: it is computed and stored once.
``Hessians`` take ``sum(K^2)`` floats over the distinct inputs (about 400 MB
for SmolLM2-135M); :class:`llmopt.quantization.calibration.BlockInputs`
collects them one block at a time.

Also here, because both quantization and pruning (and the ``llmopt eval``
harness above them) read calibration text: :func:`read_text`,
:func:`tokenize`, :func:`calibration_tokens`. This module imports nothing
from llmopt.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

__all__ = ["DEFAULT_CONTEXT", "LayerStatistics", "calibration_tokens", "collect_statistics", "read_text",
           "token_batches", "tokenize"]

DEFAULT_CONTEXT = 512


@dataclass
class LayerStatistics:
    """What calibration saw at each linear layer's input (keyed by module path)."""

    absmax: dict[str, Tensor] = field(default_factory=dict)  # (K,) largest |x_j|
    squares: dict[str, Tensor] = field(default_factory=dict)  # (K,) sum x_j^2, fp32
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
    squares: bool = False,
) -> LayerStatistics:
    """Run ``batches`` through ``model`` (eagerly) and record its linear layers' inputs.

    A batch is a tensor (passed as the only argument) or a dict of keyword
    arguments. ``layers`` limits the work to those module paths (default: all).
    """
    device = _device(model)
    return _collect(model, [functools.partial(_run_batch, model, batch, device) for batch in batches],
                    hessians, absmax, layers, squares)


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _run_batch(model: nn.Module, batch: Any, device: torch.device, **extra: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}, **extra)
    return model(batch.to(device), **extra)


def _collect(root: nn.Module, runs: list[Callable[[], Any]], hessians: bool, absmax: bool,
             layers: Optional[set[str]], squares: bool = False) -> LayerStatistics:
    """Statistics of the linear layers under ``root`` (paths relative to it) over ``runs``, one per batch."""
    stats = LayerStatistics()
    collector = _Collector(stats, hessians, absmax, squares)
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
    if not stats.absmax and not stats.hessians and not stats.squares:
        raise ValueError("calibration reached no linear layer (no batches, or no nn.Linear in the model)")
    return stats


class _Collector:
    """The hooks' shared state: which tensor the previous linear layer got, and from whom."""

    def __init__(self, stats: LayerStatistics, hessians: bool, absmax: bool, squares: bool = False):
        self.stats, self.hessians, self.absmax, self.squares = stats, hessians, absmax, squares
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
        if self.squares:
            sums = (rows * rows).sum(dim=0)
            old = self.stats.squares.get(name)
            self.stats.squares[name] = sums if old is None else old + sums
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


# ---------------------------------------------------------------- calibration text


def read_text(path: "str | os.PathLike") -> str:
    """The text of a file, with errors that name the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"text file not found: {path}")
    if not path.is_file():
        raise ValueError(f"not a text file: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"text file is empty: {path}")
    return text


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids ``(n,)`` of ``text``, with the tokenizer's default special tokens."""
    if not text or not text.strip():
        raise ValueError("the text is empty; perplexity needs at least 2 tokens")
    return tokenizer(text, return_tensors="pt")["input_ids"][0]


def calibration_tokens(tokenizer: Any, text: "str | os.PathLike", max_tokens: int | None = None) -> torch.Tensor:
    """Token ids ``(n,)`` of a calibration text (or of the file at a path)."""
    if isinstance(text, os.PathLike):
        text = read_text(text)
    ids = tokenize(tokenizer, text)
    return ids[:max_tokens] if max_tokens else ids
