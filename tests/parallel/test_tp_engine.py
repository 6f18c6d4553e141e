"""The engine across processes (``LLM(..., tensor_parallel_size=N)``), on CPU ranks joined by gloo.

Reference: the same model served by one process (the engine itself is checked
against Hugging Face ``generate`` in tests/runtime/test_engine.py). Greedy
decoding with fp32 weights: the ranks sum the same products in another order
(about 1e-6 on the logits, tests/parallel/test_tensor_parallel.py), far below
the margin between the top two logits of these prompts, so the tokens must be
identical.

Each engine runs in its own processes (tests/parallel/tp_engine_main.py), as a
user's would: rank 0 a child of the test, the workers its children (or, for
the two "nodes", two torchrun launches).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmopt.errors import LLMOptConfigError
from llmopt.models import load
from llmopt.parallel.launch import free_port
from llmopt.runtime.engine_config import EngineConfig
from tiny_hf import save_tiny_llama

from . import tp_engine_main

HERE = Path(__file__).resolve().parent
MAIN = HERE / "tp_engine_main.py"
ROOT = HERE.parents[1]
PYTHON = sys.executable
# the engine's lm_head runs outside the compiled graph, replicated: these are the layers split
DECODER_SHARDED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random GQA Llama (4 query heads, 2 KV heads) saved as a Hugging Face directory: each
    rank loads its own weights from it."""
    return str(save_tiny_llama(tmp_path_factory.mktemp("tp-engine"), heads="gqa", num_layers=2))


@pytest.fixture(scope="module")
def one_process(model_dir):
    return [out.token_ids for out in tp_engine_main.engine(model_dir, 1).generate(tp_engine_main.prompts(),
                                                                                  tp_engine_main.GREEDY)]


def _json_line(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, stdout
    return json.loads(lines[-1])


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.split() == ["State:", "Z", "(zombie)"] for line in f)
    except FileNotFoundError:
        return True


def _wait_gone(pids, seconds: float = 15.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not all(_gone(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if not _gone(p)]


def test_size_2_gives_one_process_greedy_tokens_and_its_workers_exit(model_dir, one_process):
    done = subprocess.run([PYTHON, str(MAIN), model_dir, "--size", "2"], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = _json_line(done.stdout)
    assert len(result["tokens"]) == 8 and all(len(t) == 12 for t in result["tokens"])
    assert result["tokens"] == one_process
    assert result["free_blocks"] == 64  # every block handed back
    assert len(result["worker_pids"]) == 1
    # two ranks share this machine's cores (an explicit OMP_NUM_THREADS would win)
    cores = len(os.sched_getaffinity(0))
    assert result["threads"] == max(1, cores // 2)
    assert _wait_gone(result["worker_pids"], 5) == []  # rank 0 exited normally: its worker too
    # the worker let go of the full q/k/v/o/gate/up/down weights: it holds its halves and the rest
    released, held = map(int, re.search(r"rank 1: released (\d+) bytes .* holds (\d+) bytes", done.stderr).groups())
    model = load(model_dir).model
    sharded = sum(p.numel() * 4 for n, p in model.named_parameters() if n.rsplit(".", 2)[-2] in DECODER_SHARDED)
    total = sum(p.numel() * 4 for p in model.parameters())
    assert released == sharded and held == total - sharded // 2


def test_killed_rank_0_leaves_no_worker_behind(model_dir):
    """kill -9 of rank 0 while its workers wait for the next step: they notice and exit."""
    parent = subprocess.Popen([PYTHON, str(MAIN), model_dir, "--size", "2", "--hold"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    try:
        line = parent.stdout.readline()  # printed once the engine is built (the workers are serving)
        assert line.startswith("{"), line
        workers = json.loads(line)["worker_pids"]
        assert len(workers) == 1 and not any(_gone(p) for p in workers)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        assert _wait_gone(workers) == []
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
def test_two_torchrun_nodes_give_one_process_greedy_tokens(model_dir, one_process):
    """Two torchrun launches on 127.0.0.1, one process each (nnodes 2, c10d rendezvous): what a
    launch on two machines does, with HOST = the first machine's address."""
    port = free_port()

    def node(rank: int) -> subprocess.Popen:
        return subprocess.Popen(
            [str(TORCHRUN), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"llmopt-tp-{port}",
             "--max-restarts", "0", str(MAIN), model_dir, "--size", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)

    nodes = [node(0), node(1)]
    try:
        outputs = [n.communicate(timeout=600) for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
                n.wait()
    for n, (_, stderr) in zip(nodes, outputs):
        assert n.returncode == 0, stderr[-3000:]
    printed = [_json_line(out) for out, _ in outputs if "{" in out]
    assert len(printed) == 1  # rank 0 (whichever node the rendezvous made rank 0) prints; the other serves
    assert printed[0]["tokens"] == one_process
    assert printed[0]["worker_pids"] == []  # torchrun started the ranks, not the engine


def test_a_size_the_heads_do_not_split_is_refused_on_every_rank(model_dir):
    """4 query heads over 3 ranks: the pass's error, in one line, from rank 0; no rank left behind."""
    parent = subprocess.Popen([PYTHON, str(MAIN), model_dir, "--size", "3"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT)
    children: set[int] = set()
    try:
        deadline = time.monotonic() + 600
        while parent.poll() is None and time.monotonic() < deadline:  # the ranks it starts, as they come
            try:
                with open(f"/proc/{parent.pid}/task/{parent.pid}/children") as f:
                    children |= {int(p) for p in f.read().split()}
            except FileNotFoundError:
                break
            time.sleep(0.05)
        _, stderr = parent.communicate(timeout=60)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
    assert parent.returncode != 0
    assert "TensorParallelError: tensor_parallel size 3 does not divide the 4 query heads" in stderr, stderr[-3000:]
    assert len(children) >= 2 and _wait_gone(children) == []  # ranks 1 and 2 (and spawn's helper)


def test_engine_options_are_checked():
    assert EngineConfig(tensor_parallel_size=2).tensor_parallel_size == 2
    with pytest.raises(LLMOptConfigError, match="tensor_parallel_size must be a positive int"):
        EngineConfig(tensor_parallel_size=0)
    with pytest.raises(LLMOptConfigError, match="belong to the engine"):
        EngineConfig(compile_options={"tensor_parallel": 2})
    with pytest.raises(LLMOptConfigError, match="'layer_skip' does not run with tensor_parallel_size > 1"):
        EngineConfig(tensor_parallel_size=2, speculative_config={"method": "layer_skip", "num_layers": 1})
    EngineConfig(tensor_parallel_size=2, speculative_config={"method": "ngram"})


def test_llmopt_generate_with_tensor_parallel_size_2(model_dir):
    """``llmopt generate --tensor-parallel-size 2`` prints Hugging Face greedy decoding's reply."""
    import torch

    model, tokenizer = load(model_dir)
    ids = tokenizer("Hello", return_tensors="pt").input_ids
    with torch.no_grad():
        reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(reference[0, ids.shape[1]:], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    done = subprocess.run([PYTHON, "-m", "llmopt", "generate", "Hello", "--model", model_dir, "--lower", "eager",
                           "--max-tokens", "8", "--tensor-parallel-size", "2"], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert text and done.stdout == text + "\n"


def test_a_step_reaches_the_workers_whole():
    """What rank 0 broadcasts is what a worker runs: tokens, positions, every metadata tensor with
    its dtype, the new cache's size, a tree attention mask; then the stop."""
    import torch

    from llmopt.parallel.launch import run_ranks

    from . import workers

    sent, (received, stop) = run_ranks(workers.step_over_the_wire, 2, timeout=120)
    assert stop is None
    tokens, positions, step, new_cache = received
    assert torch.equal(tokens, sent[0]) and torch.equal(positions, sent[1]) and new_cache == sent[3] == 64
    for name in ("slot_mapping", "block_tables", "seq_lens", "query_start_loc"):
        got, want = getattr(step, name), getattr(sent[2], name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
    assert (step.max_query_len, step.max_seq_len) == (3, 19)
    assert list(step.append_masks) == [1] and torch.equal(step.append_masks[1], sent[2].append_masks[1])


def test_llmopt_serve_with_tensor_parallel_size_2(model_dir):
    """``llmopt serve --tensor-parallel-size 2``: a greedy completion equals Hugging Face greedy's;
    SIGTERM ends the server with exit 0, and its worker rank with it."""
    import http.client
    import re

    import torch

    model, tokenizer = load(model_dir)
    ids = tokenizer("Hello", return_tensors="pt").input_ids
    with torch.no_grad():
        reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                                   do_sample=False)
    text = tokenizer.decode(reference[0, ids.shape[1]:], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    server = subprocess.Popen([PYTHON, "-m", "llmopt", "serve", "--model", model_dir, "--lower", "eager", "--port", "0",
                               "--kv-cache-gib", "0.02", "--tensor-parallel-size", "2"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        for line in server.stdout:
            ready = re.search(r"ready on http://127\.0\.0\.1:(\d+)", line)
            if ready:
                break
        else:
            pytest.fail("llmopt serve exited before it was ready")
        with open(f"/proc/{server.pid}/task/{server.pid}/children") as f:
            children = [int(p) for p in f.read().split()]
        connection = http.client.HTTPConnection("127.0.0.1", int(ready.group(1)), timeout=120)
        connection.request("POST", "/v1/completions", body=json.dumps(
            {"model": model_dir, "prompt": "Hello", "max_tokens": 8, "temperature": 0, "ignore_eos": True}),
            headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        body = json.loads(response.read())
        assert response.status == 200, body
        assert body["choices"][0]["text"] == text
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
        assert children and _wait_gone(children) == []
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
