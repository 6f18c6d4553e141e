"""Models llmopt runs and tests against.

``load(name)`` returns a pretrained model with its tokenizer: the embedded
default ``"smollm2"`` or a local Hugging Face directory (or ``.gguf`` file).
``random_llama`` / ``random_hf_model`` / ``random_handwritten_gpt`` build tiny
seeded models with random weights for tests and benchmarks.
"""

from __future__ import annotations

import functools
from pathlib import Path
from collections.abc import Callable
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


def load(name: str = "smollm2", dtype: torch.dtype = torch.float32, *, cache: bool = True,
         progress: Callable[[str], None] | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, with SDPA attention.

    ``name`` is a known model name (see KNOWN_MODELS), a local Hugging Face
    model directory, or a local ``.gguf`` file. GGUF weights are de-quantized
    to ``dtype``. The first load of a GGUF keeps a converted copy (safetensors
    and tokenizer files, see ``llmopt.models.converted_cache``) that later
    loads read instead; ``cache=False`` converts from the GGUF every time.
    ``progress`` receives one-line status messages (the CLI prints them).
    """
    folder, gguf_file = source(name)
    if gguf_file is not None:
        return _from_gguf(folder / gguf_file, dtype, cache, progress)
    return _from_pretrained(folder, dtype)


def source(name: str) -> tuple[Path, str | None]:
    """Where ``load(name)`` reads from: (folder, GGUF file name in it or None for a Hugging Face folder)."""
    if name == "smollm2":
        path = gguf_path()
        return path.parent, path.name
    path = Path(name).expanduser()
    if path.is_dir():
        return path, None
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    raise ValueError(
        f"unknown model {name!r}: use one of {', '.join(KNOWN_MODELS)}, "
        "a local Hugging Face model directory, or a .gguf file"
    )


def _from_gguf(path: Path, dtype: torch.dtype, cache: bool, progress) -> LoadedModel:
    from llmopt.models import converted_cache

    say = progress or (lambda message: None)
    if not cache:
        return _from_pretrained(path.parent, dtype, gguf_file=path.name)
    entry = converted_cache.entry_path(path)
    if converted_cache.is_complete(entry):
        return _from_pretrained(entry, dtype)
    say(f"converting {path.name} once (de-quantizing weights, building the tokenizer); "
        f"later loads read the copy in {entry.parent}")
    model, tokenizer = _from_pretrained(path.parent, torch.float32, gguf_file=path.name)
    if converted_cache.write_entry(entry, model, tokenizer):
        return _from_pretrained(entry, dtype)  # the same path every later load takes
    return LoadedModel(model.to(dtype), tokenizer)


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
