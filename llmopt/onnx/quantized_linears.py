"""Export-only pass: llmopt's weight-only quantized linears -> ``llmopt::matmul_nbits``.

Each ``llmopt::linear_int4`` / ``llmopt::linear_int8`` reads its packed weight
from buffers the quantize pass installed. Here the weight is converted to
``MatMulNBits``'s format (``matmul_nbits.py``), installed as new buffers and the
call replaced, so the ONNX translation is one ``com.microsoft::MatMulNBits`` node
(for int4, plus the small block-offset product that carries llmopt's float zeros).
The other quantized ops have no weight-only ONNX Runtime form and are refused
by the export (fp8 would need float8 matmuls, w8a8 per-token dynamic int8
activations with llmopt's symmetric scheme).
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

import llmopt.kernels.quantized_linear  # noqa: F401  (registers the llmopt::linear_* ops)
from llmopt.onnx.errors import OnnxExportError
from llmopt.onnx.matmul_nbits import NBitsWeight, block_offsets, from_llmopt_int4, from_llmopt_int8
from llmopt.passes.eliminate_dead_code import EliminateDeadCode
from llmopt.passes.graph_utils import fake_value, get_constant, install_constant, module_path, static_int

_INT4 = torch.ops.llmopt.linear_int4.default
_INT8 = torch.ops.llmopt.linear_int8.default
BUFFER_PREFIX = "llmopt_onnx_nbits_"


def convert_quantized_linears(gm: GraphModule, block_size_int8: int = 128) -> int:
    """Rewrite every int4/int8 linear; returns how many were rewritten."""
    converted: dict[tuple, list[Node]] = {}  # same weight buffers -> same converted buffers
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (_INT4, _INT8):
            continue
        x = node.args[0]
        in_features = static_int(fake_value(x).shape[-1]) if fake_value(x) is not None else None
        if in_features is None:
            raise OnnxExportError(f"{node.target.name()} at {module_path(node)}: input features unknown")
        key = tuple(a.target if isinstance(a, Node) else a for a in node.args[1:])
        if key not in converted:
            weight = _convert(gm, node, in_features, fake_value(x).dtype, block_size_int8)
            converted[key] = _install(gm, node, weight)
        _replace(gm, node, converted[key])
        count += 1
    if count:
        EliminateDeadCode().run(gm, None)
        gm.recompile()
    return count


def _tensor(gm: GraphModule, node: Node) -> torch.Tensor:
    if not isinstance(node, Node) or node.op != "get_attr":
        raise OnnxExportError(f"quantized weight input {node} is not a buffer of the graph")
    return getattr(gm, node.target)


def _convert(gm: GraphModule, node: Node, in_features: int, dtype: torch.dtype, block_size_int8: int) -> NBitsWeight:
    if node.target is _INT4:
        qweight, scales_zeros, group_size = node.args[1:4]
        layout = node.args[4] if len(node.args) > 4 else node.kwargs.get("layout", "nibble")
        return from_llmopt_int4(_tensor(gm, qweight).cpu(), _tensor(gm, scales_zeros).cpu(), group_size,
                                layout, in_features, dtype)
    qweight, scales = node.args[1:3]
    return from_llmopt_int8(_tensor(gm, qweight).cpu(), _tensor(gm, scales).cpu(), in_features, dtype,
                            block_size_int8)


def _install(gm: GraphModule, node: Node, weight: NBitsWeight) -> list:
    device = node.args[0].meta.get("example_value").device
    names = []
    for part in ("b", "scales", "zero_points", "offsets"):
        tensor = getattr(weight, part)
        names.append(None if tensor is None
                      else install_constant(gm, BUFFER_PREFIX, f"{module_path(node)}_{part}", tensor.to(device)))
    return [names, weight.in_features, weight.out_features, weight.bits, weight.block_size]



def _replace(gm: GraphModule, node: Node, installed: list) -> None:
    names, in_features, out_features, bits, block_size = installed
    bias, x = _bias(node), node.args[0]
    graph = gm.graph
    with graph.inserting_before(node):
        b, scales, zero_points, offsets = [None if name is None else get_constant(gm, name) for name in names]
        out = graph.call_function(torch.ops.llmopt.matmul_nbits.default,
                                  (x, b, scales, zero_points, in_features, out_features, bits, block_size, bias))
        new_nodes = [out]
        if offsets is not None:
            correction = graph.call_function(block_offsets, (x, offsets, block_size))
            out = graph.call_function(operator.add, (out, correction))
            new_nodes += [correction, out]
    for new in new_nodes:
        new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
    out.meta["example_value"] = node.meta.get("example_value")
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def _bias(node: Node):
    if node.target is _INT4:
        return node.args[5] if len(node.args) > 5 else node.kwargs.get("bias")
    return node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
