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

__version__ = "0.1.0"


def __getattr__(name):
    # Submodules that pull in transformers load on first use, so that
    # torch.compile(backend="llmopt") stays quick to import.
    if name in ("models", "runtime"):
        import importlib

        return importlib.import_module(f"llmopt.{name}")
    raise AttributeError(f"module 'llmopt' has no attribute {name!r}")

__all__ = [
    "LLMOptConfig",
    "LLMOptConfigError",
    "LLMOptLoweringError",
    "LLMOptPassError",
    "LLMOptWarning",
    "Report",
    "explain",
    "last_report",
    "llmopt_backend",
    "__version__",
]
