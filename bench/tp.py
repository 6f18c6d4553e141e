"""Tensor parallelism: a CPU run at sizes 1 and 2, and the communication model for GPUs.

Part 1, measured (CPU, gloo): a random Llama (default: hidden 512, 4 layers,
8 query / 4 KV heads, intermediate 1536, vocabulary 8192, fp32) compiled with
llmopt's paging and, for size 2, ``tensor_parallel={"size": 2}``; each rank a
process with one intra-op thread (``--threads``). One 32-token prefill, then
greedy decode steps of one token (batch 1) over the paged cache; the median
step time is reported, with the greedy tokens checked equal across the runs.
Size 1 runs with 1 thread and with 2 threads (what one process gets out of the
same two cores).

Part 1b, measured through the engine (``--engine-prompts``, default 8):
``LLM(model, tensor_parallel_size=N)`` for N = 1 and 2 on the same random
Llama, 8 prompts of 32 tokens decoded greedily together (continuous
batching), 32 new tokens each, after one warm-up request that compiles
(size 1 with 1 thread and with all threads);
decode tokens/s over the timed generate, the tokens checked equal across the
sizes. At size 2 every step also pays the broadcast of its inputs and paged
metadata from rank 0 to rank 1 (``runtime/tp_worker.py``); the engine sets one
thread per rank on two cores (``runtime/tp_world.py``), size 1 gets both.

Part 2, a model (no measurement): per decode step of one token, each rank
reads its share of the weights and of the KV cache from HBM, and every layer
all-reduces two hidden-size vectors (after o_proj and after down_proj); the
vocab-parallel lm_head all-gathers the logits once a step:

    t(N) = (W/N + KV/N) / (e * B_hbm) + 2 L * t_ar(N) + t_ag(N)
    t_ar(N) = a(N) + 2 (N-1)/N * H * bytes / B_link     (ring all-reduce)
    t_ag(N) = a(N) + (N-1)/N * V * bytes / B_link
    a(N) = a0 + a1 * (N-1)                              (per-collective latency)

Figures assumed (the record repeats them): H100 SXM HBM3 3.35 TB/s; NVLink 4
900 GB/s bidirectional (450 GB/s a direction); PCIe Gen5 x16 ~64 GB/s a
direction; e = 0.7 of peak HBM bandwidth reached by a decode step (what
gpt-fast's 1-GPU Llama-2-7B figure implies on an A100: 104.9 tok/s x 13.5 GB =
1.41 TB/s of 2.04); a0 = 10 us, a1 = 1 us on NVLink, a0 = 20 us, a1 = 5 us
over PCIe (launch + synchronisation of a small NCCL all-reduce). The
comparison with gpt-fast's published tensor-parallel scaling (Llama-2-7B,
8xA100-80GB with NVLink: 104.9 tok/s on 1 GPU, 168.8 on 2, 328.4 on 8) runs the
same model with A100 figures (2.04 TB/s HBM2e, NVLink 3 600 GB/s
bidirectional) and also solves for the per-all-reduce time those figures imply.

    flock /tmp/bench.lock .venv/bin/python bench/tp.py [--steps 24] [--skip-cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, versions, write_record  # noqa: E402

# ----------------------------------------------------------------------------- the model


LLAMA = {  # hidden, layers, query heads, KV heads, intermediate, vocabulary
    "llama-3-8b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256),
    "llama-3-70b": dict(hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=28672, vocab=128256),
    "llama-2-7b": dict(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000),
}
GPUS = {
    "H100-SXM": dict(hbm_bytes_s=3.35e12, memory_bytes=80e9),
    "A100-80GB": dict(hbm_bytes_s=2.039e12, memory_bytes=80e9),
}
LINKS = {  # bytes/s one direction, per-collective latency a0 + a1 * (N - 1)
    "NVLink4": dict(bytes_s=450e9, a0=10e-6, a1=1e-6, note="NVLink 4: 900 GB/s bidirectional"),
    "PCIe5": dict(bytes_s=64e9, a0=20e-6, a1=5e-6, note="PCIe Gen5 x16: ~64 GB/s a direction"),
    "NVLink3": dict(bytes_s=300e9, a0=10e-6, a1=1e-6, note="NVLink 3 (A100): 600 GB/s bidirectional"),
}
HBM_EFFICIENCY = 0.7
DTYPE_BYTES = 2  # bf16
CONTEXT = 256  # tokens in the KV cache during the modelled decode step
GPT_FAST = {"model": "llama-2-7b", "hardware": "8xA100-80GB, NVLink", "tokens_per_s": {1: 104.9, 2: 168.8, 8: 328.4},
            "source": "pytorch-labs/gpt-fast README, tensor parallelism table"}


def parameter_bytes(cfg: dict) -> dict:
    h, i, v = cfg["hidden"], cfg["intermediate"], cfg["vocab"]
    head_dim = h // cfg["heads"]
    attention = h * h * 2 + 2 * h * cfg["kv_heads"] * head_dim  # q, o; k, v
    mlp = 3 * h * i
    sharded = cfg["layers"] * (attention + mlp) + v * h  # + lm_head (vocab-parallel)
    replicated = v * h + cfg["layers"] * 2 * h + h  # embedding (one row read a token), norms
    return {"sharded": sharded * DTYPE_BYTES, "replicated": replicated * DTYPE_BYTES,
            "read_replicated": (cfg["layers"] * 2 * h + 2 * h) * DTYPE_BYTES}


def allreduce_bytes_per_token_per_layer(cfg: dict, size: int) -> dict:
    """Two all-reduces of one hidden vector per layer: the payload, and what each rank sends (ring)."""
    payload = 2 * cfg["hidden"] * DTYPE_BYTES
    return {"payload": payload, "sent_per_rank": 2 * (size - 1) / size * payload if size > 1 else 0.0}


def step_time(cfg: dict, size: int, gpu: dict, link: dict, efficiency: float = HBM_EFFICIENCY) -> dict:
    params = parameter_bytes(cfg)
    head_dim = cfg["hidden"] // cfg["heads"]
    kv = 2 * cfg["layers"] * cfg["kv_heads"] * head_dim * CONTEXT * DTYPE_BYTES
    kv_per_rank = kv / size if cfg["kv_heads"] >= size else kv / cfg["kv_heads"]  # replicated KV heads
    memory = (params["sharded"] / size + params["read_replicated"] + kv_per_rank) / (efficiency * gpu["hbm_bytes_s"])
    if size == 1:
        comm = 0.0
    else:
        latency = link["a0"] + link["a1"] * (size - 1)
        allreduce = latency + 2 * (size - 1) / size * cfg["hidden"] * DTYPE_BYTES / link["bytes_s"]
        gather = latency + (size - 1) / size * cfg["vocab"] * DTYPE_BYTES / link["bytes_s"]
        comm = 2 * cfg["layers"] * allreduce + gather
    held = params["sharded"] / size + params["replicated"]
    return {"memory_s": memory, "comm_s": comm, "step_s": memory + comm, "tokens_per_s": 1 / (memory + comm),
            "weights_per_gpu_gb": held / 1e9, "fits": held < 0.9 * gpu["memory_bytes"]}


def model_tables() -> dict:
    predictions = []
    for name in ("llama-3-8b", "llama-3-70b"):
        cfg = LLAMA[name]
        for link_name in ("NVLink4", "PCIe5"):
            for size in (1, 2, 4, 8):
                t = step_time(cfg, size, GPUS["H100-SXM"], LINKS[link_name])
                predictions.append({"model": name, "gpu": "H100-SXM", "link": link_name, "size": size,
                                    **allreduce_bytes_per_token_per_layer(cfg, size), **t})
    cfg = LLAMA["llama-2-7b"]
    comparison = []
    base = None
    for size, measured in GPT_FAST["tokens_per_s"].items():
        t = step_time(cfg, size, GPUS["A100-80GB"], LINKS["NVLink3"])
        memory = t["memory_s"]
        implied = (1 / measured - memory) / (2 * cfg["layers"] + 1) if size > 1 else None
        base = base or measured
        comparison.append({"size": size, "gpt_fast_tokens_per_s": measured, "gpt_fast_speedup": measured / base,
                           "model_tokens_per_s": t["tokens_per_s"],
                           "model_speedup": t["tokens_per_s"] / step_time(cfg, 1, GPUS["A100-80GB"],
                                                                          LINKS["NVLink3"])["tokens_per_s"],
                           "implied_us_per_collective": None if implied is None else implied * 1e6})
    return {"predictions": predictions, "gpt_fast_comparison": comparison}


# ----------------------------------------------------------------------------- the CPU run


def cpu_rank(rank: int, size: int, args: dict) -> dict:
    from llmopt.models.random_models import random_llama
    from llmopt.runtime.paged_context import PagedKVCache, PagedStep, paged_step

    model = random_llama(num_layers=args["layers"], hidden_size=args["hidden"], num_attention_heads=args["heads"],
                         num_key_value_heads=args["kv_heads"], intermediate_size=args["intermediate"],
                         vocab_size=args["vocab"], max_position_embeddings=1024)

    def forward(input_ids, position_ids):
        return model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits

    options = {"lower": args["lower"], "paged_kv": True}
    if size > 1:
        options["tensor_parallel"] = {"size": size}
    compiled = torch.compile(forward, backend="llmopt", options=options)
    block, prompt = 16, args["prompt"]
    blocks = -(-(prompt + args["steps"] + 2) // block)
    cache = PagedKVCache(num_blocks=blocks, block_size=block)
    table = torch.arange(blocks)[None]
    ids = torch.randint(0, args["vocab"], (1, prompt), generator=torch.Generator().manual_seed(0))
    tokens, times = [], []
    with torch.no_grad():
        start = time.perf_counter()
        step = PagedStep(torch.arange(prompt), table, torch.tensor([prompt]), torch.tensor([0, prompt]), prompt,
                         prompt)
        with paged_step(cache, step):
            logits = compiled(ids, torch.arange(prompt)[None])
        prefill_s = time.perf_counter() - start
        token = int(logits[0, -1].argmax())
        for i in range(args["steps"] + 2):  # the first two decode steps compile: not timed
            pos = prompt + i
            step = PagedStep(torch.tensor([pos]), table, torch.tensor([pos + 1]), torch.tensor([0, 1]), 1, pos + 1)
            if size > 1:
                torch.distributed.barrier()  # start each step together
            start = time.perf_counter()
            with paged_step(cache, step):
                logits = compiled(torch.tensor([[token]]), torch.tensor([[pos]]))
            elapsed = time.perf_counter() - start
            tokens.append(token)
            token = int(logits[0, -1].argmax())
            if i >= 2:
                times.append(elapsed)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"rank": rank, "prefill_incl_compile_s": prefill_s, "step_s_median": statistics.median(times),
            "step_s_min": min(times), "tokens": tokens, "model_weight_bytes": weights,
            "kv_heads_in_cache": sorted({int(k.shape[2]) for k, _ in cache.layers.values()})}


def cpu_runs(args) -> list[dict]:
    from llmopt.parallel.launch import run_ranks

    settings = dict(layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
                    intermediate=args.intermediate, vocab=args.vocab, prompt=32, steps=args.steps, lower=args.lower)
    runs = []
    for size, threads in ((1, 1), (1, 2), (2, 1)):
        print(f"CPU run: size {size}, {threads} thread(s) per rank ...", file=sys.stderr, flush=True)
        ranks = run_ranks(cpu_rank, size, settings, timeout=900, threads=threads)
        runs.append({"size": size, "threads_per_rank": threads, "settings": settings, "ranks": ranks,
                     "step_ms": ranks[0]["step_s_median"] * 1e3, "step_ms_min": ranks[0]["step_s_min"] * 1e3})
    reference = runs[0]["ranks"][0]["tokens"]
    for run in runs:
        run["same_tokens_as_size_1"] = all(r["tokens"] == reference for r in run["ranks"])
    return runs


def engine_runs(args) -> list[dict]:
    from llmopt.models import load_cached
    from llmopt.models.random_models import random_llama
    from llmopt.runtime.llm import LLM
    from llmopt.runtime.sampling_params import SamplingParams

    tokenizer = load_cached("smollm2").tokenizer  # text only; the prompts are token ids below the vocabulary
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, args.vocab, (32,), generator=g).tolist() for _ in range(args.engine_prompts)]
    params = SamplingParams(temperature=0, max_tokens=args.engine_tokens, ignore_eos=True)
    runs, threads = [], torch.get_num_threads()
    for size, size_1_threads in ((1, 1), (1, threads), (2, None)):  # size 2: the engine's own choice
        if size_1_threads is not None:
            torch.set_num_threads(size_1_threads)
        print(f"engine run: tensor_parallel_size {size} ...", file=sys.stderr, flush=True)
        model = random_llama(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                             num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate,
                             vocab_size=args.vocab, max_position_embeddings=1024)
        start = time.perf_counter()
        llm = LLM(model, tokenizer, lower=args.lower, num_kv_blocks=4 * len(prompts) + 8, tensor_parallel_size=size)
        llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # compiles
        build_s = time.perf_counter() - start
        steps = llm.engine.num_steps
        start = time.perf_counter()
        outputs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
        steps = llm.engine.num_steps - steps
        first = max(o.metrics.first_token_time for o in outputs)
        last = max(o.metrics.finished_time for o in outputs)
        decode_tokens = sum(len(o.token_ids) - 1 for o in outputs)
        runs.append({"size": size, "threads_per_rank": torch.get_num_threads(), "build_and_compile_s": build_s,
                     "generate_s": elapsed, "steps": steps, "ms_per_step": elapsed / steps * 1e3,
                     "decode_tokens_per_s": decode_tokens / (last - first),
                     "tokens_per_s": sum(len(o.token_ids) for o in outputs) / elapsed,
                     "tokens": [o.token_ids for o in outputs]})
        if size > 1:
            llm.engine.runner.shutdown()
    torch.set_num_threads(threads)  # the engine at size 2 set one thread per rank in this process
    for run in runs:
        run["same_tokens_as_size_1"] = run["tokens"] == runs[0]["tokens"]
    return runs


# ----------------------------------------------------------------------------- output


def plot(model: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in ("llama-3-8b", "llama-3-70b"):
        for link, style in (("NVLink4", "-o"), ("PCIe5", "--s")):
            rows = [p for p in model["predictions"] if p["model"] == name and p["link"] == link]
            sizes = [p["size"] for p in rows]
            left.plot(sizes, [p["tokens_per_s"] for p in rows], style, label=f"{name}, {link}")
            for p in rows:
                if not p["fits"]:
                    left.annotate("does not fit", (p["size"], p["tokens_per_s"]), fontsize=7)
    left.set(xscale="log", yscale="log", xticks=[1, 2, 4, 8], xticklabels=["1", "2", "4", "8"],
             xlabel="GPUs (tensor parallel size)", ylabel="predicted decode tokens/s (batch 1)",
             title="Model: H100 SXM, bf16, context 256")
    left.legend(fontsize=8)
    rows = model["gpt_fast_comparison"]
    sizes = [r["size"] for r in rows]
    right.plot(sizes, [r["gpt_fast_tokens_per_s"] for r in rows], "o-", label="gpt-fast published (8xA100)")
    right.plot(sizes, [r["model_tokens_per_s"] for r in rows], "s--", label="model, A100 + NVLink 3")
    right.set(xscale="log", xticks=[1, 2, 8], xticklabels=["1", "2", "8"], xlabel="GPUs",
              ylabel="tokens/s", title="Llama-2-7B: model vs gpt-fast")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=24, help="timed decode steps")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--lower", default="eager", choices=("eager", "inductor"))
    parser.add_argument("--skip-cpu", action="store_true", help="only the communication model")
    parser.add_argument("--engine-prompts", type=int, default=8, help="prompts of the engine run (0: no engine run)")
    parser.add_argument("--engine-tokens", type=int, default=32, help="new tokens per prompt in the engine run")
    parser.add_argument("--out", default=None)
    parser.add_argument("--notes", default="", help="appended to the record's notes")
    args = parser.parse_args(argv)
    load_start = os.getloadavg()

    model = model_tables()
    print("Bytes all-reduced per token per layer (payload; sent per rank by a ring), bf16:")
    print(f"{'model':<12} {'N':>2} {'payload B':>10} {'sent/rank B':>12}")
    for p in model["predictions"]:
        if p["link"] == "NVLink4":
            print(f"{p['model']:<12} {p['size']:>2} {p['payload']:>10} {p['sent_per_rank']:>12.0f}")
    print("\nPredicted decode step (batch 1, context 256), H100 SXM:")
    print(f"{'model':<12} {'link':<8} {'N':>2} {'GB/GPU':>7} {'fits':>5} {'HBM ms':>7} {'comm ms':>8} "
          f"{'step ms':>8} {'tok/s':>7}")
    for p in model["predictions"]:
        print(f"{p['model']:<12} {p['link']:<8} {p['size']:>2} {p['weights_per_gpu_gb']:>7.1f} "
              f"{'yes' if p['fits'] else 'no':>5} {p['memory_s'] * 1e3:>7.2f} {p['comm_s'] * 1e3:>8.3f} "
              f"{p['step_s'] * 1e3:>8.2f} {p['tokens_per_s']:>7.0f}")
    print("\nLlama-2-7B against gpt-fast's published scaling (A100 figures in the model):")
    print(f"{'N':>2} {'gpt-fast tok/s':>15} {'speedup':>8} {'model tok/s':>12} {'speedup':>8} {'implied us/coll':>16}")
    for r in model["gpt_fast_comparison"]:
        implied = "" if r["implied_us_per_collective"] is None else f"{r['implied_us_per_collective']:.1f}"
        print(f"{r['size']:>2} {r['gpt_fast_tokens_per_s']:>15.1f} {r['gpt_fast_speedup']:>8.2f} "
              f"{r['model_tokens_per_s']:>12.1f} {r['model_speedup']:>8.2f} {implied:>16}")

    runs = [] if args.skip_cpu else cpu_runs(args)
    if runs:
        print("\nCPU run (gloo, fp32, random Llama; median decode step, batch 1):")
        print(f"{'size':>4} {'threads/rank':>12} {'step ms':>8} {'min ms':>7} {'same tokens':>12} {'KV heads/rank':>14}")
        for run in runs:
            print(f"{run['size']:>4} {run['threads_per_rank']:>12} {run['step_ms']:>8.2f} {run['step_ms_min']:>7.2f} "
                  f"{str(run['same_tokens_as_size_1']):>12} {str(run['ranks'][0]['kv_heads_in_cache']):>14}")

    engine = [] if args.skip_cpu or not args.engine_prompts else engine_runs(args)
    if engine:
        print(f"\nEngine run (LLM(..., tensor_parallel_size=N), {args.engine_prompts} prompts x 32 tokens, "
              f"{args.engine_tokens} new tokens each, greedy):")
        print(f"{'size':>4} {'threads/rank':>12} {'steps':>6} {'ms/step':>8} {'decode tok/s':>13} {'tok/s':>7} "
              f"{'same tokens':>12}")
        for run in engine:
            print(f"{run['size']:>4} {run['threads_per_rank']:>12} {run['steps']:>6} {run['ms_per_step']:>8.1f} "
                  f"{run['decode_tokens_per_s']:>13.1f} {run['tokens_per_s']:>7.1f} "
                  f"{str(run['same_tokens_as_size_1']):>12}")

    record = {
        "bench": "tp",
        "machine": machine(load_start),
        "versions": versions(),
        "assumptions": {"gpus": GPUS, "links": LINKS, "hbm_efficiency": HBM_EFFICIENCY, "dtype_bytes": DTYPE_BYTES,
                        "context_tokens": CONTEXT, "configs": LLAMA, "gpt_fast": {**GPT_FAST, "tokens_per_s": {
                            str(k): v for k, v in GPT_FAST["tokens_per_s"].items()}}},
        "model": model,
        "cpu_runs": runs,
        "engine_runs": engine,
        "notes": ("The GPU figures are a model, not measurements. "
                  + ("Other helpers' tests and builds were running on this 2-core machine (see the load averages): "
                     "the CPU step times are upper bounds and the size-1 vs size-2 comparison is noisy. "
                     if runs else "No CPU run in this record (--skip-cpu). ") + args.notes).strip(),
    }
    path = write_record("tp", record, args.out)
    plot(model, path.with_suffix(".png"))
    print(f"\nrecord: {path}\nplot:   {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
