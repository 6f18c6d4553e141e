"""Turn Dynamo's graph module into one that runs on its own: ``forward(input_ids, position_ids)``.

Dynamo's graph takes every parameter and buffer as an input, and under dynamic
shapes also the symbolic sizes it used (``s0``, ``s1``), in an order of its
choosing. For export the graph must take only the user's inputs, so:

* parameters and buffers become attributes of the module (``get_attr``), the
  user's tensors shared, not copied (a tied weight stays one attribute);
* each symbolic size becomes ``input.size(dim)`` of the user input that has it;
* the two user inputs become the first placeholders, named ``input_ids`` and
  ``position_ids``.
"""

from __future__ import annotations


import torch
from torch.fx import GraphModule, Node

from llmopt.onnx.capture import INPUT_NAMES as USER_INPUTS, CapturedGraph
from llmopt.onnx.errors import OnnxExportError
from llmopt.passes.eliminate_dead_code import EliminateDeadCode
from llmopt.passes.graph_utils import fake_value, get_constant, install_constant

WEIGHT_PREFIX = "llmopt_onnx_"


def make_standalone(captured: CapturedGraph) -> GraphModule:
    gm, graph = captured.gm, captured.gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    values = dict(zip(placeholders, captured.example_inputs))
    user_inputs = captured.user_inputs
    old_inputs = {user_inputs[n.name]: n for n in placeholders if n.name in user_inputs}
    with graph.inserting_before(placeholders[0]):
        inputs = {name: graph.placeholder(name) for name in USER_INPUTS}
    for name, node in inputs.items():
        node.meta.update(old_inputs[name].meta)
    sizes = _size_sources(old_inputs, inputs)
    attributes: dict[int, str] = {}  # id(tensor) -> attribute name, so shared tensors stay shared
    body = next(n for n in graph.nodes if n.op != "placeholder")

    for node in placeholders:
        name = user_inputs.get(node.name)
        if not node.users and not name:
            graph.erase_node(node)  # e.g. the float weight of a quantized layer: not exported
            continue
        if name:
            replacement = inputs[name]
        elif isinstance(fake_value(node), torch.SymInt):
            replacement = _size_of(graph, node, sizes, body)
        elif isinstance(values[node], torch.Tensor):
            replacement = _attribute(gm, node, values[node], captured.parameters, attributes, body)
        else:
            raise OnnxExportError(f"the traced graph takes an input export cannot provide: {node.name} "
                                  f"= {values[node]!r}")
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
    _keep_only_logits(gm, captured.logits_output)
    graph.lint()
    # A new module: Dynamo's has a wrapped forward(*args) that export cannot read inputs from.
    return GraphModule(gm, graph, class_name="LLMOptExportGraph")


def _keep_only_logits(gm: GraphModule, index: int) -> None:
    graph = gm.graph
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    results = output.args[0]
    results = results if isinstance(results, (list, tuple)) else (results,)
    output.args = ((results[index],),)
    EliminateDeadCode().run(gm, None)


def _size_sources(old_inputs: dict[str, Node], inputs: dict[str, Node]) -> dict:
    """Symbolic size (sympy expression) -> (new input node, dimension) that has it."""
    sizes = {}
    for name, old in old_inputs.items():
        for dim, size in enumerate(fake_value(old).shape):
            if isinstance(size, torch.SymInt):
                sizes.setdefault(size.node.expr, (inputs[name], dim))
    return sizes


def _size_of(graph, node: Node, sizes: dict, body: Node) -> Node:
    expr = fake_value(node).node.expr
    if expr not in sizes:
        raise OnnxExportError(f"the traced graph uses a size ({expr}) that is not a dimension of "
                              f"{' or '.join(USER_INPUTS)}")
    source, dim = sizes[expr]
    with graph.inserting_before(body):
        return graph.call_method("size", (source, dim))


def _attribute(gm: GraphModule, node: Node, value: torch.Tensor, parameters: dict[str, str],
               attributes: dict[int, str], body: Node) -> Node:
    name = attributes.get(id(value))
    if name is None:
        name = install_constant(gm, WEIGHT_PREFIX, parameters.get(node.name, node.name), value.detach())
        attributes[id(value)] = name
    with gm.graph.inserting_before(body):
        return get_constant(gm, name)
