"""prune_model: pruning applied to the nn.Module itself.

"heads" and "channels" physically shrink the projections of Llama-family
models (Llama, Qwen2, Mistral: ``q_proj/k_proj/v_proj/o_proj`` and
``gate_proj/up_proj/down_proj``), so the smaller model is faster under any
backend. "unstructured" and "2:4" zero weights in place (dense storage).

Heads are removed a whole KV-head group at a time (the KV head and the query
heads that read it), the same number in every layer: GQA's head mapping
(query head ``h`` reads KV head ``h // group``) stays valid, and the model
config keeps one head count for all layers, which caches sized from the
config (``StaticCache``) rely on. Channels are removed the same number per
layer for the same reason (``config.intermediate_size``).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import nn

from llmopt.pruning.calibration import calibration_tokens, collect_activation_norms
from llmopt.pruning.config import PruneConfig
from llmopt.pruning.masks import lowest, weight_mask

ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PARTS = ("gate_proj", "up_proj", "down_proj")


@torch.no_grad()
def prune_model(
    model: nn.Module,
    config: "PruneConfig | Mapping[str, Any]",
    calibration_text: "str | os.PathLike | torch.Tensor | None" = None,
    tokenizer: Any = None,
) -> nn.Module:
    """Prune ``model`` IN PLACE and return it (``copy.deepcopy`` first to keep the original).

    ``calibration_text`` (Wanda only, unless ``config.calibration`` already
    holds activation norms): a text with ``tokenizer``, a path to a text file,
    or a 1-D tensor of token ids.
    """
    config = PruneConfig.from_options(config)
    norms = _activation_norms(model, config, calibration_text, tokenizer)
    if config.pattern == "heads":
        prune_heads(model, config, norms)
    elif config.pattern == "channels":
        prune_channels(model, config, norms)
    else:
        _mask_linears(model, config, norms)
    return model


def _activation_norms(model, config: PruneConfig, calibration, tokenizer) -> Mapping[str, torch.Tensor] | None:
    if config.method != "wanda":
        return None
    if config.calibration is not None:
        return config.calibration
    if calibration is None:
        raise ValueError("prune method 'wanda' needs calibration_text (a text, a file path or token ids)")
    if not isinstance(calibration, torch.Tensor):
        if tokenizer is None:
            raise ValueError("prune_model: calibration_text given as text needs the tokenizer")
        calibration = calibration_tokens(tokenizer, calibration)
    return collect_activation_norms(model, calibration)


def _mask_linears(model: nn.Module, config: PruneConfig, norms) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not config.skips(name):
            mask = weight_mask(module.weight, config, norms[name] if norms is not None else None)
            module.weight.mul_(mask.to(module.weight.device))


# ---------------------------------------------------------------- heads


def prune_heads(model: nn.Module, config: PruneConfig, norms=None) -> None:
    layers = _find(model, ATTENTION_PARTS)
    if not layers:
        raise ValueError("heads pruning needs Llama-family attention modules (q_proj, k_proj, v_proj, o_proj)")
    model_config = model.config
    q_heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or q_heads
    group = q_heads // kv_heads
    head_dim = layers[0][1].head_dim
    remove = round(config.sparsity * kv_heads)
    if not 0 < remove < kv_heads:
        raise ValueError(
            f"heads sparsity {config.sparsity} removes {remove} of {kv_heads} KV-head groups per layer; "
            f"whole groups are removed (a KV head and its {group} query heads), so choose a sparsity "
            f"between {0.5 / kv_heads:.3f} and {(kv_heads - 0.5) / kv_heads:.3f}"
        )
    for name, attention in layers:
        scores = _group_scores(attention, name, kv_heads, group, head_dim, config.method, norms)
        dropped = set(lowest(scores, remove).tolist())
        kept = [g for g in range(kv_heads) if g not in dropped]
        q_rows = _rows([h for g in kept for h in range(g * group, (g + 1) * group)], head_dim)
        kv_rows = _rows(kept, head_dim)
        _keep_rows(attention.q_proj, q_rows)
        _keep_rows(attention.k_proj, kv_rows)
        _keep_rows(attention.v_proj, kv_rows)
        _keep_columns(attention.o_proj, q_rows)
        # Older transformers keep per-module head counts; newer ones infer them (view(..., -1, head_dim)).
        for attribute, value in (("num_heads", len(kept) * group), ("num_key_value_heads", len(kept))):
            if hasattr(attention, attribute):
                setattr(attention, attribute, value)
    model_config.num_attention_heads = (kv_heads - remove) * group
    model_config.num_key_value_heads = kv_heads - remove
    model_config.head_dim = head_dim  # no longer hidden_size // num_attention_heads


def _group_scores(attention, name, kv_heads, group, head_dim, method, norms) -> torch.Tensor:
    """One score per KV-head group: how much the group can contribute to the output.

    Magnitude: ``||W_o[:, group columns]|| * ||W_v[group rows]||`` (the value
    path; queries and keys only weight it). Wanda: the sum of the Wanda scores
    ``|W_o| * ||X||`` of the group's ``o_proj`` columns, X the attention output.
    """
    o_weight = attention.o_proj.weight.float()
    per_group = o_weight.shape[0], kv_heads, group * head_dim
    if method == "wanda":
        contribution = o_weight.abs() * norms[f"{name}.o_proj"].float().to(o_weight.device)[None, :]
        return contribution.reshape(per_group).sum(dim=(0, 2))
    o_norm = o_weight.reshape(per_group).pow(2).sum(dim=(0, 2)).sqrt()
    v_norm = attention.v_proj.weight.float().reshape(kv_heads, -1).norm(dim=1)
    return o_norm * v_norm


# ---------------------------------------------------------------- channels


def prune_channels(model: nn.Module, config: PruneConfig, norms=None) -> None:
    mlps = _find(model, MLP_PARTS)
    if not mlps:
        raise ValueError("channels pruning needs Llama-family MLPs (gate_proj, up_proj, down_proj)")
    width = mlps[0][1].down_proj.in_features
    remove = round(config.sparsity * width)
    if not 0 < remove < width:
        raise ValueError(f"channels sparsity {config.sparsity} removes {remove} of {width} channels per layer")
    for name, mlp in mlps:
        scores = _channel_scores(mlp, name, config.method, norms)
        dropped = set(lowest(scores, remove).tolist())
        kept = torch.tensor([c for c in range(width) if c not in dropped])
        _keep_rows(mlp.gate_proj, kept)
        _keep_rows(mlp.up_proj, kept)
        _keep_columns(mlp.down_proj, kept)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(kept)
    model.config.intermediate_size = width - remove


def _channel_scores(mlp, name, method, norms) -> torch.Tensor:
    """One score per intermediate channel.

    Magnitude: ``||gate_j|| * ||up_j|| * ||down[:, j]||`` (zero if any of the
    three is: the channel then adds nothing). Wanda: the sum of the Wanda
    scores of ``down_proj``'s column ``j``.
    """
    down = mlp.down_proj.weight.float()
    if method == "wanda":
        return (down.abs() * norms[f"{name}.down_proj"].float().to(down.device)[None, :]).sum(dim=0)
    return mlp.gate_proj.weight.float().norm(dim=1) * mlp.up_proj.weight.float().norm(dim=1) * down.norm(dim=0)


# ---------------------------------------------------------------- helpers


def _find(model: nn.Module, parts) -> list[tuple[str, nn.Module]]:
    return [
        (name, module) for name, module in model.named_modules()
        if all(isinstance(getattr(module, part, None), nn.Linear) for part in parts)
    ]


def _rows(units: list[int], size: int) -> torch.Tensor:
    """Row indices of whole units of ``size`` rows (heads of head_dim rows)."""
    return torch.cat([torch.arange(u * size, (u + 1) * size) for u in units])


def _keep_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    rows = rows.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight[rows].clone(), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias[rows].clone(), requires_grad=linear.bias.requires_grad)
    linear.out_features = len(rows)


def _keep_columns(linear: nn.Linear, columns: torch.Tensor) -> None:
    columns = columns.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight[:, columns].clone(), requires_grad=linear.weight.requires_grad)
    linear.in_features = len(columns)
