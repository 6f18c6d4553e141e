"""Lookahead decoding in llmopt's engine against plain greedy decode (SmolLM2-135M fp32, CPU).

The chat workload of bench/speculative.py (its prompts and its engine loop),
greedy, batch 1, --max-tokens new tokens, end-of-sequence ignored. Rows:
plain, then lookahead for each --configs W,N,G (window, n-gram size,
guesses): tokens/s, tokens emitted per step, acceptance (verified candidate
tokens over the most a step could accept), token identity with plain.

Then the cost side: the time of one forward of T new tokens (one sequence,
--prefix cached tokens, tree-masked as lookahead feeds them) for T up to the
largest config's 1 + (W + G)(N - 1): lookahead pays off only where a step of
T tokens costs less than the tokens it emits per step times a plain step.

    flock /tmp/bench.lock python bench/lookahead.py [--max-tokens 96] [--configs 3,3,3 5,4,5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, versions, write_record  # noqa: E402
from speculative import CHAT, chat_ids, run_engine, set_speculation  # noqa: E402


def step_times(llm, prefix: int, sizes: list[int], repeats: int) -> list[dict]:
    """Median seconds of one forward of T new tokens after ``prefix`` cached ones."""
    from llmopt.runtime.paged_context import PagedStep
    from llmopt.runtime import token_tree

    runner = llm.engine.runner
    bs = runner.options.block_size
    table = list(range(-(-(prefix + max(sizes)) // bs)))
    runner.execute_packed([(list(range(1, prefix + 1)), 0, table)], bs)
    rows = []
    for size in sizes:
        # A lookahead-shaped tree: a chain of 3, then chains of 3 from the last token.
        parents = [0 if j % 3 == 0 else j for j in range(size - 1)]
        mask = token_tree.ancestor_mask(parents) if size > 1 else None
        positions = [prefix + d for d in token_tree.depths(parents)]
        slots = [table[(prefix + j) // bs] * bs + (prefix + j) % bs for j in range(size)]
        pad = max(0, 2 - size)  # as the runner pads single-token steps
        step = PagedStep(torch.tensor(slots + [-1] * pad, dtype=torch.int32),
                         torch.tensor([table], dtype=torch.int32),
                         torch.tensor([prefix + size], dtype=torch.int32),
                         torch.tensor([0, size], dtype=torch.int32), size, prefix + size,
                         append_masks=None if mask is None else {0: mask})
        ids = torch.tensor(list(range(size)) + [0] * pad)
        pos = torch.tensor(positions + [0] * pad)
        times = []
        for i in range(repeats + 2):
            start = time.perf_counter()
            runner._run(ids, pos, step, torch.tensor([size - 1]))
            if i >= 2:  # two warm-up calls
                times.append(time.perf_counter() - start)
        times.sort()
        rows.append(dict(tokens=size, seconds=times[len(times) // 2]))
        print(f"forward of {size:3d} tokens: {1000 * rows[-1]['seconds']:7.1f} ms", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--configs", nargs="+", default=["2,3,2", "3,3,3", "4,4,4", "5,4,5"])
    parser.add_argument("--prefix", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    configs = [tuple(int(x) for x in c.split(",")) for c in args.configs]

    from llmopt.runtime.llm import LLM

    rows = []
    record = dict(benchmark="lookahead", machine=machine(load_start), versions=versions(),
                  settings=dict(max_tokens=args.max_tokens, configs=args.configs, threads=args.threads,
                                prefix=args.prefix, workload="chat (bench/speculative.py)", batch=1),
                  notes="speedup: against the engine's fp32 plain greedy decode of the same prompts in "
                        "the same run; identical: tokens equal to that plain run; tokens_per_step: "
                        "output tokens over engine steps. The machine was shared with other agents' "
                        "jobs (2 cores): see the load averages.",
                  rows=rows, step_times=[])
    path = write_record("lookahead", record, args.out)

    llm = LLM("smollm2", kv_cache_memory_gib=1.0)
    prompts = [chat_ids(llm.tokenizer, t) for t in CHAT]
    run_engine(llm, [prompts[0]], 8)  # warm
    set_speculation(llm, None)
    steps0 = llm.engine.num_steps
    plain_tokens, plain_rate, _, _ = run_engine(llm, prompts, args.max_tokens)
    plain_steps = llm.engine.num_steps - steps0

    def add(setting, rate, tokens, steps, drafted=0, accepted=0):
        emitted = sum(len(t) for t in tokens)
        rows.append(dict(setting=setting, tokens_per_s=rate, speedup=rate / plain_rate,
                         tokens_per_step=emitted / steps, acceptance=accepted / drafted if drafted else None,
                         drafted=drafted, accepted=accepted, identical=tokens == plain_tokens))
        r = rows[-1]
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        print(f"{setting:22s} {rate:7.1f} tok/s  x{r['speedup']:.2f}  {r['tokens_per_step']:.2f} tok/step  "
              f"acc {acc}  identical {r['identical']}", flush=True)
        record["machine"] = machine(load_start)
        write_record("lookahead", record, str(path))

    add("plain", plain_rate, plain_tokens, plain_steps)
    for w, n, g in configs:
        for adaptive in (False, True):
            set_speculation(llm, dict(method="lookahead", window=w, ngram=n, guesses=g, adaptive=adaptive,
                                      disable_by_batch_size=None))
            steps0 = llm.engine.num_steps
            tokens, rate, drafted, accepted = run_engine(llm, prompts, args.max_tokens)
            add(f"lookahead-{w},{n},{g}" + ("-adaptive" if adaptive else ""), rate, tokens,
                llm.engine.num_steps - steps0, drafted, accepted)
    set_speculation(llm, None)
    largest = max(1 + (w + g) * (n - 1) for w, n, g in configs)
    sizes = sorted({1, 2, 4, 8, 13, 16, 24, 32, largest} - {s for s in range(largest + 1, 1000)})
    record["step_times"] = step_times(llm, args.prefix, sizes, args.repeats)
    record["machine"] = machine(load_start)
    write_record("lookahead", record, str(path))
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
