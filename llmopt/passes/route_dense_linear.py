"""Route fp32 CPU linear layers of inference graphs to ``llmopt::dense_linear``.

Every ``F.linear`` left in float by the quantize pass whose weight and input are
fp32 on CPU becomes one call of :func:`llmopt.kernels.dense_linear.dense_linear`
with the same arguments: calls of ``min_rows`` to ``max_rows`` rows (decode steps;
:func:`~llmopt.kernels.dense_linear.default_min_rows` is 3 on Intel CPUs, 1
elsewhere; :func:`~llmopt.kernels.dense_linear.default_max_rows` 8 on Intel, 16
elsewhere) run llmopt's C kernel, the others (prefill, and on
Intel single rows) ``F.linear``, decided per call from the input's shape. The weight node is the same one (no copy is made), so
the graph still reads the model's parameter.

Left alone: graphs that compute gradients (the op has no autograd formula),
other dtypes and devices, every linear under ``lower="tensorrt"`` (TensorRT
converts ``F.linear`` itself), and every linear when ``kernels.native`` is off
or the C kernel does not build on this machine (the Report notes which).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from llmopt.kernels.dense_linear import default_max_rows, default_min_rows, dense_linear, native_dense_available
from llmopt.passes.base import GraphPass, PassContext, PassResult, Rewrite, Skipped
from llmopt.passes.graph_utils import LINEAR_FUNCTIONS, copy_location_meta, fake_value, module_path, node_arg

KIND = "dense_linear"


class RouteDenseLinear(GraphPass):
    name = "route_dense_linear"

    def enabled(self, config) -> bool:
        # TensorRT converts F.linear itself (and runs on CUDA, where the kernel does not apply).
        return config.kernels.native and config.lower != "tensorrt" and super().enabled(config)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        linears = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in LINEAR_FUNCTIONS]
        if not linears:
            return result
        if ctx.training:
            result.notes.append("graph computes gradients: fp32 linears stay F.linear")
            return result
        if not native_dense_available():
            result.notes.append("the C kernel f32_gemv does not build here: fp32 linears stay F.linear")
            return result
        min_rows, max_rows = default_min_rows(), default_max_rows()
        for node in linears:
            layer = module_path(node)
            x, weight, bias = node_arg(node, 0, "input"), node_arg(node, 1, "weight"), node_arg(node, 2, "bias")
            why = _why_not(fake_value(x), fake_value(weight))
            if why:
                result.skipped.append(Skipped(KIND, layer, why))
                continue
            with gm.graph.inserting_before(node):
                call = gm.graph.call_function(dense_linear, (x, weight, bias, min_rows, max_rows))
            copy_location_meta(node, call)
            call.meta["example_value"] = fake_value(node)
            node.replace_all_uses_with(call)
            gm.graph.erase_node(node)
            n, k = fake_value(weight).shape
            result.rewrites.append(Rewrite(KIND, layer, f"fp32 {n}x{k}: calls of {min_rows}-{max_rows} "
                                           "rows run llmopt's C kernel, others F.linear", impl="native"))
        return result



def _why_not(x, weight) -> str:
    """Why this linear stays ``F.linear`` ("" if it is routed)."""
    if not isinstance(weight, torch.Tensor) or not isinstance(x, torch.Tensor):
        return "no example value for the input or the weight"
    if weight.dim() != 2 or weight.dtype != torch.float32 or x.dtype != torch.float32:
        return f"input {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}: the kernel is for fp32"
    if weight.device.type != "cpu" or x.device.type != "cpu":
        return f"on {weight.device.type}: the kernel is for CPU"
    return ""
