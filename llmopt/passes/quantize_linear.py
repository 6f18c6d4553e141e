"""Quantize the weights of linear layers (``quantize`` option: int8, int4, fp8, w8a8).

Each ``F.linear`` whose weight is a frozen parameter of the user's model (or a
weight an earlier pass installed, e.g. a pruned copy) becomes one call of the
matching ``llmopt::linear_*`` op of :mod:`llmopt.kernels.quantized_linear`. The
packed weight, scales and zero points are installed on the graph module as
buffers read through ``get_attr`` nodes; the user's module keeps its float
weights (a tied embedding keeps its float matrix; only the linear use is
quantized), and the parameter's placeholder stays, unused.

Layers are named by their module path (``model.layers.0.mlp.up_proj``,
``lm_head``), which is what ``quantize_skip`` patterns and saved weights
(``quantized_weights``: a path written by ``llmopt.quantization.save_quantized``
or a ``QuantizedWeights``) are matched against. A layer found in the saved
weights is installed as saved (never re-quantized); one that is missing is
quantized now, and the report notes it.

Sibling layers, those reading the same input with no bias (a Llama layer's
q/k/v and gate/up projections), share one call: their quantized weights are
stacked along the output features and each layer's output is a ``narrow`` of
the call's. Rows are quantized independently in every mode that merges
(int8, int4, fp8), so the weights are the same as apart; decode saves the
per-call cost of 3 of the 7 calls per layer (its effect: docs/PERFORMANCE.md);
``kernels={"merge_siblings": False}`` keeps one call per layer.

Which kernel each quantized call runs is decided here, once per site, from the
``kernels`` options (``quantized_linear``, ``int4_cpu_kernel``, ``native``,
``quant_cpu_dtype``; :mod:`llmopt.kernels.options`) and the weight's device
(:func:`llmopt.kernels.dispatch.resolve`): the choice is the op call's ``impl``
(and ``compute_dtype``) argument, and ``Rewrite.impl`` in the Report names it
(``"native"``: llmopt's C int4 kernel; ``"torch"``; ``"triton"``).

Left alone, with the reason: graphs that compute gradients (quantized
weights are constants and would get none), weights that are not parameters,
layers matching ``quantize_skip``, non-floating or non-2-D weights.

A model compiled into several graphs (prefill and decode, recompiles) shares
one quantized copy per weight: what was installed is remembered, weakly, per
weight tensor. Quantized copies are taken when a graph is compiled: changing
the model's weights in place afterwards does not reach an existing graph
(Dynamo does not guard on parameter values); recompile to pick them up.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node
from torch.utils.weak import WeakIdKeyDictionary

import llmopt.kernels.quantized_linear as qlinear
from llmopt.passes.base import GraphPass, PassContext, PassResult, Rewrite, Skipped
from llmopt.passes.graph_utils import (LINEAR_FUNCTIONS, copy_location_meta, fake_value, get_constant,
                                      install_constant, module_path, node_arg)
from llmopt.quantization import quantize as quantize_module
from llmopt.quantization.config import QuantConfig
from llmopt.quantization.storage import QuantizedWeights, load_quantized

KIND = "quantize"
BUFFER_PREFIX = "llmopt_quant_"
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OPS = {
    "int8": torch.ops.llmopt.linear_int8.default,
    "int4": torch.ops.llmopt.linear_int4.default,
    "fp8": torch.ops.llmopt.linear_fp8.default,
    "w8a8": torch.ops.llmopt.linear_w8a8.default,
}


class QuantizeLinear(GraphPass):
    name = "quantize_linear"

    def enabled(self, config) -> bool:
        return getattr(config, "quantize", None) is not None and super().enabled(config)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        qconfig = QuantConfig.from_llmopt(ctx.config)
        saved = saved_weights(ctx.config.quantized_weights, qconfig)
        result = PassResult()
        fake_mode = _fake_mode(gm)
        linears = []
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in LINEAR_FUNCTIONS:
                continue
            layer = module_path(node)
            weight_node = node_arg(node, 1, "weight")
            why = _why_not(weight_node, layer, ctx, qconfig)
            if why:
                result.skipped.append(Skipped(KIND, layer, why))
                continue
            weight = _weight_value(gm, weight_node, ctx)
            if not isinstance(weight, torch.Tensor) or isinstance(weight, torch._subclasses.FakeTensor):
                result.skipped.append(Skipped(KIND, layer, "no real value for the weight (fake or sparse)"))
                continue
            try:
                choice = kernel_choice(ctx.config, qconfig.mode, weight)
            except ValueError as why:  # e.g. kernels.quantized_linear="triton" for CPU weights
                result.skipped.append(Skipped(KIND, layer, str(why)))
                continue
            linears.append(_Linear(node, layer, weight_node, weight, choice))
        installed: dict[tuple, list[Any]] = {}  # weight nodes -> op inputs (a weight used twice is quantized once)
        before = after = merged = 0
        for group in _sibling_groups(linears, qconfig, ctx.config.kernels.merge_siblings):
            key = tuple(linear.weight_node for linear in group)
            if key not in installed:
                prepared = _prepare(group, qconfig, saved, group[0].choice)
                installed[key] = _install(gm, _buffer_name(group), prepared.inputs)
                for linear in group:
                    share = prepared.nbytes * linear.weight.shape[0] // prepared.out_features
                    before += linear.weight.numel() * linear.weight.element_size()
                    after += share
                    result.rewrites.append(Rewrite(KIND, linear.layer, prepared.detail(linear, share, group),
                                                   impl=prepared.impl))
            _replace(gm, group, installed[key], qconfig, fake_mode, group[0].choice)
            merged += len(group) if len(group) > 1 else 0
        if installed:
            calls = len(installed)
            layers = sum(len(key) for key in installed)
            result.notes.append(
                f"{qconfig.label}: {layers} linear weight(s), {before / 2**20:.1f} MiB float -> "
                f"{after / 2**20:.1f} MiB quantized (the model keeps its float weights)"
                + (f"; {merged} sibling layers merged, {calls} quantized calls" if merged else "")
            )
        return result


@dataclass(frozen=True)
class KernelChoice:
    """How one quantized site runs, decided when the graph is compiled.

    impl: ``"torch"`` or ``"triton"`` (the op call's ``impl``); compute_dtype: what
    fp32 inputs compute in on CPU (the op's ``compute_dtype``; None off CPU or for
    other dtypes); native_int4: int4 on CPU through llmopt's C kernel.
    """

    impl: str
    compute_dtype: Optional[torch.dtype] = None
    native_int4: bool = False

    @property
    def label(self) -> str:
        """What the Report names (``Rewrite.impl``)."""
        return "native" if self.native_int4 else self.impl


def kernel_choice(config, mode: str, weight: torch.Tensor) -> KernelChoice:
    """The kernel a ``mode`` site with this weight runs, from ``config.kernels`` (once per site).
    Raises ValueError for an implementation that cannot run on the weight's device."""
    kernels = config.kernels
    device = weight.device
    impl = "torch" if mode == "w8a8" else qlinear.resolve_impl(kernels.quantized_linear, device)
    if device.type != "cpu" or impl != "torch":
        return KernelChoice(impl)
    compute = None
    if weight.dtype == torch.float32:
        compute = torch.float32 if kernels.quant_cpu_dtype == "float32" else torch.bfloat16
    native = (mode == "int4" and kernels.int4_cpu_kernel == "native" and kernels.native
              and weight.dtype in qlinear.CPU_KERNEL_DTYPES and compute != torch.float32
              and qlinear.native_int4_available())
    return KernelChoice(impl, compute, native)


@dataclass
class _Linear:
    """One float linear the pass quantizes."""

    node: Node
    layer: str
    weight_node: Node
    weight: torch.Tensor
    choice: KernelChoice


# Modes whose quantized weights concatenate along the output features (w8a8's
# smoothing factors differ from layer to layer, so its siblings stay apart).
MERGEABLE_MODES = ("int8", "int4", "fp8")


def _sibling_groups(linears: list[_Linear], qconfig: QuantConfig, merge: bool = True) -> list[list[_Linear]]:
    """Linears in graph order, siblings grouped: layers reading the same input with
    weights of one dtype and width and no bias (a Llama layer's q/k/v and gate/up)
    become one call of the quantized kernel, one weight read and one dispatch
    instead of three. Their rows are quantized exactly as if they were apart."""
    if not merge or qconfig.mode not in MERGEABLE_MODES:
        return [[linear] for linear in linears]
    groups: dict[tuple, list[_Linear]] = {}
    order: list[list[_Linear]] = []
    seen_weights: set[Node] = set()
    for linear in linears:
        key = (node_arg(linear.node, 0, "input"), linear.weight.dtype, linear.weight.device, linear.weight.shape[1],
               linear.choice)
        alone = (node_arg(linear.node, 2, "bias") is not None or linear.weight_node in seen_weights
                 or not isinstance(key[0], Node))
        seen_weights.add(linear.weight_node)
        if alone:
            order.append([linear])
        elif key in groups:
            groups[key].append(linear)
        else:
            groups[key] = [linear]
            order.append(groups[key])
    return order


# ---------------------------------------------------------------- which layers



def _why_not(weight: Any, layer: str, ctx: PassContext, qconfig: QuantConfig) -> str:
    """Why this linear is left in float ("" if it is quantized)."""
    if ctx.training:
        return "graph computes gradients (training): quantized weights are frozen constants"
    pattern = qconfig.skip_pattern(layer)
    if pattern is not None:
        return f"matches quantize_skip pattern {pattern!r}"
    if not isinstance(weight, Node) or weight.op not in ("placeholder", "get_attr"):
        return "weight is computed in the graph, not a parameter"
    if weight.op == "placeholder" and weight.name not in ctx.parameters:
        return "weight is a graph input, not a parameter"
    value = fake_value(weight)
    if value is not None and (value.dim() != 2 or value.dtype not in FLOAT_DTYPES):
        return f"weight is {tuple(value.shape)} {value.dtype}; needs a 2-D fp32/bf16/fp16 matrix"
    return ""


def _weight_value(gm: GraphModule, weight: Node, ctx: PassContext) -> Any:
    if weight.op == "get_attr":
        value = gm
        for part in weight.target.split("."):
            value = getattr(value, part)
        return value if type(value) in (torch.Tensor, torch.nn.Parameter) else None
    return ctx.parameter_value(gm, ctx.parameters[weight.name])


@dataclass
class _Prepared:
    """A group's op inputs (tensors ready for the kernel, and constants) and what to report."""

    inputs: list[Any]
    nbytes: int
    out_features: int
    label: str
    origin: str
    impl: str = ""

    def detail(self, linear: _Linear, nbytes: int, group: list[_Linear]) -> str:
        float_bytes = linear.weight.numel() * linear.weight.element_size()
        together = ""
        if len(group) > 1:
            others = [other.layer.rsplit(".", 1)[-1] for other in group if other is not linear]
            together = f"one call with {' and '.join(others)}, "
        return f"{self.label}, {float_bytes} -> {nbytes} bytes, {together}{self.origin}"


# first weight of a group -> {settings: (weight versions, label, bytes, origin, weak refs to the inputs)}.
# A model compiled into several graphs (prefill and decode, recompiles for new
# shapes) then shares one quantized copy of each weight and quantizes it once.
# Weak both ways: an entry lives only while its weight and the graphs that hold
# the installed tensors do, and a weight changed in place (its version moved)
# is quantized again.
_PREPARED = WeakIdKeyDictionary()


def _prepare(group: list[_Linear], qconfig: QuantConfig, saved: Optional[QuantizedWeights],
             choice: KernelChoice) -> _Prepared:
    first = group[0].weight
    key = (tuple(linear.layer for linear in group), tuple(id(linear.weight) for linear in group),
           qconfig.mode, qconfig.group_size, first.dtype, str(first.device), choice, _saved_key(saved))
    versions = tuple(linear.weight._version for linear in group)
    out_features = sum(linear.weight.shape[0] for linear in group)
    entries = _PREPARED.setdefault(first, {})
    hit = entries.get(key)
    if hit is not None and hit[0] == versions:
        inputs = [ref() if isinstance(ref, weakref.ref) else ref for ref in hit[4]]
        if all(i is not None for i, ref in zip(inputs, hit[4]) if isinstance(ref, weakref.ref)):
            return _Prepared(inputs, hit[2], out_features, hit[1], "shared with an earlier graph", choice.label)
    parts = [_quantized(linear.layer, linear.weight, qconfig, saved) for linear in group]
    quantized = quantize_module.stack_rows([part for part, _ in parts])
    origins = sorted({origin for _, origin in parts})
    origin = origins[0] if len(origins) == 1 else "partly " + " and partly ".join(origins)
    label = f"int4 g{quantized.group_size}" if quantized.mode == "int4" else quantized.mode
    inputs = _kernel_inputs(quantized, first, choice)
    # Bytes as installed (CPU: scales in the weight's dtype, int8 padded to 16 columns).
    nbytes = sum(i.numel() * i.element_size() for i in inputs if isinstance(i, torch.Tensor))
    prepared = _Prepared(inputs, nbytes, out_features, label, origin, choice.label)
    refs = [weakref.ref(i) if isinstance(i, torch.Tensor) else i for i in prepared.inputs]
    entries[key] = (versions, label, prepared.nbytes, origin, refs)
    return prepared


def _saved_key(saved: Optional[QuantizedWeights]) -> Any:
    return None if saved is None else getattr(saved, "_llmopt_source", id(saved))


def _quantized(layer: str, weight: torch.Tensor, qconfig: QuantConfig, saved: Optional[QuantizedWeights]):
    """The layer's quantized weight and where it came from ("saved" or "quantized now")."""
    if saved is not None and layer in saved.layers:
        stored = saved.layers[layer]
        if (stored.out_features, stored.in_features) != tuple(weight.shape):
            raise ValueError(
                f"saved quantized weights for {layer!r} are {stored.out_features}x{stored.in_features}, "
                f"the model's weight is {tuple(weight.shape)}; were they made from another model?"
            )
        return stored, "saved"
    # Through the module attribute, so tests can count calls. No calibration
    # data reaches the compiler: GPTQ weights come in through `quantized_weights`.
    method = qconfig.resolved_method(calibrated=False)
    quantized = quantize_module.quantize_weight(weight, qconfig.mode, qconfig.group_size, method=method)
    return quantized, "quantized now" + (" (not in the saved weights)" if saved is not None else "")


# ---------------------------------------------------------------- saved weights


def saved_weights(option: Any, qconfig: QuantConfig) -> Optional[QuantizedWeights]:
    """The ``quantized_weights`` option as a QuantizedWeights matching ``qconfig`` (or None)."""
    if option is None:
        return None
    weights = option if isinstance(option, QuantizedWeights) else _load(option)
    if weights.mode != qconfig.mode or (qconfig.mode == "int4" and weights.group_size != qconfig.group_size):
        raise ValueError(
            f"option 'quantized_weights' holds {weights.label()} weights but the options ask for "
            f"{qconfig.label}; set 'quantize'/'group_size' to match the saved weights"
        )
    return weights


def _load(path: Any) -> QuantizedWeights:
    # Read again for each graph (memory-mapped, so cheap); the file's name and
    # modification time identify its layers in the cache of prepared weights.
    path = os.path.abspath(os.fspath(path))
    weights = load_quantized(path)
    weights._llmopt_source = (path, os.stat(path).st_mtime_ns)
    return weights


# ---------------------------------------------------------------- rewriting


class _Buffer(str):
    """Name of a tensor installed on the graph module (read through a get_attr node)."""


def _kernel_inputs(quantized, weight: torch.Tensor, choice: KernelChoice) -> list[Any]:
    """The op's arguments after ``x`` (bias and group size aside), on the weight's
    device, in the layout its kernel reads."""
    t = {k: v.to(weight.device) for k, v in quantized.tensors.items()}
    cpu = weight.device.type == "cpu" and choice.impl != "triton"
    if cpu and quantized.mode == "int8":
        t["scales"] = t["scales"].to(weight.dtype)
    if quantized.mode == "int4" and cpu and choice.native_int4:
        # llmopt's C kernel (int8 activations x int4 weights): any N, its own tile order, bf16 scales.
        qweight, scales = qlinear.to_cpu_native_int4_layout(t["qweight"], t["scales_zeros"])
        return [qweight, scales, "cpu_native"]
    if cpu and quantized.mode == "int4":
        # PyTorch's CPU kernel takes its scales in the dtype it computes in (bf16 for fp32 models).
        t["scales_zeros"] = t["scales_zeros"].to(qlinear.cpu_compute_dtype(weight.dtype, choice.compute_dtype))
    if quantized.mode == "int4":
        # PyTorch's CPU int4 kernel needs N % 16 == 0; other shapes keep the nibble layout (reference path).
        tiled = cpu and quantized.out_features % 16 == 0 and weight.dtype in qlinear.CPU_KERNEL_DTYPES
        qweight = qlinear.to_cpu_int4_layout(t["qweight"]) if tiled else t["qweight"]
        return [qweight, t["scales_zeros"], "cpu_tiled" if tiled else "nibble"]
    if quantized.mode == "int8" and cpu:
        return [qlinear.pad_int8_for_cpu(t["qweight"]), t["scales"]]
    if quantized.mode == "w8a8":
        return [t["qweight"], t["scales"], t.get("smooth")]
    return [t["qweight"], t["scales"]]


def _install(gm: GraphModule, layer: str, inputs: list[Any]) -> list[Any]:
    """Register the tensors among ``inputs`` as constants on ``gm`` (replaced by their names)."""
    return [_Buffer(install_constant(gm, BUFFER_PREFIX, f"{layer}_{i}", value)) if isinstance(value, torch.Tensor)
            else value for i, value in enumerate(inputs)]


def _replace(gm: GraphModule, group: list[_Linear], installed: list[Any], qconfig: QuantConfig, fake_mode,
             choice: KernelChoice) -> None:
    """One quantized call for the group; each member's output is its slice of the call's."""
    graph = gm.graph
    first = group[0].node
    x, bias = node_arg(first, 0, "input"), node_arg(first, 2, "bias")
    with graph.inserting_before(first):
        inputs = [get_constant(gm, v, fake_mode) if isinstance(v, _Buffer) else v for v in installed]
        if qconfig.mode == "int4":
            qweight, scales_zeros, layout = inputs
            args = (x, qweight, scales_zeros, qconfig.group_size, layout, bias)
        else:
            args = (x, *inputs, bias)
        kwargs: dict[str, Any] = {}
        if qconfig.mode != "w8a8":
            kwargs["impl"] = choice.impl
            if qconfig.mode != "fp8" and choice.compute_dtype is not None:
                kwargs["compute_dtype"] = choice.compute_dtype
        call = graph.call_function(OPS[qconfig.mode], args, kwargs)
        copy_location_meta(first, call)
        outputs = [call]
        if len(group) > 1:
            call.meta["example_value"] = _stacked_fake(group)
            outputs, start = [], 0
            for linear in group:
                rows = linear.weight.shape[0]
                outputs.append(graph.call_function(torch.narrow, (call, -1, start, rows)))
                copy_location_meta(linear.node, outputs[-1])
                start += rows
    for linear, output in zip(group, outputs):
        output.meta["example_value"] = fake_value(linear.node)
        linear.node.replace_all_uses_with(output)
        graph.erase_node(linear.node)


def _buffer_name(group: list[_Linear]) -> str:
    # model.layers.0.self_attn.q_proj, then the siblings' last names: ..._q_proj_k_proj_v_proj
    return "_".join([group[0].layer] + [linear.layer.rsplit(".", 1)[-1] for linear in group[1:]])


def _stacked_fake(group: list[_Linear]):
    """The merged call's fake output: the members' outputs side by side."""
    value = fake_value(group[0].node)
    if value is None:
        return None
    rows = sum(linear.weight.shape[0] for linear in group)
    with value.fake_mode:
        return value.new_empty((*value.shape[:-1], rows))


def _fake_mode(gm: GraphModule):
    for node in gm.graph.nodes:
        mode = getattr(fake_value(node), "fake_mode", None)
        if mode is not None:
            return mode
    return None
