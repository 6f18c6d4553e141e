"""Serving throughput: llmopt's continuous-batching engine against Hugging Face static batching.

One seeded workload (N requests; prompt and output lengths drawn from ranges;
prompts are windows of real text) runs, in the same process and on the same
loaded model, through

  llmopt   ``llmopt.LLM`` (paged KV cache, continuous batching, chunked
           prefill, prefix caching), all requests submitted at once;
  hf-bN    Hugging Face ``generate`` over static batches of N requests in
           arrival order, prompts left-padded to the batch's longest, every
           request of a batch decoding until the batch's longest output.

Every request produces exactly its drawn number of tokens (EOS is ignored),
so both sides do the same useful work; output tokens/s counts only those.
TTFT is from submission (all at t=0) to the first token; TPOT is the mean
time per later token. KV memory: the engine's peak of blocks in use against
a contiguous allocation of the longest sequence for every request, and the
padded batch caches HF holds. A sweep of the engine's ``max_num_seqs`` gives
throughput against concurrency (plotted when matplotlib is installed).

With ``--dtype float32 bfloat16`` the whole comparison runs once per dtype,
in one process and record: the engine built with that ``dtype`` (weights and
KV cache) against Hugging Face on the same weights in the same dtype (fp32
against HF fp32, bf16 against HF bf16); each row's "vs best HF" is against
the HF rows of its own dtype.

With ``--speculative-config JSON`` the engine is built with that
speculative_config and every concurrency runs twice, speculation off then
on, on the same compiled engine (off: its speculator detached for the run);
the record's ``speculation`` gives on / off throughput per concurrency and
the drafted / accepted counts of each run. ``--spec-repeats R`` runs R such
pairs, the order alternating, and reports each side's median run.

    python bench/serve.py [--requests 64] [--input-len 32 512] [--output-len 32 256]
                          [--hf-batch-sizes 8 64] [--concurrency 4 16 64] [--lower inductor]
                          [--speculative-config '{"method": "ngram"}'] [--dtype float32 bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, versions, write_record  # noqa: E402

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "macbeth.txt"


@dataclass
class Request:
    prompt: list[int]
    output_len: int


@dataclass
class RunResult:
    system: str
    wall_s: float
    output_tokens: int
    output_tokens_per_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p99_s: float
    kv_peak_bytes: int
    concurrency: int
    kv_waste_mean: float | None = None
    same_tokens_as_llmopt: bool | None = None
    dtype: str = "float32"  # the weights' and KV cache's (both systems of a dtype run on the same weights)
    speculation: dict | None = None  # speculation on: drafted / accepted tokens of this run


def make_workload(tokenizer, n, input_range, output_range, seed, text_path) -> list[Request]:
    text = Path(text_path).read_text()
    ids = tokenizer.encode(text)
    g = torch.Generator().manual_seed(seed)
    requests = []
    for _ in range(n):
        length = int(torch.randint(input_range[0], input_range[1] + 1, (), generator=g))
        start = int(torch.randint(0, len(ids) - length, (), generator=g))
        out = int(torch.randint(output_range[0], output_range[1] + 1, (), generator=g))
        requests.append(Request(ids[start:start + length], out))
    return requests


def _pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


# ---------------------------------------------------------------- llmopt engine


def run_engine(llm, requests, max_num_seqs, speculator=None) -> tuple[RunResult, list[list[int]]]:
    """``speculator``: the engine's own (speculation on) or None (off for this run)."""
    from llmopt.runtime.sampling_params import SamplingParams

    engine = llm.engine
    engine.speculator = speculator  # bench-only: on / off on the same compiled engine
    before = _spec_counts(speculator)
    engine.scheduler.config.max_num_seqs = max_num_seqs  # bench-only: reuse the compiled engine
    engine.scheduler.block_manager.reset_prefix_cache()
    start = time.perf_counter()
    ids = [engine.add_request(None, r.prompt, SamplingParams(temperature=0, max_tokens=r.output_len,
                                                             ignore_eos=True)) for r in requests]
    done, peak_blocks, waste = {}, 0, []
    block_manager = engine.scheduler.block_manager
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        peak_blocks = max(peak_blocks, block_manager.num_used_blocks)
        if block_manager.num_used_blocks:
            waste.append(block_manager.kv_waste_fraction())
        _progress(f"{_system(speculator)} (max_num_seqs {max_num_seqs})", len(done), len(requests))
    wall = time.perf_counter() - start
    outs = [done[i] for i in ids]
    ttft = [o.metrics.first_token_time - start for o in outs]
    tpot = [(o.metrics.finished_time - o.metrics.first_token_time) / max(1, len(o.token_ids) - 1)
            for o in outs]
    tokens = sum(len(o.token_ids) for o in outs)
    per_block = engine.runner.kv_cache.bytes_per_block
    result = RunResult(_system(speculator), wall, tokens, tokens / wall, _pct(ttft, .5), _pct(ttft, .99),
                       _pct(tpot, .5), _pct(tpot, .99), peak_blocks * per_block, max_num_seqs,
                       kv_waste_mean=statistics.fmean(waste) if waste else 0.0)
    if speculator is not None:
        after = _spec_counts(speculator)
        run = {k: after[k] - before[k] for k in after}
        run["acceptance_rate"] = run["drafted"] and run["accepted"] / run["drafted"]
        run["mean_accepted_length"] = run["verify_steps"] and run["emitted"] / run["verify_steps"]
        run["requests_with_drafts"] = sum(1 for o in outs if o.metrics.num_drafted_tokens)
        result.speculation = run
    return result, [o.token_ids for o in outs]


def _system(speculator) -> str:
    return "llmopt" if speculator is None else "llmopt+spec"


def _spec_counts(speculator) -> dict:
    stats = speculator.stats if speculator is not None else None
    return {"drafted": stats.num_drafted, "accepted": stats.num_accepted,
            "verify_steps": stats.num_verify_steps, "emitted": stats.num_emitted} if stats else {}


# ---------------------------------------------------------------- Hugging Face static batches


class _StepClock:
    """A logits processor that only records when each decoding step's logits are ready."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def run_hf(model, tokenizer, requests, batch_size, bytes_per_token) -> tuple[RunResult, list[list[int]]]:
    from transformers import LogitsProcessorList

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    start = time.perf_counter()
    ttft, tpot, outputs, kv_peak = [], [], [], 0
    for b in range(0, len(requests), batch_size):
        batch = requests[b:b + batch_size]
        width = max(len(r.prompt) for r in batch)
        new = max(r.output_len for r in batch)
        ids = torch.tensor([[pad] * (width - len(r.prompt)) + r.prompt for r in batch])
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in batch])
        clock = _StepClock()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=pad,
                                 logits_processor=LogitsProcessorList([clock]))
        kv_peak = max(kv_peak, len(batch) * (width + new) * bytes_per_token)
        for i, r in enumerate(batch):
            outputs.append(out[i, width:width + r.output_len].tolist())
            first, last = clock.times[0], clock.times[r.output_len - 1]
            ttft.append(first - start)
            tpot.append((last - first) / max(1, r.output_len - 1))
        _progress(f"hf batch {batch_size}", b + len(batch), len(requests))
    wall = time.perf_counter() - start
    tokens = sum(r.output_len for r in requests)
    return RunResult(f"hf-b{batch_size}", wall, tokens, tokens / wall, _pct(ttft, .5), _pct(ttft, .99),
                     _pct(tpot, .5), _pct(tpot, .99), kv_peak, batch_size), outputs


def _progress(label, done, total):
    print(f"\r  {label}: {done}/{total} requests", end="\n" if done == total else "",
          file=sys.stderr, flush=True)


# ---------------------------------------------------------------- report


def table(results, record) -> str:
    cfg = record["config"]
    lines = [
        f"serving benchmark: {cfg['model']} {', '.join(cfg['dtypes'])}, {cfg['requests']} requests, "
        f"input {cfg['input_len'][0]}-{cfg['input_len'][1]}, output {cfg['output_len'][0]}-"
        f"{cfg['output_len'][1]} tokens, seed {cfg['seed']}, llmopt lower={cfg['lower']}",
        f"machine: {record['machine']['cpu_model']}, {record['machine']['threads']} threads",
        "",
        f"{'system':<12}{'dtype':>9}{'conc':>5}{'wall s':>9}{'out tok/s':>11}{'vs best HF':>11}{'TTFT p50':>10}"
        f"{'p99':>8}{'TPOT p50 ms':>13}{'p99':>8}{'KV MiB':>9}",
    ]
    for r in results:
        best_hf = max((h.output_tokens_per_s for h in results if h.system.startswith("hf")
                       and h.dtype == r.dtype), default=None)
        ratio = f"{r.output_tokens_per_s / best_hf:.2f}x" if best_hf else "-"
        lines.append(f"{r.system:<12}{r.dtype:>9}{r.concurrency:>5}{r.wall_s:>9.1f}{r.output_tokens_per_s:>11.1f}"
                     f"{ratio:>11}{r.ttft_p50_s:>10.2f}{r.ttft_p99_s:>8.2f}{r.tpot_p50_s * 1e3:>13.1f}"
                     f"{r.tpot_p99_s * 1e3:>8.1f}{r.kv_peak_bytes / 2**20:>9.1f}")
    kv = record["kv_memory"]
    lines += ["", "llmopt at the largest concurrency against the best HF static batching of its dtype: " + ", ".join(
        f"{d} {x:.2f}x" for d, x in record["speedup_vs_best_hf_by_dtype"].items())]
    lines += ["", f"KV memory: llmopt peak {kv['llmopt_peak_bytes'] / 2**20:.1f} MiB in use vs "
              f"{kv['contiguous_max_len_bytes'] / 2**20:.1f} MiB for a contiguous max-length "
              f"({kv['max_len']} tokens) cache per request ({kv['llmopt_vs_contiguous']:.1%}); "
              f"mean waste inside allocated blocks {kv['llmopt_waste_mean']:.2%}"]
    return "\n".join(lines)


def plot(sweep, hf_results, path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r.concurrency for r in sweep]
    ax.plot(xs, [r.output_tokens_per_s for r in sweep], "o-", label="llmopt (max_num_seqs)")
    for r in hf_results:
        ax.plot([r.concurrency], [r.output_tokens_per_s], "s", label=f"HF static batch {r.concurrency}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent sequences")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Throughput against concurrency")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return str(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    load_start = os.getloadavg()
    runs = [run_dtype(args, dtype) for dtype in args.dtype]
    first = runs[0]
    sweep = [r for run in runs for r in run["sweep"]]
    spec_sweep = [r for run in runs for r in run["spec_sweep"]]
    hf_results = [r for run in runs for r in run["hf"]]
    record = {
        "benchmark": "serve",
        "machine": machine(load_start),
        "versions": versions(),
        "config": {"model": args.model, "dtype": args.dtype[0], "dtypes": args.dtype, "requests": args.requests,
                   "input_len": args.input_len, "output_len": args.output_len, "seed": args.seed,
                   "text": str(args.text), "lower": args.lower, "block_size": first["block_size"],
                   "max_num_batched_tokens": args.max_num_batched_tokens,
                   "speculative_config": args.speculative_config, "spec_first": args.spec_first,
                   "spec_repeats": args.spec_repeats,
                   "warmup_s": first["warmup_s"],
                   "warmup_s_by_dtype": {run["dtype"]: run["warmup_s"] for run in runs}},
        "results": [asdict(r) for r in sweep + spec_sweep + hf_results],
        "kv_memory": first["kv_memory"],
        "kv_memory_by_dtype": {run["dtype"]: run["kv_memory"] for run in runs},
    }
    if spec_sweep:
        record["speculation"] = {
            "config": first["speculative_config"],
            "on_vs_off": {str(on.concurrency): on.output_tokens_per_s / off.output_tokens_per_s
                          for off, on in zip(first["sweep"], first["spec_sweep"])},
            "main_run_on_vs_off": first["spec_sweep"][-1].output_tokens_per_s
            / first["main_run"].output_tokens_per_s,
            "repeats": args.spec_repeats,
            "runs": first["spec_repeats"],
        }
    speedups = {run["dtype"]: run["speedup_vs_best_hf"] for run in runs if run["speedup_vs_best_hf"]}
    record["speedup_vs_best_hf_by_dtype"] = speedups
    if args.dtype[0] in speedups:
        record["speedup_vs_best_hf"] = speedups[args.dtype[0]]
    path = write_record("serve", record, args.out)
    picture = plot(first["sweep"], first["hf"], path.with_suffix(".png"))
    print(table(sweep + spec_sweep + hf_results, record))
    if spec_sweep:
        print("\nspeculation on / off throughput: " + ", ".join(
            f"concurrency {c}: {x:.3f}x" for c, x in record["speculation"]["on_vs_off"].items()))
    print(f"\nrecord: {path}" + (f"\nplot: {picture}" if picture else "\n(plot skipped: matplotlib missing)"))
    return 0


def run_dtype(args, dtype: str) -> dict:
    """The engine sweep and the HF static batches, both on weights of ``dtype``."""
    import gc

    from llmopt.runtime.llm import LLM

    llm = LLM(args.model, dtype=dtype, lower=args.lower, kv_cache_memory_gib=args.kv_cache_gib,
              max_num_seqs=max(args.concurrency), max_num_batched_tokens=args.max_num_batched_tokens,
              speculative_config=args.speculative_config)
    engine = llm.engine
    print(f"engine ready ({dtype}): warm-up/compile {engine.warmup_seconds:.1f} s, "
          f"{engine.num_total_blocks} KV blocks", file=sys.stderr)
    requests = make_workload(llm.tokenizer, args.requests, args.input_len, args.output_len, args.seed, args.text)
    speculator = engine.speculator  # None without --speculative-config
    modes = [None] if speculator is None else [None, speculator]
    # Warm the engine's decode/prefill shapes once (compiles happen here, not in the timing).
    for mode in modes:
        run_engine(llm, requests[:4], max(args.concurrency), mode)

    sweep, spec_sweep, reference, pairs = [], [], None, {}
    for conc in sorted(set(args.concurrency), reverse=True):
        if speculator is None:
            result, tokens = run_engine(llm, requests, conc)
            reference = reference or tokens
            sweep.append(result)
            continue
        # Off and on back to back (the same machine load), --spec-repeats pairs with the
        # order alternating (off-on, on-off, ...; --spec-first starts with on), so a drift
        # in the machine's speed falls on both sides alike.
        offs, ons = [], []
        for i in range(args.spec_repeats):
            order = (speculator, None) if (i % 2 == 0) == args.spec_first else (None, speculator)
            for mode in order:
                result, tokens = run_engine(llm, requests, conc, mode)
                (ons if mode is not None else offs).append((result, tokens))
        reference = reference or offs[0][1]
        off, off_tokens = _median_run(offs)
        on, _ = _median_run(ons)
        on.same_tokens_as_llmopt = all(t == off_tokens for _, t in ons)
        sweep.append(off)
        spec_sweep.append(on)
        pairs[str(conc)] = {"off_tokens_per_s": [r.output_tokens_per_s for r, _ in offs],
                            "on_tokens_per_s": [r.output_tokens_per_s for r, _ in ons],
                            "pair_on_vs_off": [a.output_tokens_per_s / b.output_tokens_per_s
                                               for (a, _), (b, _) in zip(ons, offs)]}
    engine.speculator = speculator
    sweep.sort(key=lambda r: r.concurrency)
    spec_sweep.sort(key=lambda r: r.concurrency)
    bytes_per_token = engine.runner.kv_cache.bytes_per_block // engine.config.block_size
    hf_results = []
    for batch_size in args.hf_batch_sizes:  # engine.model: the same weights, in the same dtype
        result, tokens = run_hf(engine.model, llm.tokenizer, requests, batch_size, bytes_per_token)
        result.same_tokens_as_llmopt = _agreement(tokens, reference)
        hf_results.append(result)
    for r in sweep + spec_sweep + hf_results:
        r.dtype = dtype

    main_run = max(sweep, key=lambda r: r.concurrency)
    max_len = args.input_len[1] + args.output_len[1]
    contiguous = len(requests) * max_len * bytes_per_token
    best_hf = max(hf_results, key=lambda r: r.output_tokens_per_s, default=None)
    run = {
        "dtype": dtype, "sweep": sweep, "spec_sweep": spec_sweep, "hf": hf_results, "main_run": main_run,
        "block_size": engine.config.block_size, "warmup_s": engine.warmup_seconds,
        "speculative_config": engine.config.speculative_config.to_dict() if spec_sweep else None,
        "spec_repeats": pairs,
        "kv_memory": {"llmopt_peak_bytes": main_run.kv_peak_bytes, "contiguous_max_len_bytes": contiguous,
                      "max_len": max_len, "llmopt_vs_contiguous": main_run.kv_peak_bytes / contiguous,
                      "llmopt_waste_mean": main_run.kv_waste_mean},
        "speedup_vs_best_hf": best_hf and main_run.output_tokens_per_s / best_hf.output_tokens_per_s,
    }
    del llm, engine, speculator
    gc.collect()  # the next dtype's engine gets the memory
    return run


def _median_run(runs: list) -> tuple:
    """The (result, tokens) of the run with the median throughput (the lower median for an even count)."""
    ranked = sorted(runs, key=lambda run: run[0].output_tokens_per_s)
    return ranked[(len(ranked) - 1) // 2]


def _agreement(tokens, reference) -> bool:
    """Same greedy tokens? (Padding and batched kernels can flip a near-tie; reported, not asserted.)"""
    return reference is not None and tokens == reference


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", nargs="+", default=["float32"],
                   help="weights' and KV cache dtype(s); several: the comparison runs once per dtype "
                        "(e.g. float32 bfloat16), each against HF in that dtype")
    p.add_argument("--lower", choices=("inductor", "eager"), default="inductor")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--input-len", type=int, nargs=2, default=(32, 512), metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=(32, 256), metavar=("MIN", "MAX"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", default=str(TEXT), help="text the prompts are cut from")
    p.add_argument("--hf-batch-sizes", type=int, nargs="*", default=[8, 64])
    p.add_argument("--concurrency", type=int, nargs="+", default=[4, 16, 64],
                   help="engine max_num_seqs values to sweep (the largest is the main run)")
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--kv-cache-gib", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--speculative-config", type=json.loads, default=None, metavar="JSON",
                   help='the engine\'s speculative_config, e.g. \'{"method": "ngram"}\'; each '
                        'concurrency then runs with speculation off and on (default: off only)')
    p.add_argument("--spec-first", action="store_true",
                   help="with --speculative-config: run each concurrency with speculation on first, then off")
    p.add_argument("--spec-repeats", type=int, default=1, metavar="R",
                   help="with --speculative-config: R off/on pairs per concurrency, order alternating; "
                        "the rows are each side's median run, the record keeps every run")
    p.add_argument("--out", help="JSON path (default bench/results/serve-<host>-<time>.json)")
    args = p.parse_args(argv)
    if args.spec_repeats < 1:
        p.error(f"--spec-repeats must be >= 1, got {args.spec_repeats}")
    for lo, hi, name in ((*args.input_len, "input"), (*args.output_len, "output")):
        if not 1 <= lo <= hi:
            p.error(f"--{name}-len needs 1 <= MIN <= MAX, got {lo} {hi}")
    if not Path(args.text).is_file():
        p.error(f"--text: no such file {args.text}")
    return args


if __name__ == "__main__":
    sys.exit(main())
