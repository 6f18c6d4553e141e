"""The quick start of ``llmopt generate``: an uncompiled worker answers, the engine takes over.

Reference: Hugging Face greedy ``generate`` of the same tiny random Llama
(saved with SmolLM2's tokenizer), on the same chat prompt. Whether the
engine takes over after the first token, or never, the reply must be those
tokens.
"""

import json
import subprocess
import sys
import threading

import pytest
import torch

from llmopt.models import random_llama
from llmopt.runtime import quick_start
from llmopt.runtime.llm import LLM
from llmopt.runtime.quick_start_worker import chat_prompt_ids
from llmopt.runtime.sampling_params import SamplingParams

PROMPT = "What is the capital of France?"
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm2):
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = random_llama(heads="gqa", num_layers=2, vocab_size=len(smollm2.tokenizer))
    model.generation_config.eos_token_id = None  # the tiny model's reply runs to max_tokens
    model.save_pretrained(folder)
    smollm2.tokenizer.save_pretrained(folder)
    return folder, model, smollm2.tokenizer


def _hf_greedy(model, tokenizer):
    ids = torch.tensor([chat_prompt_ids(tokenizer, PROMPT, None)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                         min_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def _request(folder):
    return {"model": str(folder), "prompt": PROMPT, "system": None, "max_tokens": MAX_TOKENS,
            "temperature": 0.0, "top_k": None, "seed": None}


def _continue(llm, token_ids, max_tokens):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for output in llm.stream([token_ids], params):
        yield output.token_ids


def test_reply_from_the_worker_alone_when_the_engine_is_never_ready(tiny_model_dir):
    folder, model, tokenizer = tiny_model_dir
    never = threading.Event()
    stats = quick_start.QuickStartStats()
    tokens = [t for t, _ in quick_start.stream(_request(folder), never.wait, _continue, stats=stats)]
    assert tokens == _hf_greedy(model, tokenizer)
    assert stats.from_worker == MAX_TOKENS and stats.from_engine == 0 and stats.switched_at_s is None


def test_engine_takes_over_after_the_first_token_and_the_reply_is_unchanged(tiny_model_dir):
    folder, model, tokenizer = tiny_model_dir
    llm = LLM(model, tokenizer, lower="eager", num_kv_blocks=32)
    stats = quick_start.QuickStartStats()
    tokens = [t for t, _ in quick_start.stream(_request(folder), lambda: llm, _continue, stats=stats)]
    assert tokens == _hf_greedy(model, tokenizer)
    assert stats.switched_at_s is not None and stats.from_engine > 0
    assert stats.from_worker + stats.from_engine == MAX_TOKENS


def test_worker_error_before_the_first_token_is_reported(tmp_path):
    request = {**_request(tmp_path / "missing"), "model": str(tmp_path / "no-such-model")}
    with pytest.raises(quick_start.QuickStartFailed, match="unknown model"):
        list(quick_start.stream(request, threading.Event().wait, _continue))


def test_worker_exits_when_its_parent_closes_the_pipe(tiny_model_dir):
    """The worker never outlives the command: EOF on its stdin ends it (a killed parent closes it too)."""
    folder, _, _ = tiny_model_dir
    request = {**_request(folder), "max_tokens": 100000}
    proc = subprocess.Popen([sys.executable, "-m", "llmopt.runtime.quick_start_worker", json.dumps(request)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout.readline().startswith("prompt ")
    assert proc.stdout.readline().startswith("token ")
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0


def test_killed_parent_takes_its_worker_with_it(tiny_model_dir, tmp_path):
    folder, _, _ = tiny_model_dir
    request = {**_request(folder), "max_tokens": 100000}
    parent = (f"import json, os, subprocess, sys\n"
              f"p = subprocess.Popen([sys.executable, '-m', 'llmopt.runtime.quick_start_worker', "
              f"{json.dumps(json.dumps(request))}], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)\n"
              f"print(p.pid, flush=True)\n"
              f"p.stdout.readline(); p.stdout.readline()\n"
              f"os.kill(os.getpid(), 9)\n")
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=120)
    pid = int(out.stdout.split()[0])
    import os
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{pid}/stat") as stat:  # a zombie (exited, not reaped by init yet) counts as gone
            if stat.read().split()[2] == "Z":
                return
        time.sleep(0.2)
    pytest.fail(f"worker {pid} outlived its killed parent")
