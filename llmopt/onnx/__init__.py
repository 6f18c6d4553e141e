"""Export the llmopt-rewritten graph of a causal LM to ONNX, and run it with ONNX Runtime.

``export_onnx(model, path, options=..., kv_cache=True)`` writes the model with
attention as ``com.microsoft::GroupQueryAttention`` and int4/int8 weight-only
linears as ``com.microsoft::MatMulNBits`` (see ``export.py`` for the inputs and
outputs); ``OnnxCausalLM`` runs such a file with onnxruntime and numpy only
(prefill, decode steps, greedy generation).

Needs the ``onnx`` extra: ``pip install 'llmopt[onnx]'`` (onnx, onnxscript, onnxruntime).
"""

from llmopt.onnx.errors import OnnxExportError
from llmopt.onnx.export import OnnxExport, export_onnx, past_names, present_names

__all__ = ["OnnxCausalLM", "OnnxExport", "OnnxExportError", "export_onnx", "past_names", "present_names"]


def __getattr__(name):
    if name == "OnnxCausalLM":  # needs onnxruntime, which export does not
        from llmopt.onnx.runtime import OnnxCausalLM

        return OnnxCausalLM
    raise AttributeError(f"module 'llmopt.onnx' has no attribute {name!r}")
