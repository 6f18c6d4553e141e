"""Scores and keep-masks for one weight matrix ``(out_features, in_features)``.

A mask is a bool tensor shaped like the weight, True where the weight stays.
Counts are exact: ``round(sparsity * n)`` entries of each comparison group are
removed, ties broken by position (a stable sort), so the sparsity asked for is
the sparsity obtained.
"""

from __future__ import annotations

import torch

from llmopt.pruning.config import PruneConfig


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """``|W|``, in float32 (bf16 rounding would create ties)."""
    return weight.detach().float().abs()


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """Wanda: ``|W_ij| * ||X_j||_2``, ``input_norms[j]`` the norm of input channel ``j``."""
    if input_norms.dim() != 1 or input_norms.numel() != weight.shape[1]:
        raise ValueError(
            f"activation norms have shape {tuple(input_norms.shape)}; expected ({weight.shape[1]},) "
            "(one per input channel)"
        )
    return magnitude_scores(weight) * input_norms.detach().float().to(weight.device)[None, :]


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Remove the ``sparsity`` fraction with the lowest scores, per matrix or per output row."""
    if per_row:
        remove = round(sparsity * scores.shape[1])
        order = torch.argsort(scores, dim=1, stable=True)[:, :remove]
        mask = torch.ones_like(scores, dtype=torch.bool)
        return mask.scatter_(1, order, False)
    remove = round(sparsity * scores.numel())
    order = torch.argsort(scores.flatten(), stable=True)[:remove]
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[order] = False
    return mask.view_as(scores)


def two_four_mask(scores: torch.Tensor) -> torch.Tensor:
    """In every 4 consecutive input weights of a row, keep the 2 with the highest scores."""
    rows, cols = scores.shape
    if cols % 4:
        raise ValueError(f"2:4 sparsity needs in_features divisible by 4, got {cols}")
    groups = scores.reshape(rows, cols // 4, 4)
    lowest = torch.argsort(groups, dim=-1, stable=True)[..., :2]
    mask = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, lowest, False)
    return mask.reshape(rows, cols)


def weight_mask(weight: torch.Tensor, config: PruneConfig, input_norms: torch.Tensor | None = None) -> torch.Tensor:
    """The keep-mask of one linear weight for an unstructured or 2:4 config."""
    if config.method == "wanda":
        if input_norms is None:
            raise ValueError("wanda pruning needs the layer's input activation norms")
        scores = wanda_scores(weight, input_norms)
    else:
        scores = magnitude_scores(weight)
    if config.pattern == "2:4":
        return two_four_mask(scores)
    if config.pattern == "unstructured":
        # Wanda compares weights within an output row (as its paper does);
        # magnitude pruning compares the whole matrix, its usual form.
        return unstructured_mask(scores, config.sparsity, per_row=config.method == "wanda")
    raise ValueError(f"weight_mask handles 'unstructured' and '2:4', not {config.pattern!r}")


def lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` lowest scores (ties by position), sorted."""
    return torch.sort(torch.argsort(scores, stable=True)[:count]).values
