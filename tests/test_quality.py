"""Perplexity (llmopt.quality) against hand computations, and the `llmopt eval` command."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmopt import quality
from llmopt.cli import main
from llmopt.models import random_llama

# An excerpt of the public-domain play in ../shared/data/text, kept in the repo so the
# tests do not depend on files outside the checkout.
TEXT = Path(__file__).resolve().parent / "data" / "macbeth_excerpt.txt"


def _tokens(n, seed=0):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny():
    return random_llama(heads="gqa")


def test_single_window_is_exp_mean_nll(tiny):
    ids = _tokens(20)
    result = quality.perplexity_of_tokens(tiny, ids, context_length=32, stride=16)
    with torch.no_grad():
        logits = tiny(ids[None]).logits[0]
    nll = F.cross_entropy(logits[:-1].float(), ids[1:])
    assert result.tokens_scored == 19 and result.windows == 1
    assert result.perplexity == pytest.approx(math.exp(nll.item()), rel=1e-5)


def _hf_recipe(model, ids, context, stride):
    """The Hugging Face perplexity recipe, summed NLL and count (labels -100 outside each window's target)."""
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        target = end - prev_end
        window = ids[begin:end]
        labels = window.clone()
        labels[:-target] = -100
        with torch.no_grad():
            logits = model(window[None]).logits[0]
        total += F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum").item()
        count += int((labels[1:] != -100).sum())
        prev_end = end
        if end == len(ids):
            break
    return total, count


def test_sliding_window_scores_each_token_once(tiny):
    ids = _tokens(50, seed=1)
    result = quality.perplexity_of_tokens(tiny, ids, context_length=16, stride=6)
    total, count = _hf_recipe(tiny, ids, 16, 6)
    assert result.tokens_scored == count == 49  # every token but the first
    assert result.nll == pytest.approx(total / count, rel=1e-5)
    assert "context 16, stride 6" in result.describe()


@pytest.mark.parametrize("length,context,stride", [(50, 16, 6), (64, 16, 16), (17, 16, 1), (100, 7, 3), (5, 16, 8)])
def test_windows_tile_the_text(length, context, stride):
    covered = []
    for begin, end, first in quality._windows(length, context, stride):
        assert begin < first < end <= begin + context  # a scored token always has context in its window
        covered.extend(range(first, end))
    if stride < context:
        assert covered == list(range(1, length))
    else:  # stride == context: each window's first token has no context and is skipped
        assert covered == [i for i in range(1, length) if i % context]


def test_compiled_model_gives_the_same_perplexity(tiny):
    ids = _tokens(40, seed=2)
    eager = quality.perplexity_of_tokens(tiny, ids, context_length=16, stride=8)
    compiled = torch.compile(tiny, backend="llmopt", options={"lower": "eager"})
    assert quality.perplexity_of_tokens(compiled, ids, context_length=16, stride=8).perplexity == pytest.approx(
        eager.perplexity, rel=1e-5)


def test_progress_line_on_stderr(tiny, capsys):
    quality.perplexity_of_tokens(tiny, _tokens(40), context_length=16, stride=8, progress=True)
    err = capsys.readouterr().err
    assert "perplexity: window 4/4, 39 tokens scored" in err and err.endswith("\n")


@pytest.mark.parametrize("call,message", [
    (lambda m: quality.perplexity_of_tokens(m, torch.tensor([5])), "has 1 token"),
    (lambda m: quality.perplexity_of_tokens(m, _tokens(10), context_length=8, stride=9), "stride must be"),
    (lambda m: quality.perplexity_of_tokens(m, _tokens(10), context_length=1), "context_length must be"),
    (lambda m: quality.tokenize(None, "  \n"), "the text is empty"),
])
def test_bad_input_errors(tiny, call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="text file not found: .*missing.txt"):
        quality.read_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="text file is empty"):
        quality.read_text(tmp_path / "empty.txt")


def test_smollm2_perplexity_on_an_excerpt(smollm2):
    model, tokenizer = smollm2
    result = quality.perplexity(model, tokenizer, TEXT, context_length=128, stride=64, max_tokens=256)
    assert result.tokens_scored == 255 and result.windows == 3
    # Shakespeare (with the file's header) for a 135M model: tens, not thousands.
    assert 5 < result.perplexity < 200, result


# ---------------------------------------------------------------- CLI


def test_cli_eval_prints_table_and_json(smollm2, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    code = main(["eval", "--text", str(TEXT), "--max-tokens", "160", "--context-length", "128", "--stride", "64",
                 "--prune-pattern", "channels", "--sparsity", "0.25", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| setting | perplexity | tokens scored | context/stride |" in printed
    assert "| fp32 prune magnitude channels 25% |" in printed and "| 159 | 128/64 |" in printed
    row = json.loads(out.read_text())["rows"][0]
    assert row["tokens_scored"] == 159 and math.isfinite(row["perplexity"])
    assert row["parameters"] < sum(p.numel() for p in smollm2.model.parameters())


@pytest.mark.parametrize("args,message", [
    (["--text", "/no/such/file.txt"], "text file not found: /no/such/file.txt"),
    (["--text", str(TEXT), "--sparsity", "1.5"], "--sparsity: expected a number between 0 and 1"),
    (["--text", str(TEXT), "--prune-pattern", "1:4"], "--prune-pattern: invalid choice"),
    (["--text", str(TEXT), "--prune-pattern", "2:4", "--sparsity", "0.7"], "'2:4' has sparsity 0.5"),
    (["--text", str(TEXT), "--prune-method", "wanda"], "--prune-method wanda needs --calibration FILE"),
    (["--text", str(TEXT), "--stride", "600"], "--stride 600 is longer than --context-length 512"),
    (["--text", str(TEXT), "--quantize", "int3"], "option 'quantize' got 'int3'"),
])
def test_cli_eval_bad_options_exit_2(args, message, capsys):
    try:
        code = main(["eval", *args])
    except SystemExit as exited:  # argparse errors
        code = exited.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
