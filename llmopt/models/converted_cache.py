"""A converted copy of a GGUF model (safetensors weights + tokenizer files), kept after the first load.

Loading a GGUF through transformers de-quantizes every tensor and rebuilds
the fast tokenizer from the GGUF vocabulary and merges; the second part
alone takes most of a minute on a small CPU. Both results depend only on the
file and the transformers version, so the first load writes them as a plain
Hugging Face folder (``config.json``, ``model.safetensors``, tokenizer files,
chat template) and later loads read that folder instead.

Contract:

- The entry is keyed by the GGUF file's resolved path, size and modification
  time and by the transformers version: a changed file or upgrade misses and
  converts again. The weights are stored in float32 (what de-quantizing
  gives); ``dtype`` is applied when loading, as for the GGUF.
- An entry appears atomically (written to a temporary folder, then renamed),
  so an interrupted conversion leaves nothing that a later load would trust.
- A cache that cannot be written (read-only home, full disk) is not an
  error: the model is used as loaded, with a warning.
- Where: ``$LLMOPT_CACHE_DIR/converted`` if set, else
  ``$XDG_CACHE_HOME/llmopt/converted`` (``~/.cache/llmopt/converted``).
  ``LLMOPT_CACHE_DIR`` is read when a model is loaded; ``load(...,
  cache=False)`` bypasses the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

FORMAT_VERSION = 1  # bump when the layout of an entry changes


def cache_root() -> Path:
    base = os.environ.get("LLMOPT_CACHE_DIR")
    if base:
        return Path(base).expanduser() / "converted"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "llmopt" / "converted"


def entry_path(gguf: Path, root: Path | None = None) -> Path:
    """The folder the converted copy of ``gguf`` lives in (whether or not it exists yet)."""
    import transformers

    gguf = gguf.resolve()
    stat = gguf.stat()
    key = json.dumps([FORMAT_VERSION, str(gguf), stat.st_size, stat.st_mtime_ns, transformers.__version__])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return (cache_root() if root is None else root) / f"{gguf.stem}-{digest}"


def is_complete(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()


def write_entry(folder: Path, model, tokenizer) -> bool:
    """Write ``model`` (float32) and ``tokenizer`` as a Hugging Face folder at ``folder``; False if it could not."""
    from safetensors.torch import save_file

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    except OSError as error:
        warnings.warn(f"llmopt: could not cache the converted model under {folder.parent}: {error}",
                      stacklevel=3)
        return False
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the GGUF's; the copy is plain float32
        config["dtype"] = "float32"
        (scratch / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        _drop_bpe_cleanup_flag(scratch)
        tensors = {}
        seen: dict[int, str] = {}
        for name, tensor in model.state_dict().items():
            # Tied weights (lm_head = embedding) are stored once; from_pretrained re-ties them.
            pointer = tensor.untyped_storage().data_ptr()
            if pointer in seen:
                continue
            seen[pointer] = name
            tensors[name] = tensor.detach().to(torch.float32).contiguous()
        save_file(tensors, str(scratch / "model.safetensors"), metadata={"format": "pt"})
        try:
            os.rename(scratch, folder)
        except OSError:
            if not is_complete(folder):  # not another process that won the race
                raise
            shutil.rmtree(scratch, ignore_errors=True)
        return True
    except (OSError, RuntimeError, ValueError) as error:
        shutil.rmtree(scratch, ignore_errors=True)
        warnings.warn(f"llmopt: could not cache the converted model at {folder}: {error}", stacklevel=3)
        return False


def _drop_bpe_cleanup_flag(folder: Path) -> None:
    """transformers ignores ``clean_up_tokenization_spaces`` for BPE tokenizers but warns on every
    load that it does; GGUF vocabularies carry the flag, so the copy says False (the same text)."""
    tokenizer_json, config_json = folder / "tokenizer.json", folder / "tokenizer_config.json"
    if not (tokenizer_json.is_file() and config_json.is_file()):
        return
    if json.loads(tokenizer_json.read_text()).get("model", {}).get("type") != "BPE":
        return
    config = json.loads(config_json.read_text())
    if config.get("clean_up_tokenization_spaces"):
        config["clean_up_tokenization_spaces"] = False
        config_json.write_text(json.dumps(config, indent=2, ensure_ascii=False))
