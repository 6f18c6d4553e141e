"""Speculative decoding in llmopt's engine against plain decode and llama.cpp (SmolLM2-135M, CPU).

Workloads (greedy, --max-tokens new tokens, end-of-sequence ignored):
  chat      questions answered from the model's own knowledge (little repetition)
  grounded  input-grounded tasks: continue or edit a passage of the shared
            texts (../shared/data/text), edit one of the project's own source files

Settings, in one run at the same thread count:
  plain                 the engine, fp32, no speculation
  ngram-k{K}            prompt lookup (prompt_lookup_max 4), k = K
  draft-int4-k{K}       fp32 target, SmolLM2 int4 (group 32) as the draft model
  layer_skip-l{L}-k{K}  the target's first L layers as the draft (SmolLM2 was not
                        trained for early exit)
  int4 plain / int4 ngram-k{K}  an int4 target (compile_options {"quantize": "int4"}),
                        plain and with prompt lookup
  llama.cpp / llama.cpp-lookup-k{K}  llama-cpp-python on the Q4_1 GGUF, plain and
                        with LlamaPromptLookupDecoding(num_pred_tokens=K)

Batch 1 (one request at a time) gives decode tokens/s per request; --concurrency
runs that many requests at once through the engine (plain vs ngram) and gives
output tokens/s over all. "identical" compares each setting's tokens with its
plain peer of the same weights (fp32 plain, int4 plain, llama.cpp plain).
Speedups are all against the engine's fp32 plain decode of the same workload.

    flock /tmp/bench.lock python bench/speculative.py [--max-tokens 128] [--prompts 2] [--ks 2 4 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, pyplot, versions, write_record  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ROOT.parent / "shared" / "data" / "text"

CHAT = ["What are three good habits for staying healthy? Explain each briefly.",
        "Explain how a rainbow forms.",
        "Give some advice to someone learning to cook."]


def grounded_prompts() -> list[str]:
    tempest = (TEXTS / "tempest.txt").read_text()
    macbeth = (TEXTS / "macbeth.txt").read_text()
    passage_a = tempest[tempest.index("SCENE 2"):][:1400]
    passage_b = macbeth[len(macbeth) // 3:][:1400]
    source = (ROOT / "llmopt" / "runtime" / "sampler.py").read_text()[:1800]
    return [f"Repeat the following passage exactly, then continue it:\n\n{passage_a}",
            f"Rewrite this passage, replacing every name with 'X' and keeping the rest:\n\n{passage_b}",
            f"Here is a Python file. Rewrite it with the docstrings removed, code unchanged:\n\n{source}"]


def chat_ids(tokenizer, text: str) -> list[int]:
    chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=False)
    return [int(t) for t in tokenizer.encode(chat, add_special_tokens=False)]


def set_speculation(llm, config) -> None:
    from llmopt.runtime.speculative.config import SpeculativeConfig
    from llmopt.runtime.speculative.speculator import build_speculator

    engine = llm.engine
    engine.speculator = None if config is None else build_speculator(
        SpeculativeConfig.from_options(config), engine.model, engine.runner, engine.num_total_blocks,
        engine.config)


def set_k(llm, k: int) -> None:
    """The engine's speculator with another k, keeping its drafter (a draft model compiles once)."""
    import dataclasses

    from llmopt.runtime.speculative.adaptive import AdaptiveK

    spec = llm.engine.speculator
    spec.config = dataclasses.replace(spec.config, num_speculative_tokens=k)
    spec.adaptive = AdaptiveK(k, enabled=spec.config.adaptive)


def run_engine(llm, prompts, max_tokens, concurrency=1):
    from llmopt.runtime.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.engine.scheduler.block_manager.reset_prefix_cache()
    tokens, rates, drafted, accepted = [], [], 0, 0
    start = time.perf_counter()
    if concurrency == 1:
        for p in prompts:
            out = llm.generate([p], params)[0]
            m = out.metrics
            tokens.append(out.token_ids)
            rates.append((len(out.token_ids) - 1) / (m.finished_time - m.first_token_time))
            drafted += m.num_drafted_tokens
            accepted += m.num_accepted_tokens
    else:
        batch = [prompts[i % len(prompts)] for i in range(concurrency)]
        outs = llm.generate(batch, params)
        wall = time.perf_counter() - start
        tokens = [o.token_ids for o in outs[:len(prompts)]]
        rates = [sum(len(o.token_ids) for o in outs) / wall]
        drafted = sum(o.metrics.num_drafted_tokens for o in outs)
        accepted = sum(o.metrics.num_accepted_tokens for o in outs)
    return tokens, sum(rates) / len(rates), drafted, accepted


def run_llama_cpp(prompts, max_tokens, k=None):
    import llama_cpp
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    from llmopt.models.smollm2 import gguf_path

    threads = torch.get_num_threads()
    draft = LlamaPromptLookupDecoding(num_pred_tokens=k) if k else None
    llm = llama_cpp.Llama(model_path=str(gguf_path()), n_ctx=2048, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, draft_model=draft, verbose=False,
                          logits_all=draft is not None)  # speculative verification reads every row's logits
    tokens, rates = [], []
    for p in prompts:
        llm.reset()
        out, first = [], None
        for token in llm.generate(p, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            if first is None:
                first = time.perf_counter()
            out.append(int(token))
            if len(out) >= max_tokens:
                break
        tokens.append(out)
        rates.append((len(out) - 1) / (time.perf_counter() - first))
    return tokens, sum(rates) / len(rates)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per workload (of 3)")
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--draft-ks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--layer-skip", type=int, nargs="*", default=[8, 15, 22], help="exit layers to try")
    parser.add_argument("--layer-skip-k", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--workloads", nargs="+", default=["grounded", "chat"])
    parser.add_argument("--model-workloads", nargs="+", default=["grounded"],
                        help="workloads the draft_model and layer_skip rows run (the slow ones)")
    parser.add_argument("--skip", nargs="*", default=[], help="setting families to skip: "
                        "ngram int4 draft layer_skip llama.cpp concurrency")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--lower", default="inductor", choices=("inductor", "eager"))
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # One compiled code object (ModelRunner._forward) serves every runner this run builds (two
    # targets, drafts, layer_skip views): the default limit of 8 entries would drop late ones to eager.
    torch._dynamo.config.recompile_limit = 64
    load_start = os.getloadavg()

    from llmopt.runtime.llm import LLM

    rows = []
    record = dict(benchmark="speculative", machine=machine(load_start), versions=versions(),
                  settings=dict(max_tokens=args.max_tokens, prompts=args.prompts, ks=args.ks,
                                draft_ks=args.draft_ks, layer_skip=args.layer_skip,
                                layer_skip_k=args.layer_skip_k, threads=args.threads, lower=args.lower,
                                concurrency=args.concurrency, workloads=args.workloads),
                  notes="speedup: against the engine's fp32 plain decode of the same workload and batch "
                        "(int4 and llama.cpp rows too); identical: tokens equal to the plain run (None on the plain rows themselves) of the "
                        "same weights (fp32 plain, int4 plain, llama.cpp plain). Batch 1: mean over the "
                        "prompts of each request's decode tokens/s (first token to last); concurrency: "
                        "output tokens over the wall time. Other agents' jobs were running on this "
                        "2-core machine: see the load averages. The record is rewritten after every "
                        "row (a cut-short run keeps what it measured).",
                  rows=rows)
    path = write_record("speculative", record, args.out)

    def add(workload, setting, k, rate, tokens, reference, drafted=0, accepted=0, base=None, batch=1,
            target="fp32"):
        rows.append(dict(workload=workload, setting=setting, target=target, k=k, batch=batch,
                         tokens_per_s=rate, acceptance=accepted / drafted if drafted else None,
                         drafted=drafted, accepted=accepted, speedup=rate / base if base else 1.0,
                         identical=tokens == reference if reference is not None else None))
        r = rows[-1]
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        print(f"{workload:9s} b{batch:<3d} {setting:26s} {rate:8.1f} tok/s  x{r['speedup']:.2f}  "
              f"acc {acc}  identical {r['identical']}", flush=True)
        record["machine"] = machine(load_start)
        write_record("speculative", record, str(path))

    fp32 = LLM("smollm2", kv_cache_memory_gib=1.0, lower=args.lower)
    tok = fp32.tokenizer
    workloads = {"chat": [chat_ids(tok, t) for t in CHAT[:args.prompts]],
                 "grounded": [chat_ids(tok, t) for t in grounded_prompts()[:args.prompts]]}
    workloads = {w: workloads[w] for w in args.workloads}
    model_workloads = [w for w in args.model_workloads if w in workloads]
    run_engine(fp32, [workloads[args.workloads[0]][0]], 8)  # warm
    plain = {}
    set_speculation(fp32, dict(method="ngram", num_speculative_tokens=max(args.ks), disable_by_batch_size=None))
    ngram = fp32.engine.speculator
    for w, prompts in workloads.items():
        set_speculation(fp32, None)
        tokens, rate, _, _ = run_engine(fp32, prompts, args.max_tokens)
        plain[w] = (tokens, rate)
        add(w, "plain", 0, rate, tokens, None)
        fp32.engine.speculator = ngram
        for k in ([] if "ngram" in args.skip else args.ks):
            set_k(fp32, k)
            t, r, d, a = run_engine(fp32, prompts, args.max_tokens)
            add(w, f"ngram-k{k}", k, r, t, tokens, d, a, rate)
    if "int4" not in args.skip:
        int4 = LLM("smollm2", kv_cache_memory_gib=1.0, lower=args.lower, compile_options={"quantize": "int4"})
        run_engine(int4, [workloads[args.workloads[0]][0]], 8)  # warm
        set_speculation(int4, dict(method="ngram", num_speculative_tokens=max(args.ks), disable_by_batch_size=None))
        ngram = int4.engine.speculator
        for w, prompts in workloads.items():
            int4.engine.speculator = None
            t0, r0, _, _ = run_engine(int4, prompts, args.max_tokens)
            add(w, "int4 plain", 0, r0, t0, None, base=plain[w][1], target="int4")
            int4.engine.speculator = ngram
            for k in args.ks:
                set_k(int4, k)
                t, r, d, a = run_engine(int4, prompts, args.max_tokens)
                add(w, f"int4 ngram-k{k}", k, r, t, t0, d, a, plain[w][1], target="int4")
    if "llama.cpp" not in args.skip and not _has_llama_cpp():
        record["notes"] += " llama-cpp-python is not installed: no llama.cpp rows."
        print("llama-cpp-python is not installed: llama.cpp rows skipped", flush=True)
        args.skip.append("llama.cpp")
    if "llama.cpp" not in args.skip:
        for w, prompts in workloads.items():
            t0, r0 = run_llama_cpp(prompts, args.max_tokens)
            add(w, "llama.cpp", 0, r0, t0, None, base=plain[w][1], target="Q4_1")
            for k in args.ks:
                t, r = run_llama_cpp(prompts, args.max_tokens, k)
                add(w, f"llama.cpp-lookup-k{k}", k, r, t, t0, base=plain[w][1], target="Q4_1")
    if "draft" not in args.skip:
        set_speculation(fp32, dict(method="draft_model", model="smollm2", num_speculative_tokens=max(args.draft_ks),
                                   model_options={"quantize": "int4"}, disable_by_batch_size=None))
        run_engine(fp32, [workloads[args.workloads[0]][0]], 8)  # warm: the draft's single-token graph compiles
        for k in args.draft_ks:
            set_k(fp32, k)
            for w in model_workloads:
                t, r, d, a = run_engine(fp32, workloads[w], args.max_tokens)
                add(w, f"draft-int4-k{k}", k, r, t, plain[w][0], d, a, plain[w][1])
    if "layer_skip" not in args.skip:
        k = args.layer_skip_k
        for layers in args.layer_skip:
            set_speculation(fp32, dict(method="layer_skip", num_layers=layers, num_speculative_tokens=k,
                                       disable_by_batch_size=None))
            run_engine(fp32, [workloads[args.workloads[0]][0]], 8)  # warm (as the draft above)
            for w in model_workloads:
                t, r, d, a = run_engine(fp32, workloads[w], args.max_tokens)
                add(w, f"layer_skip-l{layers}-k{k}", k, r, t, plain[w][0], d, a, plain[w][1])
    if "concurrency" not in args.skip and args.concurrency > 1:
        w = "grounded" if "grounded" in workloads else args.workloads[0]
        set_speculation(fp32, None)
        t0, r0, _, _ = run_engine(fp32, workloads[w], args.max_tokens, args.concurrency)
        add(w, "plain", 0, r0, t0, None, batch=args.concurrency)
        for k in (4,):
            for limit in (None, 8):
                set_speculation(fp32, dict(method="ngram", num_speculative_tokens=k, disable_by_batch_size=limit))
                t, r, d, a = run_engine(fp32, workloads[w], args.max_tokens, args.concurrency)
                add(w, f"ngram-k{k}" + ("" if limit is None else f"-off>={limit}"), k, r, t, t0, d, a, r0,
                    batch=args.concurrency)
    print(f"record: {path}")
    print(table(rows))
    _plot(rows, path.with_suffix(".png"))
    return 0


def _has_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def table(rows) -> str:
    """The record as a Markdown table."""
    lines = ["| workload | batch | target | setting | tokens/s | acceptance | speedup vs fp32 plain | identical |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        lines.append(f"| {r['workload']} | {r['batch']} | {r['target']} | {r['setting']} | "
                     f"{r['tokens_per_s']:.1f} | {acc} | {r['speedup']:.2f}x | {r['identical']} |")
    return "\n".join(lines)


def _plot(rows, path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for workload in sorted({r["workload"] for r in rows}):
        for family in ("ngram", "int4 ngram", "draft-int4", "llama.cpp-lookup"):
            pts = sorted((r["k"], r["speedup"]) for r in rows if r["workload"] == workload and r["batch"] == 1
                         and r["setting"].startswith(family + "-k"))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{family} ({workload})")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("k (num_speculative_tokens)")
    ax.set_ylabel("speedup over llmopt fp32 plain decode")
    ax.set_title("SmolLM2-135M, CPU, batch 1, greedy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
