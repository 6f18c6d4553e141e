"""Small helpers for reading the graph Dynamo hands the backend.

Dynamo's graph is torch-level: one op has several spellings (``torch.matmul``,
``operator.matmul``, ``Tensor.matmul`` as a method call). Rather than rewrite
every node into one spelling first, passes ask :func:`is_op`, which knows the
spellings of each op they care about.
"""

from __future__ import annotations

import operator
import re
from collections import Counter
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

# op name -> (callables for call_function, method names for call_method)
OP_SPELLINGS: dict[str, tuple[frozenset, frozenset]] = {
    "sdpa": (frozenset({F.scaled_dot_product_attention}), frozenset()),
    "matmul": (frozenset({torch.matmul, operator.matmul}), frozenset({"matmul", "__matmul__"})),
    "bmm": (frozenset({torch.bmm}), frozenset({"bmm"})),
    "softmax": (frozenset({torch.softmax, F.softmax, torch.nn.functional.softmax}), frozenset({"softmax"})),
    "transpose": (frozenset({torch.transpose}), frozenset({"transpose"})),
    "expand": (frozenset(), frozenset({"expand"})),
    "reshape": (frozenset({torch.reshape}), frozenset({"reshape", "view"})),
    "unsqueeze": (frozenset({torch.unsqueeze}), frozenset({"unsqueeze"})),
    "repeat_interleave": (frozenset({torch.repeat_interleave}), frozenset({"repeat_interleave"})),
    "repeat": (frozenset(), frozenset({"repeat"})),
    "getitem": (frozenset({operator.getitem}), frozenset({"__getitem__"})),
}


# The spellings of F.linear in a Dynamo graph (the passes that rewrite linear layers match these).
LINEAR_FUNCTIONS = (F.linear, torch._C._nn.linear)


def node_arg(node: Node, index: int, name: str, default=None) -> Any:
    """A call's argument given by position ``index`` or by keyword ``name``."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def is_op(node: Any, name: str) -> bool:
    """True if ``node`` calls the op ``name`` in any of its spellings."""
    if not isinstance(node, Node):
        return False
    functions, methods = OP_SPELLINGS[name]
    if node.op == "call_function":
        return node.target in functions
    if node.op == "call_method":
        return node.target in methods
    return False


def op_name(node: Node) -> str:
    """A short, stable name for the op a node calls (for op counts)."""
    for name, (functions, methods) in OP_SPELLINGS.items():
        if is_op(node, name):
            return name
    target = node.target
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return str(target).replace("::", ".")
    return getattr(target, "__name__", str(target))


def count_ops(graph: Graph) -> Counter:
    return Counter(
        op_name(n) for n in graph.nodes if n.op in ("call_function", "call_method", "call_module")
    )


def fake_value(node: Any) -> Any:
    """Dynamo's example value (a FakeTensor, SymInt, ...) of a node, or None."""
    if isinstance(node, Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return None


def known_equal(a: Any, b: Any) -> bool:
    """True only if ``a == b`` is provable without adding a guard."""
    return bool(statically_known_true(a == b))


def shape_is(value: Any, expected: Iterable[Any]) -> bool:
    expected = tuple(expected)
    if not isinstance(value, torch.Tensor) or value.dim() != len(expected):
        return False
    return all(known_equal(a, b) for a, b in zip(value.shape, expected))


def static_int(value: Any) -> int | None:
    """``value`` as a Python int if it is one (or a SymInt with a known value)."""
    if isinstance(value, int):
        return value
    if isinstance(value, torch.SymInt):
        known = value.node.maybe_as_int()
        return int(known) if known is not None else None
    return None


def normalize_source(text: str) -> str:
    """Turn Dynamo's source spellings into a dotted module path.

    ``L['self']._modules['model']._modules['layers']._modules['0']``,
    ``L['self'].model.layers[0]`` and ``L['args'][0].model.layers[0]`` all
    become ``model.layers.0`` (and so does the path through a wrapper's closure).
    """
    text = re.sub(r"^L\['([^']*)'\]", r"\1", text)
    text = re.sub(r"\._(?:modules|parameters|buffers)\['([^']*)'\]", r".\1", text)
    text = re.sub(r"\['([^']*)'\]", r".\1", text)
    text = re.sub(r"\[(\d+)\]", r".\1", text)
    # A wrapped forward (e.g. a checkpointed decoder layer) reaches its module through
    # the wrapper's closure: ``layers.0.forward.__closure__.1.cell_contents.__self__``.
    text = re.sub(r"\.forward\.__closure__\.\d+\.cell_contents\.__self__", "", text)
    # The compiled module itself is ``self``, or ``args[0]`` when Dynamo traces
    # a ``*args`` wrapper around its forward (recent transformers do this).
    for root in ("self", "args.0"):
        if text == root:
            return ""
        if text.startswith(root + "."):
            return text[len(root) + 1:]
    return text


def nested_graph_modules(gm: torch.fx.GraphModule) -> list[torch.fx.GraphModule]:
    """The graphs ``gm``'s higher-order ops run, nested ones included, e.g. the body of
    each decoder layer that ``torch.utils.checkpoint`` wraps (Dynamo puts it in a
    ``wrap_body_N`` submodule called through ``tag_activation_checkpoint``). Passes that
    look for regions inside layers must look there too."""
    found: list[torch.fx.GraphModule] = []
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        target = gm
        for part in str(node.target).split("."):
            target = getattr(target, part, None)
        if isinstance(target, torch.fx.GraphModule) and target not in found:
            found.append(target)
            found.extend(m for m in nested_graph_modules(target) if m not in found)
    return found


def module_path(node: Node) -> str:
    """The innermost module (dotted path in the user's model) a node came from."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<top>"
    path = list(stack.values())[-1][0]
    return normalize_source(path) or "<top>"


def placeholder_sources(graph: Graph) -> dict[str, str]:
    """Placeholder name -> module path, for placeholders that are parameters or buffers."""
    sources = {}
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        grapharg = node.meta.get("grapharg")
        source = getattr(grapharg, "source", None)
        if source is None:
            continue
        name = source.name
        name = name() if callable(name) else name
        if "_parameters[" in name or "_buffers[" in name:
            sources[node.name] = normalize_source(name)
    return sources


def copy_location_meta(src: Node, dst: Node) -> None:
    """Give a new node the provenance of the node it replaces."""
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "seq_nr"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]


def propagate_fake(nodes: list[Node]) -> None:
    """Give new nodes example values, as Dynamo's own nodes have."""
    fake_mode = None
    for node in nodes:
        for arg in node.all_input_nodes:
            fake_mode = fake_mode or getattr(fake_value(arg), "fake_mode", None)
    if fake_mode is None:
        return
    with fake_mode:
        for node in nodes:
            args = torch.fx.node.map_arg(node.args, fake_value)
            if node.op == "call_method":
                value = getattr(args[0], node.target)(*args[1:], **node.kwargs)
            else:
                value = node.target(*args, **node.kwargs)
            node.meta["example_value"] = value


# ---------------------------------------------------------------- constants on a graph module


def install_constant(gm: "torch.fx.GraphModule", prefix: str, hint: str, tensor: torch.Tensor) -> str:
    """Register ``tensor`` on ``gm`` as a buffer and return its name (read it with :func:`get_constant`).

    The one way passes (and the ONNX export's graph steps) put tensors on a
    graph module: the name is ``prefix`` + ``hint`` with non-word characters as
    ``_``, made unique by appending ``_`` while ``gm`` has that attribute. On a
    Dynamo graph, AOTAutograd lifts the module's buffers as inputs and asks
    Dynamo's ``_param_name_to_source`` table for each one's source; a
    constant source names ours (unique tensors, so no duplicate-input guard is
    ever built from it).
    """
    name = prefix + re.sub(r"\W", "_", hint)
    while hasattr(gm, name):
        name += "_"
    gm.register_buffer(name, tensor)
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is not None:
        from torch._dynamo.source import ConstantSource

        sources[name] = ConstantSource(name)
    return name


def get_constant(gm: "torch.fx.GraphModule", name: str, fake_mode: Any = None, like: Node | None = None) -> Node:
    """A ``get_attr`` node for the constant ``name``, at the graph's insertion point.

    Its ``example_value`` is ``like``'s (the value it replaces), else a fake of
    the tensor in ``fake_mode``, else none.
    """
    node = gm.graph.get_attr(str(name))
    if like is not None:
        node.meta.update({k: v for k, v in like.meta.items() if k in ("example_value", "val")})
    elif fake_mode is not None:
        node.meta["example_value"] = fake_mode.from_tensor(getattr(gm, str(name)), static_shapes=True)
    return node
