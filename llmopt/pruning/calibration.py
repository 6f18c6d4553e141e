"""Calibration for Wanda: the L2 norm of every linear layer's input channels.

The norms are the square roots of ``sum(x_j^2)`` over all calibration tokens,
collected by the forward-hook collector pruning shares with quantization
(:func:`llmopt.calibration.collect_statistics`, ``squares=True``). The same
norms serve the structured scores (``o_proj`` inputs are the per-head
attention outputs, ``down_proj`` inputs the MLP channels).
"""

from __future__ import annotations

import torch
from torch import nn

from llmopt.calibration import DEFAULT_CONTEXT, calibration_tokens, collect_statistics, token_batches

__all__ = ["DEFAULT_CALIBRATION_TOKENS", "DEFAULT_CONTEXT", "calibration_tokens", "collect_activation_norms"]

DEFAULT_CALIBRATION_TOKENS = 2048


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
    stats = collect_statistics(model, token_batches(tokens, context_length), hessians=False, absmax=False,
                               squares=True)
    return {name: total.sqrt() for name, total in stats.squares.items()}
