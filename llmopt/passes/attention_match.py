"""Find attention regions in a Dynamo graph and prove what they compute.

Two anchors:

* an ``F.scaled_dot_product_attention`` call (:func:`match_sdpa`);
* a softmax over the last axis (:func:`match_softmax_attention`): walk back
  through scaling, masks and casts to a score matmul ``q @ kᵀ`` (4-D matmul or
  3-D bmm over merged batch*heads), and forward through casts and inactive
  dropout to the value matmul ``p @ v``.

Either way the key/value heads may have been repeated for GQA/MQA
(:func:`unrepeat_kv_heads`); the site then carries the unrepeated tensors and
how heads map. A matcher raises :class:`NotProven` with a reason a person can
act on whenever a step is not proven from the graph's ops and example shapes.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.fx import Node

from llmopt.passes.graph_utils import fake_value, is_op, known_equal, op_name, shape_is, static_int

# A masked_fill/where value at or below this (after later scaling) counts as
# "masked out": exp(-1e4) underflows to 0 in fp32, so the results agree except
# on rows where every key is masked (ours are 0 there).
MASKED_FILL_LIMIT = -1.0e4


class NotProven(Exception):
    """A candidate site whose rewrite could not be proven safe."""


@dataclass
class AttentionSite:
    """A proven attention region, ready to become one llmopt::attention call."""

    anchor: Node  # the node whose value the fused call replaces
    query: Any
    key: Any
    value: Any
    form: str  # "sdpa", "matmul" or "bmm"
    q_heads: int
    kv_heads: int
    scale: Optional[float] = None
    causal_offset: Optional[int] = None
    mask: Any = None  # sdpa: the mask node as given
    allowed: list[tuple[Node, bool]] = field(default_factory=list)  # (condition, negate)
    additive: list[tuple[Node, float]] = field(default_factory=list)  # (bias, multiplier)
    head_map: str = "grouped"  # "grouped": q head h reads kv h // G; "modulo": h % Hkv
    repeat_removed: str = ""  # how the KV heads had been repeated, or ""
    rank3: bool = False  # bmm over (batch*heads, L, D)
    dropout_p: float = 0.0  # dropout on the attention weights (training)


# ----------------------------------------------------------------------------- SDPA

_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def match_sdpa(node: Node) -> AttentionSite:
    args = _bind_sdpa(node)
    query, key, value = args["query"], args["key"], args["value"]
    q, k, v = _check_qkv(query, key, value, rank=4)

    dropout_p = args["dropout_p"]
    if not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p < 1:
        raise NotProven(f"dropout_p={dropout_p} is not a constant in [0, 1)")
    is_causal, enable_gqa, scale = args["is_causal"], args["enable_gqa"], args["scale"]
    if not isinstance(is_causal, bool) or not isinstance(enable_gqa, bool):
        raise NotProven("is_causal or enable_gqa is not a constant")
    if scale is not None and not isinstance(scale, (int, float)):
        raise NotProven("scale is not a constant")

    mask = args["attn_mask"]
    if mask is not None:
        _check_mask_tensor(mask)
        if is_causal:
            raise NotProven("both attn_mask and is_causal are set")

    q_heads, kv_heads = _head_counts(q, k)
    if q_heads != kv_heads and not enable_gqa:
        raise NotProven("query and key/value head counts differ without enable_gqa")
    site = AttentionSite(
        anchor=node, query=query, key=key, value=value, form="sdpa",
        q_heads=q_heads, kv_heads=kv_heads,
        scale=None if scale is None else float(scale),
        causal_offset=0 if is_causal else None, mask=mask, dropout_p=float(dropout_p),
    )
    _unrepeat_site(site)
    return site


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


# ----------------------------------------------------------------------------- softmax attention


def is_last_dim_softmax(node: Any) -> bool:
    if not is_op(node, "softmax"):
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    x = fake_value(node.args[0])
    return isinstance(x, torch.Tensor) and dim in (-1, x.dim() - 1)


def match_softmax_attention(softmax: Node) -> AttentionSite:
    scores = softmax.args[0]
    dtype = softmax.kwargs.get("dtype", softmax.args[2] if len(softmax.args) > 2 else None)
    if dtype not in (None, torch.float32):
        raise NotProven(f"softmax in {dtype}")
    score_matmul, transforms = _walk_back_to_score_matmul(scores)
    anchor, value, dropout_p = _walk_forward_to_value_matmul(softmax)

    query, key_t = score_matmul.args[0], score_matmul.args[1]
    rank3 = getattr(fake_value(query), "ndim", 0) == 3
    key = _untranspose(key_t, rank=3 if rank3 else 4)
    q, k, v = _check_qkv(query, key, value, rank=3 if rank3 else 4)

    score_shape = fake_value(score_matmul).shape
    for node in _chain(scores, score_matmul):
        if not shape_is(fake_value(node), score_shape):
            raise NotProven(f"{op_name(node)} broadcasts the scores to a new shape")
    out = fake_value(anchor)
    if out.dtype != q.dtype:
        raise NotProven(f"the output is {out.dtype} but q is {q.dtype}")

    scale, allowed, additive = _fold_transforms(transforms)
    if rank3:
        q_heads = kv_heads = 1
    else:
        q_heads, kv_heads = _head_counts(q, k)
    site = AttentionSite(
        anchor=anchor, query=query, key=key, value=value,
        form="bmm" if rank3 else "matmul", q_heads=q_heads, kv_heads=kv_heads,
        scale=scale, allowed=allowed, additive=additive, rank3=rank3, dropout_p=dropout_p,
    )
    if not rank3:
        _unrepeat_site(site)
    return site


def _walk_back_to_score_matmul(node: Any) -> tuple[Node, list[tuple]]:
    """From the softmax input back to ``q @ kᵀ``; returns it and the transforms
    applied to the scores, innermost (closest to the matmul) first."""
    transforms: list[tuple] = []
    while True:
        if not isinstance(node, Node):
            raise NotProven("the softmax input is not computed in the graph")
        if len(node.users) != 1:
            raise NotProven("the attention scores are also used outside the attention")
        if is_op(node, "matmul") or is_op(node, "bmm"):
            transforms.reverse()
            return node, transforms
        step = _score_step(node)
        if step is None:
            source = node.name if node.op == "placeholder" else op_name(node)
            raise NotProven(f"no q @ kᵀ found before the softmax (the scores come from '{source}')")
        transforms.append(step[1:])
        node = step[0]


def _score_step(node: Node) -> Optional[tuple]:
    """One op on the scores: ``(scores_input, kind, *details)`` or None."""
    if _is_cast(node):
        return (node.args[0], "cast")
    if _is_op_call(node, ("mul", "div", "truediv")):
        a, b = node.args[0], node.args[1]
        for scores, other in ((a, b), (b, a)):
            c = _constant_number(other)
            if c is not None and isinstance(scores, Node) and (scores is a or not _is_div(node)):
                return (scores, "scale", 1.0 / c if _is_div(node) else c)
        return None
    if _is_op_call(node, ("add",)) and len(node.args) == 2 and not node.kwargs:
        a, b = node.args
        for scores, bias in ((a, b), (b, a)):
            if isinstance(scores, Node) and _leads_to_score_matmul(scores) and isinstance(bias, Node):
                return (scores, "add", bias)
        return None
    if _is_masked_fill(node):
        scores, cond, fill = _args(node, 3)
        return (scores, "disallow", cond, _constant_number(fill))
    if _is_where(node):
        cond, a, b = _args(node, 3)
        if isinstance(a, Node) and _constant_number(b) is not None:
            return (a, "allow", cond, _constant_number(b))
        if isinstance(b, Node) and _constant_number(a) is not None:
            return (b, "disallow", cond, _constant_number(a))
    return None


def _leads_to_score_matmul(node: Any) -> bool:
    for _ in range(16):
        if not isinstance(node, Node):
            return False
        if is_op(node, "matmul") or is_op(node, "bmm"):
            return True
        step = _score_step(node)
        if step is None:
            return False
        node = step[0]
    return False


def _walk_forward_to_value_matmul(softmax: Node) -> tuple[Node, Any, float]:
    """From the softmax to ``p @ v``; returns it, ``v`` and the dropout probability."""
    node, dropout_p = softmax, 0.0
    while True:
        users = list(node.users)
        if len(users) != 1:
            raise NotProven("the attention weights are also used outside the attention")
        user = users[0]
        if (is_op(user, "matmul") or is_op(user, "bmm")) and user.args[0] is node:
            return user, user.args[1], dropout_p
        if _is_cast(user):
            node = user
            continue
        if _is_dropout(user):
            p = _active_dropout_p(user)
            if p is None:
                raise NotProven("dropout with a probability or training flag that is not a constant")
            if p and dropout_p:
                raise NotProven("two dropouts on the attention weights")
            dropout_p, node = p, user
            continue
        raise NotProven(f"'{op_name(user)}' between the softmax and the value matmul")


def _fold_transforms(transforms):
    """Turn the ops on the scores into (scale, allowed-conditions, additive biases)."""
    scale = 1.0
    allowed: list[tuple[Node, bool]] = []
    additive: list[list] = []
    pending_fills: list[float] = []  # fill values, scaled by any later scale
    for kind, *details in transforms:
        if kind == "cast":
            continue
        if kind == "scale":
            (c,) = details
            if not c > 0:
                raise NotProven(f"scores scaled by {c} (only positive scales are folded)")
            scale *= c
            for bias in additive:
                bias[1] *= c
            pending_fills = [f * c for f in pending_fills]
        elif kind == "add":
            _check_mask_tensor(details[0])
            additive.append([details[0], 1.0])
        else:  # "allow" / "disallow"
            cond, fill = details
            if fill is None:
                raise NotProven("the masking value is not a constant")
            c = fake_value(cond)
            if not isinstance(c, torch.Tensor) or c.dtype != torch.bool:
                raise NotProven("the mask condition is not a bool tensor")
            allowed.append((cond, kind == "disallow"))
            pending_fills.append(fill)
    if any(not f <= MASKED_FILL_LIMIT for f in pending_fills):
        raise NotProven(f"masked scores are set to {max(pending_fills):g}, not a large negative value")
    return scale, allowed, [(node, mult) for node, mult in additive]


# ----------------------------------------------------------------------------- shared checks


def _check_qkv(query, key, value, rank: int):
    q, k, v = (fake_value(x) for x in (query, key, value))
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        raise NotProven("q/k/v shapes are unknown")
    if not (q.dim() == k.dim() == v.dim() == rank):
        raise NotProven(f"q/k/v are {q.dim()}/{k.dim()}/{v.dim()}-D; expected {rank}-D")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise NotProven(f"q/k/v dtypes differ or are not floating ({q.dtype}, {k.dtype}, {v.dtype})")
    head_dim = q.shape[-1]
    if not (known_equal(k.shape[-1], head_dim) and known_equal(v.shape[-1], head_dim)):
        raise NotProven("the value/key head dim differs from the query's")
    # Key and value lengths may be distinct symbols (two cache tensors); the
    # matmuls (or SDPA) require them equal at run time, and so does the kernel.
    if not all(known_equal(t.shape[0], q.shape[0]) for t in (k, v)):
        raise NotProven("batch sizes of q/k/v do not line up")
    if rank == 4 and not known_equal(k.shape[1], v.shape[1]):
        raise NotProven("key and value head counts differ")
    if rank == 3 and not (known_equal(k.shape[0], v.shape[0])):
        raise NotProven("key and value batch*heads differ")
    return q, k, v


def _check_mask_tensor(mask: Any) -> None:
    m = fake_value(mask)
    if not isinstance(m, torch.Tensor):
        raise NotProven("the mask is not a tensor")
    if m.dim() > 4 or not (m.dtype == torch.bool or m.dtype.is_floating_point):
        raise NotProven(f"a mask of dtype {m.dtype} and rank {m.dim()} is not handled")
    if m.requires_grad:
        raise NotProven("the additive mask requires grad (a learned bias); its gradient is not computed")


def _head_counts(q, k) -> tuple[int, int]:
    q_heads, kv_heads = static_int(q.shape[1]), static_int(k.shape[1])
    if q_heads is None or kv_heads is None:
        raise NotProven("head counts are not static")
    if q_heads % kv_heads != 0:
        raise NotProven(f"{q_heads} query heads are not a multiple of {kv_heads} key/value heads")
    return q_heads, kv_heads


def _untranspose(key_t: Any, rank: int) -> Any:
    """``k`` from ``kᵀ`` when ``kᵀ`` is a transpose of the last two dims, else a
    marker telling the rewrite to insert that transpose itself."""
    if is_op(key_t, "transpose"):
        dims = {d % rank for d in key_t.args[1:3] if isinstance(d, int)}
        if len(key_t.args) == 3 and dims == {rank - 2, rank - 1}:
            return key_t.args[0]
    if _is_op_call(key_t, ("permute",)):
        perm = key_t.args[1:] if len(key_t.args) > 2 else key_t.args[1]
        if list(perm) == [*range(rank - 2), rank - 1, rank - 2]:
            return key_t.args[0]
    raise NotProven("the score matmul's right operand is not a transposed key")


def _unrepeat_site(site: AttentionSite) -> None:
    key, key_repeat = unrepeat_kv_heads(site.key)
    value, value_repeat = unrepeat_kv_heads(site.value)
    if not key_repeat or key_repeat != value_repeat:
        return
    spelling, n_rep, head_map = key_repeat
    if head_map == "modulo" and _mask_has_heads(site):
        return  # would need the mask's heads permuted too; keep the repeat
    site.key, site.value = key, value
    site.kv_heads = site.q_heads // n_rep
    site.head_map = head_map
    site.repeat_removed = spelling


def _mask_has_heads(site: AttentionSite) -> bool:
    masks = [site.mask] + [c for c, _ in site.allowed] + [b for b, _ in site.additive]
    for m in masks:
        t = fake_value(m)
        if isinstance(t, torch.Tensor) and t.dim() >= 3 and static_int(t.shape[-3]) != 1:
            return True
    return False


def unrepeat_kv_heads(node: Any) -> tuple[Any, Optional[tuple[str, int, str]]]:
    """If ``node`` repeats the heads of a (B, Hkv, L, D) tensor ``x``, return
    ``(x, (spelling, n, head_map))``: head ``h`` of ``node`` is head ``h // n``
    of ``x`` (``head_map="grouped"``: expand+reshape, repeat_interleave) or
    head ``h % Hkv`` (``"modulo"``: ``x.repeat(1, n, 1, 1)``). Else ``(node, None)``.
    Proven from the op chain and the shapes."""
    out = fake_value(node)
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        return node, None

    if is_op(node, "repeat_interleave"):
        source, repeats, dim = _args(node, 3, names=("input", "repeats", "dim"))
        x = fake_value(source)
        if (
            isinstance(repeats, int)
            and dim in (1, -3)
            and not node.kwargs.get("output_size")
            and isinstance(x, torch.Tensor)
            and shape_is(out, (x.shape[0], x.shape[1] * repeats, x.shape[2], x.shape[3]))
        ):
            return source, ("repeat_interleave", repeats, "grouped")
        return node, None

    if is_op(node, "repeat"):
        source = node.args[0]
        sizes = node.args[1] if len(node.args) == 2 else node.args[1:]
        x = fake_value(source)
        if (
            isinstance(x, torch.Tensor)
            and x.dim() == 4
            and len(sizes) == 4
            and list(sizes)[0] == 1 and list(sizes)[2:] == [1, 1]
            and isinstance(sizes[1], int)
            and shape_is(out, (x.shape[0], x.shape[1] * sizes[1], x.shape[2], x.shape[3]))
        ):
            return source, ("repeat", sizes[1], "modulo")
        return node, None

    # x[:, :, None].expand(B, Hkv, n, L, D).reshape(B, Hkv * n, L, D)
    if not is_op(node, "reshape") or not is_op(node.args[0], "expand"):
        return node, None
    expanded = node.args[0]
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
        return source, ("expand+reshape", n_rep, "grouped")
    return node, None


def _unsqueezed_at_2(node: Any) -> Any:
    """The tensor ``node`` inserts a unit dim into (checked at dim 2 by the caller's shapes)."""
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
        # With only full slices around it, the None lands at dim 2 exactly
        # when the shapes say so, which the caller checks.
        return node.args[0]
    return None


# ----------------------------------------------------------------------------- op helpers

_FUNCTIONS = {
    "mul": {operator.mul, torch.mul},
    "div": {operator.truediv, torch.div, torch.true_divide},
    "truediv": {operator.truediv},
    "add": {operator.add, torch.add},
    "permute": {torch.permute},
}
_METHODS = {"mul": {"mul", "__mul__"}, "div": {"div", "true_divide", "__truediv__"}, "truediv": set(),
            "add": {"add", "__add__"}, "permute": {"permute"}}


def _is_op_call(node: Any, names) -> bool:
    if not isinstance(node, Node):
        return False
    if node.op == "call_function":
        return any(node.target in _FUNCTIONS[n] for n in names)
    if node.op == "call_method":
        return any(node.target in _METHODS[n] for n in names)
    return False


def _is_div(node: Node) -> bool:
    return _is_op_call(node, ("div",))


def _args(node: Node, count: int, names: tuple = ()) -> list[Any]:
    values = list(node.args[:count])
    for i in range(len(values), count):
        values.append(node.kwargs.get(names[i]) if i < len(names) else None)
    return values


def _is_cast(node: Any) -> bool:
    """A dtype conversion and nothing else (``.float()``, ``.to(dtype)``, ``.type(dtype)``, ``type_as``)."""
    if not isinstance(node, Node) or node.op != "call_method":
        return False
    if node.target in ("float", "half", "bfloat16", "double"):
        return len(node.args) == 1 and not node.kwargs
    if node.target in ("to", "type"):
        rest = list(node.args[1:]) + [v for k, v in node.kwargs.items() if k == "dtype"]
        extra = set(node.kwargs) - {"dtype"}
        return len(rest) == 1 and isinstance(rest[0], torch.dtype) and not extra
    if node.target == "type_as":
        return len(node.args) == 2
    return False


def _is_dropout(node: Any) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in (
        F.dropout, torch.dropout, torch.nn.functional.dropout
    )


def _active_dropout_p(node: Node) -> Optional[float]:
    """The probability a dropout node really applies (0.0 when inactive), or None if unknown."""
    if node.target is torch.dropout:  # torch.dropout(x, p, train)
        p, train = _args(node, 3, names=("input", "p", "train"))[1:]
    else:  # F.dropout(x, p=0.5, training=True, inplace=False)
        p, train = _args(node, 4, names=("input", "p", "training", "inplace"))[1:3]
        p = 0.5 if p is None else p
        train = True if train is None else train
    if not isinstance(train, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        return None
    return float(p) if train else 0.0


def _is_masked_fill(node: Any) -> bool:
    return isinstance(node, Node) and (
        (node.op == "call_method" and node.target == "masked_fill")
        or (node.op == "call_function" and node.target is torch.masked_fill)
    )


def _is_where(node: Any) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target is torch.where \
        and len(node.args) == 3


def _constant_number(value: Any) -> Optional[float]:
    """A Python number, or a 0-dim ``torch.tensor(c)``/``torch.full([], c)`` node of one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, Node) and value.op == "call_function":
        if value.target is torch.full and len(value.args) >= 2 and tuple(value.args[0]) == ():
            return _constant_number(value.args[1])
        if value.target is torch.tensor and value.args and isinstance(value.args[0], (int, float)):
            return _constant_number(value.args[0])
    return None


def _chain(start: Node, stop: Node) -> list[Node]:
    """Nodes from ``start`` back to (excluding) ``stop`` along the score chain."""
    nodes, node = [], start
    while node is not stop:
        nodes.append(node)
        node = _score_step(node)[0]
    return nodes

