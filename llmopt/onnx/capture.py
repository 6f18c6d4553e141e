"""Capture the llmopt-rewritten graph of a causal LM for export.

The model is traced by Dynamo exactly as ``torch.compile(backend="llmopt")``
would, through the backend itself (so the export sees the same passes, options
and report), on a call that follows the export protocol: ``input_ids`` and
``position_ids`` of shape ``(batch, tokens)``, both dimensions dynamic, no cache of
the model's own (``use_cache=False``), logits out. The backend lowers eagerly
and the rewritten graph module is kept.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule

from llmopt.config import LLMOptConfig
from llmopt.onnx.errors import OnnxExportError
from llmopt.passes.graph_utils import placeholder_sources
from llmopt.rewriter.backend import llmopt_backend
from llmopt.rewriter.report import Report

# Example sizes for tracing: not 0 or 1 (Dynamo specialises those) and all
# different, so no two dynamic dimensions are taken for the same symbol.
EXAMPLE_BATCH = 2
EXAMPLE_TOKENS = 5
INPUT_NAMES = ("input_ids", "position_ids")


@dataclass
class CapturedGraph:
    gm: GraphModule
    example_inputs: list[Any]  # in placeholder order: symbolic sizes, inputs, parameters
    parameters: dict[str, str]  # placeholder name -> module path
    user_inputs: dict[str, str]  # placeholder name -> "input_ids" / "position_ids"
    logits_output: int  # which of the graph's outputs is the logits
    report: Report


def model_logits(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """The export protocol's call: logits ``(batch, tokens, vocab)``."""
    if getattr(model, "config", None) is not None and hasattr(model, "get_decoder"):  # Hugging Face
        out = model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    else:
        out = model(input_ids, position_ids)
    return out.logits if hasattr(out, "logits") else out


def capture(model: torch.nn.Module, config: LLMOptConfig, vocab_size: int) -> CapturedGraph:
    # Exactness mode: the quantize pass then installs fp32 scales (not the bf16 ones of
    # llmopt's CPU kernels) and fp32 arithmetic, as ONNX Runtime computes in fp32.
    # fp32 linears stay F.linear (ONNX MatMul): llmopt::dense_linear is a CPU kernel choice only.
    config = config.replace(kernels=dataclasses.replace(config.kernels, quant_cpu_dtype="float32"),
                            disable_passes=tuple(dict.fromkeys((*config.disable_passes, "route_dense_linear"))))
    inputs = _example_inputs(vocab_size, _device_of(model))
    report, graphs, outputs = Report(), [], []

    def backend(gm, example_inputs):
        # Read what export needs now: Dynamo drops the placeholders' sources after this call.
        parameters = placeholder_sources(gm.graph)
        placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        user_inputs = {placeholders[i]: name for i, value in enumerate(example_inputs)
                       for name, given in inputs.items() if value is given}
        compiled = llmopt_backend(gm, example_inputs, options=config, report=report)
        graphs.append(CapturedGraph(gm, list(example_inputs), parameters, user_inputs, -1, report))

        def run(*args):
            outputs.append(compiled(*args))
            return outputs[-1]

        return run

    torch._dynamo.reset()
    try:
        logits = _trace(model, backend, inputs)
    except Exception as error:  # noqa: BLE001 - Dynamo's many error types; say what export needs
        raise OnnxExportError(
            "could not trace the model into one graph with input_ids and position_ids of dynamic "
            f"shape (batch, tokens) and use_cache=False: {type(error).__name__}: {error}") from error
    finally:
        torch._dynamo.reset()
    if len(graphs) != 1:
        raise OnnxExportError(f"tracing the model gave {len(graphs)} graphs; export needs exactly one")
    captured = graphs[0]
    results = outputs[0] if isinstance(outputs[0], (list, tuple)) else [outputs[0]]
    captured.logits_output = next((i for i, r in enumerate(results) if r is logits), -1)
    if captured.logits_output < 0:
        raise OnnxExportError("the model's logits are not an output of its traced graph")
    missing = [name for name in INPUT_NAMES if name not in captured.user_inputs.values()]
    if missing:
        raise OnnxExportError(f"the traced graph does not read {', '.join(missing)}")
    return captured


def _trace(model, backend, inputs) -> torch.Tensor:
    # The model itself is compiled (not a wrapper), so module paths are the
    # model's own, as quantize_skip patterns and saved weights name them.
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        return model_logits(compiled, inputs["input_ids"], inputs["position_ids"])


def _example_inputs(vocab_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    input_ids = torch.arange(EXAMPLE_BATCH * EXAMPLE_TOKENS).reshape(EXAMPLE_BATCH, EXAMPLE_TOKENS) % vocab_size
    position_ids = torch.arange(EXAMPLE_TOKENS).expand(EXAMPLE_BATCH, -1).contiguous()
    inputs = {"input_ids": input_ids.to(device), "position_ids": position_ids.to(device)}
    for tensor in inputs.values():
        torch._dynamo.mark_dynamic(tensor, 0)
        torch._dynamo.mark_dynamic(tensor, 1)
    return inputs


def _device_of(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")
