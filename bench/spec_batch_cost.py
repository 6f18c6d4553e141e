"""What verifying drafts costs against batch size: the measurement behind ``disable_by_batch_size``.

B sequences (SmolLM2, the engine's compiled runner, prompts of --context
tokens already prefilled) take one decode step through ``ModelRunner.execute``
feeding 1 token each (plain decode) or 1 + k tokens each (the last token and
k drafts, logits of every fed row, as a verification step does). The cost of
verification is r(B, k) = t(B, 1 + k) / t(B, 1), in plain steps.

Speculation pays for a sequence when the tokens a verification emits on
average exceed r. With per-draft acceptance a (independent drafts), a step
that drafts k tokens emits E(a, k) = (1 - a^(k+1)) / (1 - a) tokens; the
break-even acceptance a*(B, k) solves E = r. The table gives r, a* and the
speedup E / r at a few acceptances (0.3: chat answers with n-gram lookup,
0.85: input-grounded tasks; see PERFORMANCE.md).

    flock /tmp/bench.lock python bench/spec_batch_cost.py [--batches 1 2 4 8 16 32] [--ks 1 2 4 8]
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
from common import machine, pyplot, versions, write_record  # noqa: E402

ACCEPTANCES = (0.3, 0.6, 0.85)


def emitted(a: float, k: int) -> float:
    """Expected tokens per verification step of k drafts, each kept with probability a."""
    return k + 1 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)


def break_even(r: float, k: int) -> float | None:
    """Acceptance at which E(a, k) = r (bisection: E grows with a); None when even a = 1 loses."""
    if r <= 1:
        return 0.0
    if emitted(1.0, k) < r:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if emitted(mid, k) < r else (lo, mid)
    return hi


def prefill(llm, batch: int, context: int, seed: int):
    """B running sequences whose prompts (``context`` tokens) are computed; their first token sampled."""
    from llmopt.runtime.sampling_params import SamplingParams

    engine = llm.engine
    g = torch.Generator().manual_seed(seed)
    vocab = int(engine.model.config.vocab_size)
    params = SamplingParams(temperature=0, max_tokens=4096, ignore_eos=True)
    ids = [engine.add_request(None, torch.randint(100, vocab, (context,), generator=g).tolist(), params)
           for _ in range(batch)]
    while any(s.num_output_tokens == 0 for s in engine.scheduler.running) or \
            len(engine.scheduler.running) < batch:
        engine.step()
    return ids


def step_items(block_manager, seqs, k: int):
    from llmopt.runtime.scheduler import ScheduledSequence

    items = []
    for seq in seqs:
        start = seq.num_computed_tokens
        need = start + 1 + k - len(seq.block_table) * block_manager.block_size
        if need > 0:
            block_manager.allocate(seq, 1 + k)
        tokens = seq.token_ids(start, start + 1) + [seq.token_ids(start, start + 1)[0]] * k
        items.append(ScheduledSequence(seq=seq, start=start, num_scheduled_tokens=1 + k, token_ids=tokens,
                                       slot_mapping=block_manager.slot_mapping(seq, start, 1 + k),
                                       samples=True, num_draft_tokens=k))
    return items


def time_step(runner, items, repeats: int) -> float:
    runner.execute(items)  # a new token count may compile once
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.execute(items)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lower", default="inductor", choices=("inductor", "eager"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    from llmopt.runtime.llm import LLM

    biggest = max(args.batches)
    llm = LLM("smollm2", lower=args.lower, kv_cache_memory_gib=1.5, max_num_seqs=biggest,
              max_num_batched_tokens=max(1024, biggest * (1 + max(args.ks))))
    engine = llm.engine
    rows = []
    print(f"{'B':>4}{'k':>4}{'t plain ms':>12}{'t verify ms':>13}{'r':>7}{'a*':>7}"
          + "".join(f"{'E/r @' + str(a):>10}" for a in ACCEPTANCES), flush=True)
    for batch in args.batches:
        ids = prefill(llm, batch, args.context, seed=batch)
        seqs = list(engine.scheduler.running)
        plain = time_step(engine.runner, step_items(engine.scheduler.block_manager, seqs, 0), args.repeats)
        for k in args.ks:
            t = time_step(engine.runner, step_items(engine.scheduler.block_manager, seqs, k), args.repeats)
            r = t / plain
            a_star = break_even(r, k)
            gains = {str(a): emitted(a, k) / r for a in ACCEPTANCES}
            rows.append(dict(batch=batch, k=k, t_plain_s=plain, t_verify_s=t, cost_ratio=r,
                             break_even_acceptance=a_star, speedup_at_acceptance=gains))
            print(f"{batch:>4}{k:>4}{plain * 1e3:>12.1f}{t * 1e3:>13.1f}{r:>7.2f}"
                  f"{'-' if a_star is None else f'{a_star:.2f}':>7}"
                  + "".join(f"{g:>10.2f}" for g in gains.values()), flush=True)
        for request_id in ids:
            engine.abort(request_id)
    record = dict(benchmark="spec_batch_cost", machine=machine(load_start), versions=versions(),
                  settings=dict(model="smollm2", dtype="float32", lower=args.lower, context=args.context,
                                repeats=args.repeats, threads=args.threads),
                  notes="t: median seconds of one ModelRunner.execute over B sequences feeding 1 (plain) "
                        "or 1 + k tokens (verification, logits of every fed row); r = t_verify / t_plain; "
                        "a*: the per-draft acceptance at which (1 - a^(k+1)) / (1 - a) = r. The machine "
                        "was shared with other agents' jobs: see the load averages.",
                  rows=rows)
    path = write_record("spec_batch_cost", record, args.out)
    _plot(rows, path.with_suffix(".png"))
    print(f"record: {path}")
    return 0


def _plot(rows, path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for k in sorted({r["k"] for r in rows}):
        pts = [(r["batch"], r["cost_ratio"]) for r in rows if r["k"] == k]
        ax.plot(*zip(*pts), marker="o", label=f"k={k}")
        ax.axhline(emitted(0.85, k), ls=":", lw=0.8, color=ax.lines[-1].get_color())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (running sequences)")
    ax.set_ylabel("verification step / plain step")
    ax.set_title("Cost of verifying k drafts per sequence\n(dotted: tokens emitted at acceptance 0.85)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
