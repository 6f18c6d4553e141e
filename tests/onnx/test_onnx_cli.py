"""``llmopt export-onnx``: arguments, and an export through the command (on a small
random model saved as a Hugging Face directory, so no real model is needed)."""

import pytest

from llmopt.cli import main
from tiny_hf import save_tiny_llama

onnx = pytest.importorskip("onnx")


def test_help_names_the_exported_operators(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export-onnx", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "GroupQueryAttention" in out and "MatMulNBits" in out and "--no-kv-cache" in out


def test_unexportable_quantization_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export-onnx", "m.onnx", "--quantize", "fp8"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


def test_export_through_the_command(tmp_path, capsys):
    model = save_tiny_llama(tmp_path / "tiny", heads="mqa")  # loaded through --model DIR, as a user's
    path = tmp_path / "m.onnx"
    assert main(["export-onnx", str(path), "--model", str(model), "--quantize", "int4", "--group-size", "32"]) == 0
    # 2 layers of q/k/v (one call), o, gate/up (one call), down; and lm_head
    assert "2 GroupQueryAttention, 9 MatMulNBits" in capsys.readouterr().out
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count("MatMulNBits") == 9 and ops.count("GroupQueryAttention") == 2
