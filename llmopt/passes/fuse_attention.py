"""Rewrite each proven attention region to one ``llmopt::attention`` call.

The matchers in :mod:`llmopt.passes.attention_match` find and prove the
regions (SDPA calls and hand-written matmul/softmax attention, with their
GQA/MQA head repeats); this pass builds the fused call in their place. The
nodes it replaces (repeats, scores, softmax) become dead and are removed by
the dead-code pass. Whatever is not proven is left as it was, with the reason
recorded in the report.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node

import llmopt.kernels.attention  # noqa: F401  (registers llmopt::attention)
from llmopt.kernels import dispatch
from llmopt.kernels.attention import _TRITON_INTERPRET
from llmopt.passes.attention_match import (
    AttentionSite,
    NotProven,
    is_last_dim_softmax,
    match_sdpa,
    match_softmax_attention,
)
from llmopt.passes.fuse_attention_masks import fold_causal_mask
from llmopt.passes.base import GraphPass, PassContext, PassResult, Rewrite, Skipped
from llmopt.passes.graph_utils import (
    copy_location_meta,
    fake_value,
    is_op,
    module_path,
    nested_graph_modules,
    propagate_fake,
)

KIND = "attention"


class FuseAttention(GraphPass):
    name = "fuse_attention"

    def enabled(self, config) -> bool:
        return config.attention and super().enabled(config)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        # checkpointed decoder layers (training with recompute) are nested graphs
        for module in (gm, *nested_graph_modules(gm)):
            self._run_graph(module.graph, ctx, result)
            if module is not gm:
                module.graph.lint()
                module.recompile()
        return result

    def _run_graph(self, graph: Graph, ctx: PassContext, result: PassResult) -> None:
        for node in list(graph.nodes):
            if node.graph is not graph or node not in graph.nodes:
                continue
            if is_op(node, "sdpa"):
                matcher, label = match_sdpa, "sdpa"
            elif is_last_dim_softmax(node):
                matcher, label = match_softmax_attention, "softmax"
            else:
                continue
            location = module_path(node)
            try:
                site = matcher(node)
            except NotProven as why:
                result.skipped.append(Skipped(KIND, location, f"{label}: {why}"))
                continue
            try:
                impl = attention_impl(ctx.config, fake_value(site.query).device)
            except ValueError as why:  # e.g. kernels.attention="triton" for CPU inputs
                result.skipped.append(Skipped(KIND, location, f"{label}: {why}"))
                continue
            folded = fold_causal_mask(site)  # a shape-only mask that is causal: no mask to read
            replace_with_attention(graph, site, impl)
            detail = describe(site) + (" (constant mask proven causal)" if folded else "")
            result.rewrites.append(Rewrite(KIND, location, detail, impl=impl))


def attention_impl(config, device: torch.device) -> str:
    """The implementation a site on ``device`` runs, decided once, here, from the
    ``kernels`` option (``kernels/dispatch.py``)."""
    return dispatch.resolve("attention", config.kernels.attention, device.type,
                            triton_interpret=_TRITON_INTERPRET, native=config.kernels.native)


def replace_with_attention(graph: Graph, site: AttentionSite, impl: str = "auto") -> Node:
    anchor = site.anchor
    new_nodes: list[Node] = []

    def call(kind: str, target: Any, *args: Any) -> Node:
        node = graph.create_node(kind, target, args)
        new_nodes.append(node)
        return node

    with graph.inserting_before(anchor):
        q, k, v = site.query, site.key, site.value
        if site.rank3:  # (batch*heads, L, D) -> (1, batch*heads, L, D)
            q, k, v = (call("call_method", "unsqueeze", x, 0) for x in (q, k, v))
        if site.head_map == "modulo":
            # kv head h % Hkv: put each group's query heads next to each other.
            q = _regroup(call, q, site.q_heads // site.kv_heads, site.kv_heads)
        mask = site.mask if site.form == "sdpa" else _combined_mask(call, site)
        scale = site.scale if site.form == "sdpa" else float(site.scale)
        dropout = ()
        if site.dropout_p:
            device = fake_value(site.query).device
            seed = graph.create_node("call_function", torch.randint, (0, 2**62, ()),
                                     {"dtype": torch.int64, "device": device})
            new_nodes.append(seed)
            dropout = (site.dropout_p, seed)
        fused = call("call_function", torch.ops.llmopt.attention.default, q, k, v, mask, site.causal_offset, scale,
                     *dropout)
        if impl != "auto":
            fused.kwargs = {"impl": impl}
        out = call("call_function", operator.getitem, fused, 0)
        if site.head_map == "modulo":
            out = _regroup(call, out, site.kv_heads, site.q_heads // site.kv_heads)
        if site.rank3:
            out = call("call_method", "squeeze", out, 0)

    for node in new_nodes:
        copy_location_meta(anchor, node)
    propagate_fake(new_nodes)
    anchor.replace_all_uses_with(out)
    graph.erase_node(anchor)
    return out


def _regroup(call, x: Node, outer: int, inner: int) -> Node:
    """Head ``o*inner + i`` -> head ``i*outer + o`` of a (B, H, L, D) tensor."""
    x = call("call_method", "unflatten", x, 1, (outer, inner))
    x = call("call_method", "transpose", x, 1, 2)
    return call("call_method", "flatten", x, 1, 2)


def _combined_mask(call, site: AttentionSite) -> Any:
    allowed = None
    for cond, negate in site.allowed:
        term = call("call_function", torch.logical_not, cond) if negate else cond
        allowed = term if allowed is None else call("call_function", torch.logical_and, allowed, term)
    bias = None
    for node, multiplier in site.additive:
        term = node if multiplier == 1.0 else call("call_function", operator.mul, node, multiplier)
        bias = term if bias is None else call("call_function", operator.add, bias, term)
    if allowed is not None and bias is not None:
        return call("call_function", torch.where, allowed, bias, float("-inf"))
    return allowed if allowed is not None else bias


def describe(site: AttentionSite) -> str:
    parts = [site.form]
    if not site.rank3:
        parts.append(f"{site.q_heads}q/{site.kv_heads}kv heads")
    if site.repeat_removed:
        parts.append(f"KV repeat removed ({site.repeat_removed})")
    masks = [site.mask] if site.mask is not None else []
    if site.allowed:
        parts.append("bool mask")
    if site.additive:
        parts.append("additive mask")
    for m in masks:
        parts.append("bool mask" if fake_value(m).dtype == torch.bool else "additive mask")
    if site.causal_offset is not None:
        parts.append("causal")
    if site.scale is not None:
        parts.append(f"scale={site.scale:g}")
    if site.dropout_p:
        parts.append(f"dropout={site.dropout_p:g}")
    return ", ".join(parts)
