"""``llmopt.export_onnx``: the llmopt-rewritten graph of a causal LM as an ONNX model.

Steps (each its own module):

1. ``capture``: trace the model through the llmopt backend (same passes and
   options as ``torch.compile``), dynamic batch and length.
2. ``standalone``: the graph takes ``input_ids, position_ids`` only; weights
   become attributes.
3. ``quantized_linears``: int4/int8 weight-only linears -> ``llmopt::matmul_nbits``
   with weights converted to ``MatMulNBits``'s format.
4. ``kv_cache_pass``: each fused attention -> ``llmopt::attention_kv_cache``,
   with past key/value inputs and present outputs.
5. ``torch.onnx.export(dynamo=True)`` with the translations of ``translations.py``
   (``GroupQueryAttention``, ``MatMulNBits``); any other llmopt op is refused
   before, by name.

The exported model (``kv_cache=True``):

=============================  ==================================  =======
name                           shape                               dtype
=============================  ==================================  =======
``input_ids``                  (batch, tokens)                     int64
``position_ids``               (batch, tokens)                     int64
``past_key_values.{i}.key``    (batch, kv_heads, past, head_dim)   model's
``past_key_values.{i}.value``  (batch, kv_heads, past, head_dim)   model's
``logits`` (output)            (batch, tokens, vocab)              model's
``present.{i}.key`` (output)   (batch, kv_heads, past + tokens, head_dim)
``present.{i}.value`` (output) (batch, kv_heads, past + tokens, head_dim)
=============================  ==================================  =======

A first step passes an empty past (``past = 0``); each later step passes the
previous step's presents and the new tokens' positions. All rows of a batch
have the same length (no padding mask); ONNX Runtime's GroupQueryAttention
takes several new tokens on top of a non-empty past only with ``batch = 1``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
from torch.fx import GraphModule

from llmopt.config import LLMOptConfig
from llmopt.onnx import capture as capture_module
from llmopt.onnx.errors import OnnxExportError
from llmopt.onnx.kv_cache_pass import CacheLayer, add_kv_cache, check_all_attention_fused, sliding_windows
from llmopt.onnx.quantized_linears import convert_quantized_linears
from llmopt.onnx.standalone import make_standalone
from llmopt.passes.graph_utils import module_path
from llmopt.rewriter.report import Report

# Example sizes for the export's trace (distinct, none 0 or 1: see capture.py).
_EXAMPLE_PAST = 3
_ACCURACY_LEVELS = (0, 1, 2, 3, 4)


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote."""

    path: str
    input_names: list[str]
    output_names: list[str]
    layers: list[CacheLayer] = field(default_factory=list)  # one per attention, in graph order
    kv_cache: bool = True
    quantized_linears: int = 0
    report: Optional[Report] = None  # llmopt's rewrite report of the traced graph

    def __str__(self) -> str:
        cache = (f", {len(self.layers)} layers of KV cache ({self.layers[0].kv_heads} KV heads x "
                 f"{self.layers[0].head_dim})" if self.kv_cache and self.layers else "")
        return (f"ONNX model {self.path}: inputs {', '.join(self.input_names[:2])}"
                f"{' + past_key_values' if self.kv_cache else ''}, outputs logits"
                f"{' + present' if self.kv_cache else ''}{cache}; {len(self.layers)} GroupQueryAttention, "
                f"{self.quantized_linears} MatMulNBits")


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    return f"present.{layer}.key", f"present.{layer}.value"


def export_onnx(
    model: torch.nn.Module,
    path: "str | os.PathLike",
    options: "Mapping[str, Any] | LLMOptConfig | None" = None,
    kv_cache: bool = True,
    *,
    accuracy_level: int = 0,
    opset_version: Optional[int] = None,
    optimize: bool = True,
) -> OnnxExport:
    """Export ``model`` (a causal LM in eval mode) as rewritten by llmopt to ONNX at ``path``.

    ``options`` are the backend's (``{"quantize": "int4", "group_size": 32}``,
    ...); attention is exported as ``com.microsoft::GroupQueryAttention``,
    int4 and int8 weight-only linears as ``com.microsoft::MatMulNBits``
    (``accuracy_level`` is its attribute: 0 computes in the activations' dtype,
    4 lets ONNX Runtime quantize them to int8). With ``kv_cache`` the model
    takes and returns its key/value cache (see this module's docstring for the
    inputs and outputs). ``optimize`` runs onnxscript's graph optimizer on the
    result (torch.onnx's default; ONNX Runtime optimizes again when it loads
    the model). Raises :class:`OnnxExportError`, naming the operator or
    layer, for what cannot be exported.
    """
    _require_exporter()
    config = _export_config(options)
    if accuracy_level not in _ACCURACY_LEVELS:
        raise OnnxExportError(f"accuracy_level must be one of {_ACCURACY_LEVELS}, got {accuracy_level!r}")
    if model.training:
        raise OnnxExportError("the model is in training mode; call model.eval() before exporting")
    captured = capture_module.capture(model, config, _vocab_size(model))
    check_all_attention_fused(captured.report)
    gm = make_standalone(captured)
    quantized = convert_quantized_linears(gm)
    layers = add_kv_cache(gm, kv_cache, sliding_windows(model))
    _drop_unused_attributes(gm)
    _check_translatable(gm)

    args, dynamic_shapes, input_names = _example_inputs(gm, layers, kv_cache)
    output_names = ["logits"] + ([n for i in range(len(layers)) for n in present_names(i)] if kv_cache else [])
    program = _torch_onnx_export(gm, args, dynamic_shapes, input_names, output_names, accuracy_level,
                                 opset_version, optimize)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    program.save(path, external_data=None)  # None: weights in the file unless over 2 GB
    return OnnxExport(path, input_names, output_names, layers, kv_cache, quantized, captured.report)


def _require_exporter() -> None:
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise OnnxExportError(f"the ONNX export needs {' and '.join(missing)}: pip install 'llmopt[onnx]'")


def _export_config(options) -> LLMOptConfig:
    config = options if isinstance(options, LLMOptConfig) else LLMOptConfig.from_options(dict(options or {}))
    if config.paged_kv:
        raise OnnxExportError("option 'paged_kv' is the serving runtime's paged cache; the ONNX export "
                              "has its own KV cache inputs and outputs (kv_cache=True)")
    if not config.attention:
        raise OnnxExportError("option 'attention' is False; the export needs fused attention")
    # Eager lowering: the graph is kept, not run. strict: a pass that fails must not
    # leave a graph the export would silently get wrong.
    return config.replace(lower="eager", strict=True)


def _vocab_size(model: torch.nn.Module) -> int:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return getattr(embeddings, "num_embeddings", None) or getattr(getattr(model, "config", None), "vocab_size", 2)


def _drop_unused_attributes(gm: GraphModule) -> None:
    """Buffers no node reads (weights replaced by quantized or converted copies)
    would otherwise be exported as initializers."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [name for name, _ in gm.named_buffers(recurse=False) if name not in used]:
        delattr(gm, name)
    for name in [name for name, _ in gm.named_parameters(recurse=False) if name not in used]:
        delattr(gm, name)


def _check_translatable(gm: GraphModule) -> None:
    from llmopt.onnx.translations import translation_table

    known = set(translation_table())
    for node in gm.graph.nodes:
        target = node.target
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverload) \
                and target.namespace == "llmopt" and target not in known:
            raise OnnxExportError(
                f"operator {target.name()} (at {module_path(node)}) has no ONNX translation; exportable "
                "llmopt ops: fused attention and int4/int8 weight-only linears (options quantize='int4' "
                "or 'int8')")


def _example_inputs(gm: GraphModule, layers: list[CacheLayer], kv_cache: bool):
    batch, tokens = capture_module.EXAMPLE_BATCH, capture_module.EXAMPLE_TOKENS
    device = next((t.device for t in gm.buffers()), torch.device("cpu"))
    input_ids = torch.zeros((batch, tokens), dtype=torch.long, device=device)
    position_ids = (torch.arange(tokens, device=device) + _EXAMPLE_PAST).expand(batch, -1).contiguous()
    args, names = [input_ids, position_ids], ["input_ids", "position_ids"]
    batch_dim, tokens_dim = torch.export.Dim("batch"), torch.export.Dim("tokens")
    shapes: list[Any] = [{0: batch_dim, 1: tokens_dim}, {0: batch_dim, 1: tokens_dim}]
    if kv_cache:
        past_dim = torch.export.Dim("past")
        for index, layer in enumerate(layers):
            for name in past_names(index):
                args.append(torch.zeros((batch, layer.kv_heads, _EXAMPLE_PAST, layer.head_dim),
                                        dtype=layer.dtype, device=device))
                names.append(name)
                shapes.append({0: batch_dim, 2: past_dim})
    return tuple(args), tuple(shapes), names


def _torch_onnx_export(gm, args, dynamic_shapes, input_names, output_names, accuracy_level, opset_version,
                       optimize):
    from llmopt.onnx.translations import translation_table

    gm.eval()  # a new GraphModule is in training mode, which the exporter warns about
    try:
        with warnings.catch_warnings():
            # The exporter's notes on renamed axes and torch's own deprecations are not the user's.
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            return torch.onnx.export(
                gm, args, dynamo=True, dynamic_shapes=dynamic_shapes, input_names=input_names,
                output_names=output_names, custom_translation_table=translation_table(accuracy_level),
                opset_version=opset_version, verbose=False, optimize=optimize,
            )
    except Exception as error:  # noqa: BLE001 - torch.onnx raises many types; name the op if it said one
        raise OnnxExportError(_describe_failure(gm, error)) from error


def _describe_failure(gm: GraphModule, error: Exception) -> str:
    """One line: the operator ONNX has no translation for (and where it is), or the innermost cause."""
    innermost = error
    while innermost.__cause__ is not None:
        innermost = innermost.__cause__
    text = str(innermost).strip()
    first_line = text.splitlines()[0] if text else repr(innermost)
    match = re.search(r"No ONNX function found for <OpOverload\(op='([\w.]+)', overload='(\w+)'\)>", text)
    if match is None:
        return f"torch.onnx.export failed on the rewritten graph: {type(innermost).__name__}: {first_line}"
    namespace, _, name = match.group(1).rpartition(".")
    operator = f"{namespace}::{name}" + ("" if match.group(2) == "default" else f".{match.group(2)}")
    places = sorted({module_path(n) for n in gm.graph.nodes if n.op == "call_function"
                     and isinstance(n.target, torch._ops.OpOverload) and n.target.name() == f"{namespace}::{name}"})
    where = f" (at {', '.join(places)})" if places else ""
    return f"operator {operator}{where} has no ONNX translation: {first_line}"
