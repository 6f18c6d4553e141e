"""Activation recompute: per decoder layer checkpointing, selective policies, the compiler's budget.

* ``"full"``: each decoder layer runs under non-reentrant ``torch.utils.checkpoint``;
  only its inputs are saved, the rest is recomputed in the backward.
* ``"selective"``: the same per layer, with a selective-checkpoint policy
  (``create_selective_checkpoint_contexts``) that saves the outputs of matmuls and
  attention and recomputes the cheap pointwise ops (norms, activations, RoPE).
  Random ops (dropout) are saved too, never recomputed, so a recomputed region
  cannot draw different random numbers from the forward's.
* a float in [0, 1]: ``torch._functorch.config.activation_memory_budget`` for the
  min-cut partitioner while the compiled model runs (0: recompute as much as
  possible, 1: the default, save what the partitioner would).

``"full"`` and ``"selective"`` keep dropout exact because the checkpoint restores
the RNG state before recomputing (``preserve_rng_state``) and the selective policy
saves no random op (a saved one would shift the draws of those recomputed after it).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from llmopt.errors import LLMOptConfigError

__all__ = ["apply", "decoder_layers", "budget_context", "selective_policy", "SAVED_OPS"]

_aten = torch.ops.aten
SAVED_OPS = {
    _aten.mm, _aten.addmm, _aten.bmm, _aten.baddbmm, _aten.matmul, _aten.linear,
    _aten._scaled_dot_product_flash_attention, _aten._scaled_dot_product_efficient_attention,
    _aten._scaled_dot_product_flash_attention_for_cpu, _aten._scaled_dot_product_cudnn_attention,
    _aten.scaled_dot_product_attention,
}


def selective_policy(ctx, op, *args, **kwargs):
    """Save matmuls and attention (aten's SDPA kernels, llmopt's attention ops); recompute
    everything else, random ops and attention with dropout included: the recompute then
    replays every random op in the forward's order from the restored RNG state."""
    if torch.Tag.nondeterministic_seeded in getattr(op, "tags", ()) or _dropout_p(op, args, kwargs):
        return CheckpointPolicy.PREFER_RECOMPUTE
    packet = getattr(op, "overloadpacket", op)
    if packet in SAVED_OPS or getattr(op, "namespace", None) == "llmopt":
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _dropout_p(op, args, kwargs) -> float:
    """The op's ``dropout_p`` argument (0 if it has none): such an op draws random numbers."""
    schema = getattr(op, "_schema", None)
    if schema is None:
        return 0.0
    for index, argument in enumerate(schema.arguments):
        if argument.name == "dropout_p":
            value = kwargs.get("dropout_p", args[index] if index < len(args) else 0.0)
            return float(value or 0.0)
    return 0.0


def decoder_layers(model: torch.nn.Module) -> Optional[torch.nn.ModuleList]:
    """The model's decoder layers: the longest ``nn.ModuleList`` whose items share one class."""
    best = None
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and \
                len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best)):
            best = module
    return best


def apply(model: torch.nn.Module, mode) -> int:
    """Wrap each decoder layer's forward for ``mode`` ("full"/"selective"); "none" and a
    float budget leave the layers alone (a previous wrap is undone). Returns the number
    of layers wrapped."""
    layers = decoder_layers(model)
    if layers is None:
        if mode in ("full", "selective"):
            raise LLMOptConfigError(f"train option 'recompute'={mode!r}: found no decoder layers "
                                    f"(an nn.ModuleList of blocks) in {type(model).__name__}")
        return 0
    for layer in layers:
        original = layer.__dict__.pop("_llmopt_original_forward", None)
        if original is not None:
            layer.forward = original
    if mode not in ("full", "selective"):
        return 0
    context_fn = (functools.partial(create_selective_checkpoint_contexts, selective_policy)
                  if mode == "selective" else None)
    for layer in layers:
        original = layer.forward
        layer._llmopt_original_forward = original
        layer.forward = _checkpointed(original, context_fn)
    return len(layers)


def _checkpointed(forward, context_fn):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        extra = {"context_fn": context_fn} if context_fn is not None else {}
        return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)

    return run


def budget_context(budget: float):
    """The partitioner's activation memory budget while compiled graphs are built."""
    return torch._functorch.config.patch(activation_memory_budget=float(budget))
