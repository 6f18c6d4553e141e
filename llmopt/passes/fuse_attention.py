"""Rewrite attention regions to one ``llmopt::attention`` call each.

Anchors on each ``F.scaled_dot_product_attention`` call, proves its
arguments from the graph (constant dropout, causal flag and scale; 4-D
q/k/v; mask dtype), and, where the key and value heads were repeated for
GQA/MQA just before the call, feeds the unrepeated tensors to the kernel,
which reads shared heads natively. The repeat nodes become dead and are
removed by the dead-code pass. Anything not proven is left as it was, with
the reason recorded.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node

import llmopt.kernels.attention  # noqa: F401  (registers llmopt::attention)
from llmopt.passes.base import GraphPass, PassContext, PassResult, Rewrite, Skipped
from llmopt.passes.graph_utils import (
    copy_location_meta,
    fake_value,
    is_op,
    known_equal,
    module_path,
    shape_is,
    static_int,
)

KIND = "attention"
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


class NotProven(Exception):
    """A candidate site whose rewrite could not be proven safe."""


@dataclass
class AttentionSite:
    """A proven attention region, ready to become one llmopt::attention call."""

    anchor: Node
    query: Node
    key: Node
    value: Node
    mask: Optional[Node]
    causal_offset: Optional[int]
    scale: Optional[float]
    q_heads: int
    kv_heads: int
    repeat_removed: str  # how the KV heads had been repeated, or ""
    form: str  # "sdpa"


class FuseAttention(GraphPass):
    name = "fuse_attention"

    def enabled(self, config) -> bool:
        return config.attention and super().enabled(config)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        for node in list(gm.graph.nodes):
            if not is_op(node, "sdpa"):
                continue
            try:
                site = match_sdpa(node)
            except NotProven as why:
                result.skipped.append(Skipped(KIND, module_path(node), f"sdpa: {why}"))
                continue
            replace_with_attention(gm, site)
            result.rewrites.append(Rewrite(KIND, module_path(node), describe(site)))
        return result


def match_sdpa(node: Node) -> AttentionSite:
    args = _bind_sdpa(node)
    query, key, value = args["query"], args["key"], args["value"]
    q, k, v = (fake_value(x) for x in (query, key, value))
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        raise NotProven("q/k/v shapes are unknown")
    if not (q.dim() == k.dim() == v.dim() == 4):
        raise NotProven(f"q/k/v are {q.dim()}-D; only (batch, heads, seq, head_dim) is handled")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise NotProven(f"q/k/v dtypes differ or are not floating ({q.dtype}, {k.dtype}, {v.dtype})")

    dropout_p = args["dropout_p"]
    if not isinstance(dropout_p, (int, float)):
        raise NotProven("dropout_p is not a constant")
    if dropout_p != 0:
        raise NotProven(f"dropout_p={dropout_p} (attention dropout is not fused yet)")
    is_causal = args["is_causal"]
    if not isinstance(is_causal, bool):
        raise NotProven("is_causal is not a constant")
    scale = args["scale"]
    if scale is not None and not isinstance(scale, (int, float)):
        raise NotProven("scale is not a constant")
    enable_gqa = args["enable_gqa"]
    if not isinstance(enable_gqa, bool):
        raise NotProven("enable_gqa is not a constant")

    head_dim = q.shape[-1]
    if not (known_equal(k.shape[-1], head_dim) and known_equal(v.shape[-1], head_dim)):
        raise NotProven("value/key head dim differs from the query's")
    if not known_equal(k.shape[0], q.shape[0]) or not shape_is(v, k.shape):
        raise NotProven("batch or key/value shapes do not line up")

    mask = args["attn_mask"]
    if mask is not None:
        m = fake_value(mask)
        if not isinstance(m, torch.Tensor):
            raise NotProven("attn_mask is not a tensor")
        if m.dim() > 4 or not (m.dtype == torch.bool or m.dtype.is_floating_point):
            raise NotProven(f"attn_mask of dtype {m.dtype} and rank {m.dim()} is not handled")
        if m.requires_grad:
            raise NotProven("attn_mask requires grad (a learned bias); its gradient is not computed")
        if is_causal:
            raise NotProven("both attn_mask and is_causal are set")

    q_heads, kv_heads = static_int(q.shape[1]), static_int(k.shape[1])
    if q_heads is None or kv_heads is None:
        raise NotProven("head counts are not static")
    if q_heads % kv_heads != 0:
        raise NotProven(f"{q_heads} query heads are not a multiple of {kv_heads} key/value heads")
    if q_heads != kv_heads and not enable_gqa:
        raise NotProven("query and key/value head counts differ without enable_gqa")

    repeat_removed = ""
    unrepeated_key, key_repeat = unrepeat_kv_heads(key)
    unrepeated_value, value_repeat = unrepeat_kv_heads(value)
    if key_repeat and key_repeat == value_repeat:
        key, value = unrepeated_key, unrepeated_value
        kv_heads = static_int(fake_value(key).shape[1])
        repeat_removed = key_repeat[0]

    return AttentionSite(
        anchor=node,
        query=query,
        key=key,
        value=value,
        mask=mask,
        causal_offset=0 if is_causal else None,
        scale=None if scale is None else float(scale),
        q_heads=q_heads,
        kv_heads=kv_heads,
        repeat_removed=repeat_removed,
        form="sdpa",
    )


def _bind_sdpa(node: Node) -> dict[str, Any]:
    bound = dict(_SDPA_DEFAULTS)
    if len(node.args) > len(_SDPA_PARAMS):
        raise NotProven("unexpected positional arguments")
    bound.update(zip(_SDPA_PARAMS, node.args))
    for name, value in node.kwargs.items():
        if name not in _SDPA_PARAMS:
            raise NotProven(f"unknown argument {name!r}")
        bound[name] = value
    return bound


def unrepeat_kv_heads(node: Any) -> tuple[Any, Optional[tuple[str, int]]]:
    """If ``node`` repeats the heads of a (B, Hkv, L, D) tensor so that head
    ``h`` copies head ``h // n``, return ``(source, (spelling, n))``; else
    ``(node, None)``. Proven from the op chain and the shapes."""
    out = fake_value(node)
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        return node, None

    # x.repeat_interleave(n, dim=1)
    if is_op(node, "repeat_interleave"):
        source = node.args[0]
        repeats = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        x = fake_value(source)
        if (
            isinstance(repeats, int)
            and dim in (1, -3)
            and not node.kwargs.get("output_size")
            and isinstance(x, torch.Tensor)
            and shape_is(out, (x.shape[0], x.shape[1] * repeats, x.shape[2], x.shape[3]))
        ):
            return source, ("repeat_interleave", repeats)
        return node, None

    # x[:, :, None].expand(B, Hkv, n, L, D).reshape(B, Hkv * n, L, D)
    if not is_op(node, "reshape"):
        return node, None
    expanded = node.args[0]
    if not is_op(expanded, "expand"):
        return node, None
    unsqueezed = expanded.args[0]
    e, u = fake_value(expanded), fake_value(unsqueezed)
    if not (isinstance(e, torch.Tensor) and isinstance(u, torch.Tensor) and e.dim() == u.dim() == 5):
        return node, None
    source = _unsqueezed_at_2(unsqueezed)
    x = fake_value(source)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        return node, None
    batch, kv_heads, length, head_dim = x.shape
    n_rep = static_int(e.shape[2])
    if n_rep is None:
        return node, None
    if (
        shape_is(u, (batch, kv_heads, 1, length, head_dim))
        and shape_is(e, (batch, kv_heads, n_rep, length, head_dim))
        and shape_is(out, (batch, kv_heads * n_rep, length, head_dim))
    ):
        return source, ("expand+reshape", n_rep)
    return node, None


def _unsqueezed_at_2(node: Any) -> Any:
    """The tensor ``node`` inserts a unit dim into at position 2, else None."""
    if is_op(node, "unsqueeze"):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return node.args[0] if dim == 2 else None
    if is_op(node, "getitem"):
        index = node.args[1]
        if not isinstance(index, tuple) or sum(i is None for i in index) != 1:
            return None
        full = slice(None, None, None)
        if not all(i is None or i is Ellipsis or i == full for i in index):
            return None
        # With only full slices around, the None lands at dim 2 exactly when
        # the shapes say so, which the caller checks.
        return node.args[0]
    return None


def replace_with_attention(gm: GraphModule, site: AttentionSite) -> Node:
    graph = gm.graph
    anchor = site.anchor
    with graph.inserting_before(anchor):
        fused = graph.call_function(
            torch.ops.llmopt.attention.default,
            (site.query, site.key, site.value, site.mask, site.causal_offset, site.scale),
        )
        out = graph.call_function(operator.getitem, (fused, 0))
    for new in (fused, out):
        copy_location_meta(anchor, new)
    _propagate_fake(fused, out, site)
    anchor.replace_all_uses_with(out)
    graph.erase_node(anchor)
    return out


def _propagate_fake(fused: Node, out: Node, site: AttentionSite) -> None:
    """Give the new nodes example values, as Dynamo's own nodes have."""
    fake_mode = getattr(fake_value(site.query), "fake_mode", None)
    if fake_mode is None:
        return
    args = [fake_value(a) if isinstance(a, Node) else a for a in fused.args]
    with fake_mode:
        result = torch.ops.llmopt.attention.default(*args)
    fused.meta["example_value"] = result
    out.meta["example_value"] = result[0]


def describe(site: AttentionSite) -> str:
    parts = [site.form, f"{site.q_heads}q/{site.kv_heads}kv heads"]
    if site.repeat_removed:
        parts.append(f"KV repeat removed ({site.repeat_removed})")
    if site.mask is not None:
        m = fake_value(site.mask)
        parts.append("bool mask" if m.dtype == torch.bool else "additive mask")
    if site.causal_offset is not None:
        parts.append("causal")
    if site.scale is not None:
        parts.append(f"scale={site.scale:g}")
    return ", ".join(parts)
