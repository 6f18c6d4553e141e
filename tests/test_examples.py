"""Every script in examples/ runs, in its small setting, and passes its own check.

Each example is run as a user runs it (a subprocess, from the repository root)
with ``--tiny``: a small random Llama instead of SmolLM2, so the whole file
takes about two minutes on 2 CPU cores. The default settings (SmolLM2) are
what the same scripts do without the flag.
"""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"

# script -> (arguments of its small setting, text its check line ends with when it passes)
RUNS = {
    "compile_hf.py": (["--tiny"], "attention rewritten: OK"),
    "finetune.py": (["--tiny"], "OK"),
    "distill.py": (["--tiny"], "2:4 zeros kept: True: OK"),
    "quantize_save_load.py": (["--tiny", "--group-size", "32", "--calibration", str(REPO / "README.md"),
                               "--calibration-tokens", "1024"], "the freshly quantized ones (max |diff| 0.00e+00): OK"),
    "serve_openai.py": (["--tiny", "--lower", "eager", "--max-tokens", "12"], "OK"),
    # fp32 only: llmopt's int4 CPU kernel uses int8 activations and onnxruntime fp32 ones, so their
    # greedy tokens may part on a near tie (tests/onnx compares int4 logits with tolerances instead).
    "onnx_generate.py": (["--tiny", "--max-tokens", "8"], "llmopt's in PyTorch: OK"),
}


def test_every_example_is_run_here():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(RUNS)


@pytest.mark.parametrize("script", sorted(RUNS))
def test_example_runs_and_passes_its_check(script):
    if script == "onnx_generate.py":
        pytest.importorskip("onnxruntime")
    if script == "serve_openai.py":
        pytest.importorskip("openai")
        pytest.importorskip("fastapi")  # llmopt serve needs its extra: pip install 'llmopt[serve]'
        pytest.importorskip("uvicorn")
    arguments, passed = RUNS[script]
    run = subprocess.run([sys.executable, str(EXAMPLES / script), *arguments], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"{script} exited {run.returncode}:\n{output[-4000:]}"
    [check] = [line for line in run.stdout.splitlines() if line.startswith("check: ")]
    assert check.endswith(passed), check
