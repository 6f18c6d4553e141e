"""Per-step overhead of a compiled decode step: Dynamo's guard checks against the step.

Two decode paths of SmolLM2 at batch 1, each compiled with ``backend="llmopt"``:

  engine  the serving engine's model runner (``llmopt.LLM``, what ``llmopt
          generate`` and ``llmopt serve`` run): the paged forward, T new tokens
          packed in one row;
  loop    the single-sequence loop of ``llmopt.runtime.generate`` on
          ``torch.compile(model)`` with a StaticCache (bench/decode.py's
          ``llmopt`` setting).

For each: the number of guards of its compiled entry (Dynamo's guard code
parts, every entry of the compiled code), the time per step in guard
evaluation (the profiler's "TorchDynamo Cache Lookup" events, summed over the
profiled steps and divided by their number), the step's wall time, and the
step's wall time with guard evaluation skipped
(``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``, only to measure
what guards cost: it is unsafe in general), in alternating blocks so both
see the same machine load.

    python bench/step_overhead.py [--paths engine loop] [--steps 24] [--blocks 4] [--lower inductor]
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

PROMPT = "Write a short story about a robot who learns to paint."


def main(argv=None) -> int:
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    rows = []
    for path in args.paths:
        print(f"building {path} ({args.lower}) ...", file=sys.stderr, flush=True)
        step, entries_of = (_engine_path if path == "engine" else _loop_path)(args)
        rows.append(_measure(path, step, entries_of, args))
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    record = {"benchmark": "step_overhead", "machine": machine(load_start), "versions": versions(),
              "config": {"model": "smollm2", "lower": args.lower, "steps": args.steps,
                         "blocks": args.blocks, "batch_size": 1},
              "results": rows}
    out = write_record("step_overhead", record, args.out)
    print(_table(rows, record))
    print(f"wrote {out}")
    return 0


def _engine_path(args):
    """A step function that runs one engine decode step, and the compiled code objects."""
    import llmopt
    from llmopt.runtime.sampling_params import SamplingParams

    llm = llmopt.LLM("smollm2", max_num_seqs=1, lower=args.lower)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=10**6, ignore_eos=True)
    engine.add_request(None, PROMPT, params)
    engine.step()  # the prefill; every later step decodes one token
    return engine.step, engine.runner.compiled_entries  # the runner's own entries (isolate_recompiles)


def _loop_path(args):
    from transformers import StaticCache

    from llmopt.models import load

    model, tokenizer = load("smollm2")
    compiled = torch.compile(model, backend="llmopt", options={"lower": args.lower})
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                           return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        cache = StaticCache(config=model.config, max_cache_len=1024)
    state = {"pos": prompt.shape[1], "token": 0}

    @torch.inference_mode()
    def forward(ids, first):
        positions = torch.arange(first, first + ids.shape[1]).unsqueeze(0)
        out = compiled(input_ids=ids.clone(), position_ids=positions, past_key_values=cache,
                       use_cache=True, logits_to_keep=1)
        return int(out.logits[0, -1].argmax())

    state["token"] = forward(prompt, 0)

    def step():
        state["token"] = forward(torch.tensor([[state["token"]]]), state["pos"])
        state["pos"] += 1

    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return step, lambda: _debug_get_cache_entry_list(type(model).forward.__code__)


def _guard_count(entries_of) -> tuple[int, int]:
    """(compiled entries, guard code parts over them) of the path's compiled step."""
    entries, parts = 0, 0
    for entry in entries_of():
        entries += 1
        manager = entry.guard_manager
        manager.populate_code_parts_for_debugging()
        parts += len(manager.code_parts)
    return entries, parts


def _measure(path, step, entries_of, args) -> dict:
    for _ in range(3):  # warm: any decode-shape compile happens here
        step()
    entries, guards = _guard_count(entries_of)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    lookups = [e for e in prof.events() if e.name == "TorchDynamo Cache Lookup"]
    lookup_us = sum(e.cpu_time_total for e in lookups) / args.steps
    times = {False: [], True: []}
    for _ in range(args.blocks):
        for skip in (False, True):
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=skip):
                for _ in range(args.steps):
                    start = time.perf_counter()
                    step()
                    times[skip].append(time.perf_counter() - start)
    with_guards, without = statistics.median(times[False]), statistics.median(times[True])
    return {"path": path, "compiled_entries": entries, "guards": guards,
            "cache_lookups_per_step": len(lookups) / args.steps, "guard_eval_us_per_step": lookup_us,
            "step_ms_median": with_guards * 1e3, "step_ms_min": min(times[False]) * 1e3,
            "step_ms_median_guards_skipped": without * 1e3, "step_ms_min_guards_skipped": min(times[True]) * 1e3,
            "guard_share_of_step": lookup_us * 1e-6 / with_guards}


def _table(rows, record) -> str:
    m = record["machine"]
    lines = [f"per-step overhead: SmolLM2 batch-1 decode, lower={record['config']['lower']}; "
             f"{m['cpu_model']}, {m['threads']} threads, load {m['load_average_start'][0]:.1f} -> "
             f"{m['load_average_end'][0]:.1f}", "",
             f"{'path':<8}{'entries':>8}{'guards':>8}{'lookups/step':>13}{'guard us/step':>14}"
             f"{'step ms':>9}{'(min)':>8}{'no-guard ms':>12}{'(min)':>8}{'guard share':>12}"]
    for r in rows:
        lines.append(f"{r['path']:<8}{r['compiled_entries']:>8}{r['guards']:>8}{r['cache_lookups_per_step']:>13.1f}"
                     f"{r['guard_eval_us_per_step']:>14.1f}{r['step_ms_median']:>9.2f}{r['step_ms_min']:>8.2f}"
                     f"{r['step_ms_median_guards_skipped']:>12.2f}{r['step_ms_min_guards_skipped']:>8.2f}"
                     f"{r['guard_share_of_step']:>12.2%}")
    return "\n".join(lines)


def _parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--paths", nargs="+", choices=("engine", "loop"), default=["engine", "loop"])
    p.add_argument("--lower", choices=("inductor", "eager"), default="inductor")
    p.add_argument("--steps", type=int, default=24, help="decode steps per block (default 24)")
    p.add_argument("--blocks", type=int, default=4, help="alternating guarded / unguarded blocks (default 4)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", help="JSON path (default bench/results/step_overhead-<host>-<time>.json)")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
