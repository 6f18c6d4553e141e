"""Models llmopt runs and tests against.

``load(name)`` returns a pretrained model with its tokenizer: the embedded
default ``"smollm2"`` or a local Hugging Face directory (or ``.gguf`` file).
``random_llama`` / ``random_hf_model`` / ``random_handwritten_gpt`` build tiny
seeded models with random weights for tests and benchmarks.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, NamedTuple

import torch

from llmopt.models.handwritten import HandwrittenGPT, HandwrittenGPTConfig, random_handwritten_gpt
from llmopt.models.random_models import HEAD_LAYOUTS, random_hf_model, random_llama
from llmopt.models.smollm2 import INSTALL_COMMAND, ModelNotInstalledError, gguf_path

__all__ = [
    "KNOWN_MODELS",
    "HEAD_LAYOUTS",
    "INSTALL_COMMAND",
    "HandwrittenGPT",
    "HandwrittenGPTConfig",
    "LoadedModel",
    "ModelNotInstalledError",
    "load",
    "load_cached",
    "random_handwritten_gpt",
    "random_hf_model",
    "random_llama",
]

KNOWN_MODELS = ("smollm2",)


class LoadedModel(NamedTuple):
    model: Any  # a transformers PreTrainedModel in eval mode
    tokenizer: Any


def load(name: str = "smollm2", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, with SDPA attention.

    ``name`` is a known model name (see KNOWN_MODELS), a local Hugging Face
    model directory, or a local ``.gguf`` file. GGUF weights are de-quantized
    to ``dtype`` (transformers shows progress bars while doing so).
    """
    if name == "smollm2":
        path = gguf_path()
        return _from_pretrained(path.parent, dtype, gguf_file=path.name)
    path = Path(name).expanduser()
    if path.is_dir():
        return _from_pretrained(path, dtype)
    if path.is_file() and path.suffix == ".gguf":
        return _from_pretrained(path.parent, dtype, gguf_file=path.name)
    raise ValueError(
        f"unknown model {name!r}: use one of {', '.join(KNOWN_MODELS)}, "
        "a local Hugging Face model directory, or a .gguf file"
    )


@functools.lru_cache(maxsize=2)
def load_cached(name: str = "smollm2", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """``load`` memoised per process, so tests can share one loaded model.

    The returned model is shared by every caller: do not modify its weights or
    config. Wrapping it with ``torch.compile`` is fine (that leaves it as is).
    """
    return load(name, dtype)


def _from_pretrained(folder: Path, dtype: torch.dtype, gguf_file: str | None = None) -> LoadedModel:
    # Imported here so `import llmopt.models` (and the CLI's --help) stay fast.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(str(folder), **extra)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=dtype, attn_implementation="sdpa", **extra
    )
    return LoadedModel(model.eval(), tokenizer)
