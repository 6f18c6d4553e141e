"""Calibration for Wanda: the L2 norm of every linear layer's input channels.

Forward pre-hooks on each ``nn.Linear`` accumulate ``sum(x_j^2)`` over all
calibration tokens; the norms are the square roots. The same norms serve the
structured scores (``o_proj`` inputs are the per-head attention outputs,
``down_proj`` inputs the MLP channels).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

DEFAULT_CALIBRATION_TOKENS = 2048
DEFAULT_CONTEXT = 512


def calibration_tokens(tokenizer: Any, text: "str | os.PathLike", max_tokens: int | None = None) -> torch.Tensor:
    """Token ids ``(n,)`` of a calibration text (or of the file at a path)."""
    from llmopt.quality import read_text, tokenize

    if isinstance(text, os.PathLike):
        text = read_text(text)
    ids = tokenize(tokenizer, text)
    return ids[:max_tokens] if max_tokens else ids


@torch.no_grad()
def collect_activation_norms(
    model: nn.Module,
    tokens: torch.Tensor,
    context_length: int = DEFAULT_CONTEXT,
    max_tokens: int | None = DEFAULT_CALIBRATION_TOKENS,
) -> dict[str, torch.Tensor]:
    """Run ``model`` on ``tokens`` (1-D ids) in windows; return module name -> input norms.

    Windows do not overlap: each calibration token passes through once.
    """
    tokens = tokens.flatten()[:max_tokens] if max_tokens else tokens.flatten()
    if tokens.numel() < 2:
        raise ValueError("calibration needs at least 2 tokens")
    sums: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_pre_hook(_accumulator(name, sums))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
    device = _device_of(model)
    try:
        for start in range(0, tokens.numel(), context_length):
            window = tokens[start:start + context_length].to(device)[None, :]
            model(window)
    finally:
        for handle in handles:
            handle.remove()
    return {name: total.sqrt() for name, total in sums.items()}


def _accumulator(name: str, sums: dict[str, torch.Tensor]):
    def hook(module, args):
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        squares = (x * x).sum(dim=0)
        sums[name] = sums[name] + squares if name in sums else squares
    return hook


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
