"""llmopt: a PyTorch compiler plugin and serving runtime for large language models.

``torch.compile(model, backend="llmopt", options={...})`` rewrites attention to
fused kernels and lowers the result to Inductor (default) or runs it eagerly.
"""

from llmopt.config import LLMOptConfig, LLMOptConfigError
from llmopt.rewriter.backend import LLMOptLoweringError, last_report, llmopt_backend
from llmopt.rewriter.explain import explain
from llmopt.rewriter.log import LLMOptWarning
from llmopt.rewriter.pipeline import LLMOptPassError
from llmopt.rewriter.report import Report
from llmopt.quantization import (  # already loaded by the quantize pass
    QuantConfig,
    QuantizedWeights,
    load_quantized,
    quantize_weights,
    save_quantized,
    weight_bytes,
)

__version__ = "0.1.0"


_RUNTIME_NAMES = {
    "LLM": "llmopt.runtime.llm",
    "SamplingParams": "llmopt.runtime.sampling_params",
    "RequestOutput": "llmopt.runtime.outputs",
    "CompletionOutput": "llmopt.runtime.outputs",
    "EngineConfig": "llmopt.runtime.engine_config",
    "SpeculativeConfig": "llmopt.runtime.speculative.config",
    "Cascade": "llmopt.runtime.cascade",
}


def __getattr__(name):
    if name in _RUNTIME_NAMES:
        import importlib

        return getattr(importlib.import_module(_RUNTIME_NAMES[name]), name)
    # Submodules that pull in transformers load on first use, so that
    # torch.compile(backend="llmopt") stays quick to import.
    if name in ("export_onnx", "OnnxExportError"):  # needs the onnx extra; loads onnx on first use
        import importlib

        return getattr(importlib.import_module("llmopt.onnx"), name)
    if name in ("models", "runtime", "quality", "pruning", "onnx", "training"):
        import importlib

        return importlib.import_module(f"llmopt.{name}")
    raise AttributeError(f"module 'llmopt' has no attribute {name!r}")

__all__ = [
    "LLM",
    "Cascade",
    "CompletionOutput",
    "EngineConfig",
    "RequestOutput",
    "SamplingParams",
    "SpeculativeConfig",
    "LLMOptConfig",
    "OnnxExportError",
    "QuantConfig",
    "QuantizedWeights",
    "load_quantized",
    "quantize_weights",
    "save_quantized",
    "weight_bytes",
    "LLMOptConfigError",
    "LLMOptLoweringError",
    "LLMOptPassError",
    "LLMOptWarning",
    "Report",
    "explain",
    "export_onnx",
    "last_report",
    "llmopt_backend",
    "__version__",
]
