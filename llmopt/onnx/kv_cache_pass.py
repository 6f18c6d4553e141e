"""Export-only pass: give each fused attention a key/value cache the graph takes and returns.

The export's counterpart of ``passes/page_kv_cache.py``. On the standalone
graph (``forward(input_ids, position_ids)``), each
``llmopt::attention(q, k, v, mask, ...)`` becomes
``llmopt::attention_kv_cache(q, k, v, past_key, past_value, scale)``
(``kv_attention.py``): with ``kv_cache=True`` the past tensors are new graph
inputs (two per layer, after the user inputs) and the present ones new graph
outputs (after the logits); with ``kv_cache=False`` the past is empty and the
present is dropped, so the graph attends over its own tokens only.

The protocol is the paging pass's: the model is a decoder whose attention is
causal self-attention, so the mask the model built for its own tokens is no
longer read (the dead-code pass removes the code that built it); a sliding
window, which lived in that mask, is taken from the model's config instead. What cannot
follow it is refused with the reason and the place: attention llmopt did not
fuse (it would not see the cache), dropout, an attention whose log-sum-exp is
read, or head counts and sizes that are not fixed.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch.fx import GraphModule, Node

import llmopt.onnx.kv_attention  # noqa: F401  (registers llmopt::attention_kv_cache)
from llmopt.onnx.errors import OnnxExportError
from llmopt.passes.eliminate_dead_code import EliminateDeadCode
from llmopt.passes.graph_utils import fake_value, module_path, static_int
from llmopt.rewriter.report import Report

_ATTENTION = torch.ops.llmopt.attention.default
_ARG_NAMES = ("q", "k", "v", "attn_mask", "causal_offset", "scale", "dropout_p", "dropout_seed")


@dataclass(frozen=True)
class CacheLayer:
    """One attention layer's cache: ``(batch, kv_heads, length, head_dim)`` of ``dtype``."""

    location: str
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    window: int = -1  # sliding window (keys a query sees, itself included); -1: none


def sliding_windows(model: torch.nn.Module) -> Callable[[str], int]:
    """Layer location -> its sliding window, from a Hugging Face config (-1: none).

    The model's own mask, which held the window, is dropped with the rest of
    its mask code, so the window must be stated to the cache op.
    """
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return lambda location: -1
    types = getattr(config, "layer_types", None)

    def window_of(location: str) -> int:
        if types is None:
            return int(window)
        match = re.search(r"layers\.(\d+)\b", location)
        if match is None:
            raise OnnxExportError(f"attention at {location}: cannot tell which layer it is, to give it its "
                                  "sliding window from config.layer_types")
        return int(window) if types[int(match.group(1))] == "sliding_attention" else -1

    return window_of


def check_all_attention_fused(report: Report) -> None:
    left = report.unmatched("attention")
    if left:
        places = "; ".join(f"{s.location}: {s.reason}" for s in left)
        raise OnnxExportError(
            "every attention must be fused by llmopt to be exported with a KV cache (an unfused one "
            f"would attend over the new tokens only); not fused: {places}")


def add_kv_cache(gm: GraphModule, kv_cache: bool = True,
                 window_of: Callable[[str], int] = lambda location: -1) -> list[CacheLayer]:
    graph = gm.graph
    sites = [n for n in graph.nodes if n.op == "call_function" and n.target is _ATTENTION]
    if not sites:
        raise OnnxExportError("llmopt found no attention to fuse in this model (see llmopt.explain); "
                              "the ONNX export needs causal self-attention it can fuse")
    layers = [_cache_layer(node, window_of) for node in sites]
    last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
    for index, (node, layer) in enumerate(zip(sites, layers)):
        if kv_cache:
            with graph.inserting_after(last_input):
                past_key = graph.placeholder(f"past_key_{index}")
            with graph.inserting_after(past_key):
                past_value = last_input = graph.placeholder(f"past_value_{index}")
        else:
            with graph.inserting_before(node):
                past_key, past_value = (_empty_like_length(graph, _arg(node, i)) for i in (1, 2))
        _replace(graph, node, past_key, past_value, layer.window)
    if kv_cache:
        _append_presents(graph, [n for n in graph.nodes if n.target is torch.ops.llmopt.attention_kv_cache.default])
    EliminateDeadCode().run(gm, None)
    graph.lint()
    gm.recompile()
    return layers


def _arg(node: Node, index: int, default=None):
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(_ARG_NAMES[index], default)


def _cache_layer(node: Node, window_of: Callable[[str], int]) -> CacheLayer:
    location = module_path(node)
    q, k = fake_value(_arg(node, 0)), fake_value(_arg(node, 1))
    if q is None or k is None:
        raise OnnxExportError(f"attention at {location}: no example values for q/k")
    if _arg(node, 6, 0.0):
        raise OnnxExportError(f"attention at {location} has active dropout (training); export needs eval mode")
    if any(u.target is not operator.getitem or u.args[1] != 0 for u in node.users):
        raise OnnxExportError(f"attention at {location}: its log-sum-exp is read; only the output can be exported")
    kv_heads, head_dim, q_heads = static_int(k.shape[1]), static_int(k.shape[3]), static_int(q.shape[1])
    if None in (kv_heads, head_dim, q_heads):
        raise OnnxExportError(f"attention at {location}: head counts and head size must be fixed, "
                              f"got q {tuple(q.shape)} and k {tuple(k.shape)}")
    return CacheLayer(location, kv_heads, head_dim, k.dtype, window_of(location))


def _empty_like_length(graph, x: Node) -> Node:
    """``x[:, :, :0]``: an empty past of the right batch, heads, size and dtype."""
    return graph.call_function(operator.getitem, (x, (slice(None), slice(None), slice(0, 0))))


def _replace(graph, node: Node, past_key: Node, past_value: Node, window: int) -> None:
    q, k, v = (_arg(node, i) for i in range(3))
    scale = _arg(node, 5)
    if scale is None:
        scale = static_int(fake_value(q).shape[-1]) ** -0.5
    with graph.inserting_before(node):
        call = graph.call_function(torch.ops.llmopt.attention_kv_cache.default,
                                   (q, k, v, past_key, past_value, float(scale), window))
        out = graph.call_function(operator.getitem, (call, 0))
    for key in ("nn_module_stack", "stack_trace"):
        if key in node.meta:
            call.meta[key] = out.meta[key] = node.meta[key]
    for user in list(node.users):
        user.replace_all_uses_with(out)
        graph.erase_node(user)
    graph.erase_node(node)


def _append_presents(graph, calls: list[Node]) -> None:
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    presents = []
    with graph.inserting_before(output):
        for call in calls:
            presents += [graph.call_function(operator.getitem, (call, 1)),
                         graph.call_function(operator.getitem, (call, 2))]
    results = output.args[0]
    results = tuple(results) if isinstance(results, (list, tuple)) else (results,)
    output.args = (results + tuple(presents),)
