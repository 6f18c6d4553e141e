"""Rewrite each fused attention to attend over the serving runtime's paged KV cache.

Runs after ``fuse_attention``, on its ``llmopt::attention`` calls, and only
with the ``paging`` group enabled (``paging={"enabled": True}``, or its flat
shorthand ``paged_kv=True``, which the runtime sets; ``passes/paging_options.py``). The protocol the model follows:

* it is called with one packed row of new tokens, ``input_ids (1, T)`` and
  ``position_ids (1, T)`` (each sequence's positions continuing from what it
  has cached), and no cache of its own (``use_cache=False``);
* its attention is causal self-attention (a decoder LM): query ``i`` of a
  sequence sees that sequence's keys up to its own position.

Every Hugging Face Llama-family model (Llama, Qwen2, Mistral, SmolLM2) and any
model whose attention the fuse pass matches follows it when called that way.
Each ``llmopt::attention(q, k, v, mask, ...)`` on ``(1, H, T, D)`` tensors
becomes ``llmopt::paged_attention_layer(q, k, v, layer, scale, impl)`` on ``(T, H, D)``:
it writes the step's K/V into the layer's cache slots and attends each
sequence over its own blocks (see ``runtime/paged_context.py``). The model's
mask (for a packed batch an O(T^2) tensor, or a per-sequence block mask) is
no longer read; the dead-code pass removes the code that built it.

Sites that cannot follow the protocol are left alone, with the reason:
a batch dimension that is not 1, or dropout (training).
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from llmopt.kernels import paged_attention as paged_kernels
import llmopt.kernels.paged_layer  # noqa: F401  (defines llmopt::paged_attention_layer; llmopt.runtime.paged_context implements it)
from llmopt.passes.base import GraphPass, PassContext, PassResult, Rewrite, Skipped
from llmopt.passes.graph_utils import (
    copy_location_meta,
    fake_value,
    known_equal,
    module_path,
    propagate_fake,
)

KIND = "paged_attention"
_ATTENTION = torch.ops.llmopt.attention.default


class PageKVCache(GraphPass):
    name = "page_kv_cache"

    def enabled(self, config) -> bool:
        return config.paging.enabled and super().enabled(config)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        used_names: set[str] = set()
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target is not _ATTENTION:
                continue
            location = module_path(node)
            why = _why_not_pageable(node)
            if why:
                result.skipped.append(Skipped(KIND, location, why))
                continue
            try:
                impl = paged_impl(ctx.config, fake_value(_arg(node, 0)).device)
            except ValueError as error:
                result.skipped.append(Skipped(KIND, location, str(error)))
                continue
            layer = _layer_name(location, used_names)
            had_mask = _arg(node, 3) is not None
            _replace(gm, node, layer, impl)
            result.rewrites.append(Rewrite(KIND, location, f"layer {layer!r}"
                                           + (", model's mask dropped" if had_mask else ""), impl=impl))
        if ctx.config.paging.enabled and not result.rewrites:
            result.notes.append("paging: no fused attention in this graph to page")
        return result


def paged_impl(config, device: torch.device) -> str:
    """The ``llmopt::paged_attention`` implementation a site on ``device`` runs, decided once,
    here, from the ``kernels`` option (``kernels/dispatch.py``)."""
    return paged_kernels.resolve_impl(config.kernels.paged_attention, device, native=config.kernels.native)


def _arg(node: Node, index: int, default=None):
    names = ("q", "k", "v", "attn_mask", "causal_offset", "scale", "dropout_p", "dropout_seed")
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(names[index], default)


def _why_not_pageable(node: Node) -> str:
    q, k = fake_value(_arg(node, 0)), fake_value(_arg(node, 1))
    if q is None or k is None:
        return "no example values for q/k"
    if not known_equal(q.shape[0], 1) or not known_equal(k.shape[0], 1):
        return (f"batch dimension is {q.shape[0]}, not 1: the runtime packs a step's tokens "
                "into one row (input_ids of shape (1, T))")
    if _arg(node, 6, 0.0):
        return "attention dropout is active (training); the paged cache serves inference"
    users = list(node.users)
    if any(u.target is not operator.getitem or u.args[1] != 0 for u in users):
        return "the attention's log-sum-exp is used (a backward?); paging serves inference only"
    return ""


def _layer_name(location: str, used: set[str]) -> str:
    """The cache key: the module path, made unique within the graph."""
    name, n = location, 1
    while name in used:
        n += 1
        name = f"{location}#{n}"
    used.add(name)
    return name


def _replace(gm: GraphModule, node: Node, layer: str, impl: str) -> None:
    graph = gm.graph
    q, k, v = (_arg(node, i) for i in range(3))
    scale = _arg(node, 5)
    if scale is None:
        scale = fake_value(q).shape[-1] ** -0.5
    new_nodes = []

    def call(kind, target, *args):
        new = graph.create_node(kind, target, args)
        new_nodes.append(new)
        return new

    with graph.inserting_before(node):
        # (1, H, T, D) -> (T, H, D); the op makes them contiguous itself.
        packed = [call("call_method", "transpose", call("call_method", "squeeze", x, 0), 0, 1)
                  for x in (q, k, v)]
        out = call("call_function", torch.ops.llmopt.paged_attention_layer.default,
                   *packed, layer, float(scale), impl)
        out = call("call_method", "unsqueeze", call("call_method", "transpose", out, 0, 1), 0)
    for new in new_nodes:
        copy_location_meta(node, new)
    propagate_fake(new_nodes)
    for user in list(node.users):
        user.replace_all_uses_with(out)
        graph.erase_node(user)
    graph.erase_node(node)
