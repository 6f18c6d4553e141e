"""Prove that an attention mask built from shapes alone is the causal mask.

Hugging Face builds its 4-D boolean mask inside the model; under Dynamo it
never takes its own "no mask, ``is_causal=True``" shortcut, so even a batch
without padding reaches SDPA with a materialised ``(B, 1, Lq, Lk)`` mask. When
no input tensor feeds that mask (no ``attention_mask`` was passed: only
``arange``, comparisons and the like on static sizes), its value is fixed for
the graph Dynamo specialised to those sizes: it is evaluated here, once, and if
it equals the causal mask (key ``j`` visible to query ``i`` iff
``j <= i + Lk - Lq``, every batch row alike) the fused call takes
``causal_offset`` and no mask, so the kernel skips the masked half instead of
reading a mask.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.fx import Node

from llmopt.passes.attention_match import AttentionSite
from llmopt.passes.eliminate_dead_code import _has_side_effects
from llmopt.passes.graph_utils import fake_value

# Masks larger than this are not evaluated at compile time (bytes of a bool mask).
MAX_FOLDED_ELEMENTS = 1 << 26
_RANDOM_WORDS = ("rand", "dropout", "bernoulli", "normal", "uniform", "multinomial", "poisson")


def fold_causal_mask(site: AttentionSite) -> bool:
    """If ``site``'s SDPA mask is a constant causal mask, drop it for ``causal_offset``
    (in place) and say so; otherwise leave the site as it was."""
    if site.form != "sdpa" or not isinstance(site.mask, Node) or site.causal_offset is not None:
        return False
    q_len, k_len = fake_value(site.query).shape[-2], fake_value(site.key).shape[-2]
    if not all(isinstance(n, int) for n in (q_len, k_len)):
        return False  # dynamic lengths: the mask is not one constant
    value = evaluate_constant(site.mask)
    if not isinstance(value, torch.Tensor) or value.dtype != torch.bool or value.dim() != 4 \
            or tuple(value.shape[-2:]) != (q_len, k_len) or value.shape[1] != 1:
        return False
    offset = k_len - q_len
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=value.device).tril(offset)
    if not bool((value == causal).all()):
        return False
    site.mask, site.causal_offset = None, offset
    return True


def evaluate_constant(node: Node) -> Optional[Any]:
    """The value of ``node`` if it depends on no graph input (placeholder, attribute or
    module) and no random op, and all its sizes are static; else None."""
    needed: dict[Node, None] = {}
    stack = [node]
    while stack:
        current = stack.pop()
        if current in needed:
            continue
        if current.op not in ("call_function", "call_method") or _is_random_or_inplace(current):
            return None
        needed[current] = None
        stack.extend(current.all_input_nodes)
    value = fake_value(node)
    if isinstance(value, torch.Tensor) and value.numel() > MAX_FOLDED_ELEMENTS:
        return None
    env: dict[Node, Any] = {}
    for current in node.graph.nodes:  # graph order: inputs before users
        if current not in needed:
            continue
        args = torch.fx.node.map_arg(current.args, env.__getitem__)
        kwargs = torch.fx.node.map_arg(current.kwargs, env.__getitem__)
        if any(isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool))
               for a in torch.utils._pytree.tree_leaves((args, kwargs))):
            return None
        try:
            if current.op == "call_method":
                env[current] = getattr(args[0], current.target)(*args[1:], **kwargs)
            else:
                env[current] = current.target(*args, **kwargs)
        except Exception:  # noqa: BLE001 - not evaluable here: leave the mask alone
            return None
    return env[node]


def _is_random_or_inplace(node: Node) -> bool:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return any(word in name.lower() for word in _RANDOM_WORDS) or _has_side_effects(node)
