"""Early-exit decoding on SmolLM2: speed against quality over exit thresholds.

For each threshold (``llmopt.runtime.early_exit``, criterion ``--criterion``,
first check after ``--min-layer`` layers, then every ``--check-every``):

* **teacher-forced, exact KV** (``kv_fill="full"``: one parallel forward, every
  hidden state the full model's, so only the exit decision costs quality) over
  the first ``--ppl-tokens`` tokens of the held-out text (Julius Caesar):
  agreement of the exit argmax with the full model's greedy token, perplexity,
  mean decoder layers used;
* **teacher-forced, copied KV** (``kv_fill="copy"``, CALM's state copy, what
  decoding does; token by token) over the first ``--copy-tokens`` tokens of the
  same text: the same three figures;
* **decoding**: greedy continuation of ``--prompts`` passages of the held-out
  text, ``--new-tokens`` each: token agreement with the full model's
  continuation (position by position), mean layers used, decode tokens/s,
  against the same layer loop without exits in the same run (eager, batch 1).

A calibration step picks the threshold for ``--target-agreement`` on the
calibration text (Tempest; exact-KV agreement, the fast path) with
``calibrate_threshold``; the pick is added to the table. With
``--train-minutes`` > 0, SmolLM2 is then trained with LayerSkip's recipe
(``llmopt.training.early_exit.train_early_exit`` on Macbeth: layer dropout,
early-exit losses at the check layers) for that long and the table is measured
again. Writes a JSON record under bench/results/ and a PNG plot; prints a
markdown table. Run it under the benchmark lock:

    flock /tmp/bench.lock python bench/early_exit.py [--thresholds 0.99 0.95 0.9] [--train-minutes 8]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, pyplot, versions, write_record  # noqa: E402
from llmopt.runtime import early_exit as ee  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = ROOT / "bench" / "data" / "julius_caesar.txt"
TEXTS = ROOT.parent / "shared" / "data" / "text"
CALIBRATION = TEXTS / "tempest.txt"
TRAIN_TEXT = TEXTS / "macbeth.txt"
NOTE = ("CPU timings on a shared machine: other agents' jobs ran at the same time (see the load "
        "averages); compare rows within this record only. Decoding is eager (no torch.compile), batch 1.")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.99, 0.95, 0.9])
    parser.add_argument("--criterion", choices=ee.CRITERIA, default="max_prob")
    parser.add_argument("--min-layer", type=int, default=20)
    parser.add_argument("--check-every", type=int, default=4)
    parser.add_argument("--ppl-tokens", type=int, default=2048, help="exact-KV teacher-forced tokens")
    parser.add_argument("--copy-tokens", type=int, default=160, help="copied-KV teacher-forced tokens (slow)")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--target-agreement", type=float, default=0.95)
    parser.add_argument("--calibration-tokens", type=int, default=2048)
    parser.add_argument("--train-minutes", type=float, default=0.0, help="LayerSkip training before a 2nd table")
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--train-seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--speed-only", action="store_true",
                        help="only decode tokens/s: plain and each threshold interleaved, --repeats rounds")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def _ids(tokenizer, path: Path) -> list[int]:
    return tokenizer(path.read_text(), add_special_tokens=False)["input_ids"]


def _config(args, threshold, kv_fill):
    return ee.EarlyExitDecodeConfig(threshold, args.min_layer, args.criterion, args.check_every, kv_fill)


def _prompts(ids, args) -> list[list[int]]:
    """Passages spread over the held-out text (after the first ppl window)."""
    start = args.ppl_tokens
    stride = max(1, (len(ids) - start - args.prompt_tokens) // max(args.prompts, 1))
    return [ids[start + i * stride:start + i * stride + args.prompt_tokens] for i in range(args.prompts)]


def _decode(model, prompts, args, config):
    tokens, decoded, seconds, layers, checks = [], 0, 0.0, [], 0
    for prompt in prompts:
        out, stats = ee.generate(model, prompt, args.new_tokens, config)
        tokens.append(out)
        decoded += len(out) - 1
        seconds += stats.decode_s
        layers += stats.layers_used[1:]
        checks += stats.num_checks
    return {"tokens": tokens, "tokens_per_s": decoded / seconds, "mean_layers": sum(layers) / len(layers),
            "checks_per_token": checks / decoded}


def _agreement(a, b) -> float:
    pairs = [(x, y) for sa, sb in zip(a, b) for x, y in zip(sa, sb)]
    return sum(x == y for x, y in pairs) / len(pairs)


def measure(model, heldout, prompts, args, thresholds, label) -> tuple[list[dict], dict]:
    rows = []
    t0 = time.perf_counter()
    ref_exact, exact_at = ee.score_thresholds(model, heldout[:args.ppl_tokens], thresholds,
                                              min_layer=args.min_layer, criterion=args.criterion,
                                              check_every=args.check_every)
    copy_ids = heldout[:args.copy_tokens]
    scored = len(copy_ids) - 32  # score()'s default context
    ref_copy = ee.ScoreResult(ref_exact.nll[:scored], ref_exact.argmax[:scored], ref_exact.stats)
    plain = _decode(model, prompts, args, None)
    depth = float(ref_exact.stats.num_layers)
    full_row = {"model": label, "threshold": None, "exact_agreement": 1.0, "exact_ppl": ref_exact.perplexity,
                "exact_layers": depth, "copy_agreement": 1.0, "copy_ppl": ref_copy.perplexity, "copy_layers": depth,
                "decode_agreement": 1.0, "decode_layers": plain["mean_layers"], "decode_checks": 0.0,
                "tokens_per_s": plain["tokens_per_s"], "speedup": 1.0}
    rows.append(full_row)
    _print_row(full_row)
    for threshold in thresholds:
        exact = exact_at[threshold]
        copied = ee.score(model, copy_ids, _config(args, threshold, "copy"))
        decoded = _decode(model, prompts, args, _config(args, threshold, "copy"))
        row = {"model": label, "threshold": threshold,
               "exact_agreement": exact.agreement(ref_exact), "exact_ppl": exact.perplexity,
               "exact_layers": exact.stats.mean_layers,
               "copy_agreement": copied.agreement(ref_copy), "copy_ppl": copied.perplexity,
               "copy_layers": copied.stats.mean_layers,
               "decode_agreement": _agreement(decoded["tokens"], plain["tokens"]),
               "decode_layers": decoded["mean_layers"], "decode_checks": decoded["checks_per_token"],
               "tokens_per_s": decoded["tokens_per_s"],
               "speedup": decoded["tokens_per_s"] / plain["tokens_per_s"]}
        rows.append(row)
        _print_row(row)
    return rows, {"seconds": time.perf_counter() - t0}


HEADER = ("| model | threshold | agreement (exact KV) | ppl (exact KV) | layers (exact KV) | agreement (copied KV) "
          "| ppl (copied KV) | layers (copied KV) | decode agreement | decode layers | checks/token | tokens/s | speedup |")


def _row_text(row) -> str:
    t = "full model" if row["threshold"] is None else f"{row['threshold']:g}"
    return (f"| {row['model']} | {t} | {row['exact_agreement']:.3f} | {row['exact_ppl']:.2f} | "
            f"{row['exact_layers']:.1f} | {row['copy_agreement']:.3f} | {row['copy_ppl']:.2f} | "
            f"{row['copy_layers']:.1f} | {row['decode_agreement']:.3f} | {row['decode_layers']:.1f} | "
            f"{row['decode_checks']:.2f} | "
            f"{row['tokens_per_s']:.2f} | {row['speedup']:.2f}x |")


def _print_row(row) -> None:
    print(_row_text(row), flush=True)


def speed(model, prompts, args) -> list[dict]:
    """Decode tokens/s of plain and each threshold, interleaved round by round (the load
    drifts on a shared machine: each round's speedup is against that round's plain run)."""
    settings = [None] + list(args.thresholds)
    runs = {s: [] for s in settings}
    for _ in range(args.repeats):
        for setting in settings:
            config = None if setting is None else _config(args, setting, "copy")
            runs[setting].append(_decode(model, prompts, args, config))
    rows = []
    for setting in settings:
        rates = [r["tokens_per_s"] for r in runs[setting]]
        ratios = sorted(r["tokens_per_s"] / p["tokens_per_s"] for r, p in zip(runs[setting], runs[None]))
        rows.append({"threshold": setting, "tokens_per_s": sorted(rates)[len(rates) // 2], "all_tokens_per_s": rates,
                     "speedup_median": ratios[len(ratios) // 2], "speedups": ratios,
                     "decode_layers": runs[setting][0]["mean_layers"],
                     "checks_per_token": runs[setting][0]["checks_per_token"]})
        print(f"| {'plain' if setting is None else setting} | {rows[-1]['decode_layers']:.1f} | "
              f"{rows[-1]['checks_per_token']:.2f} | {rows[-1]['tokens_per_s']:.2f} | "
              f"{rows[-1]['speedup_median']:.2f}x ({', '.join(f'{x:.2f}' for x in ratios)}) |", flush=True)
    return rows


def calibrate(model, tokenizer, args) -> dict:
    ids = _ids(tokenizer, CALIBRATION)[:args.calibration_tokens]
    grid = sorted(set(args.thresholds) | set(ee.DEFAULT_CANDIDATES) | {0.999, 0.995, 0.98}, reverse=True)
    result = ee.calibrate_threshold(model, ids, target_agreement=args.target_agreement, min_layer=args.min_layer,
                                    criterion=args.criterion, check_every=args.check_every, kv_fill="full",
                                    candidates=grid)
    print(f"calibration ({CALIBRATION.name}, {len(ids)} tokens, exact KV): threshold {result.threshold} "
          f"for agreement >= {args.target_agreement} (got {result.agreement})", flush=True)
    return {"text": CALIBRATION.name, "tokens": len(ids), "kv_fill": "full", "target": args.target_agreement,
            "threshold": result.threshold, "agreement": result.agreement, "tried": result.tried}


def train(model, tokenizer, args) -> dict:
    from llmopt.training import TrainConfig
    from llmopt.training.early_exit import EarlyExitConfig, train_early_exit

    ids = torch.tensor(_ids(tokenizer, TRAIN_TEXT))
    windows = [w for w in ids.split(args.train_seq_len) if w.numel() == args.train_seq_len]
    layers = model.config.num_hidden_layers
    exits = tuple(range(args.min_layer - 1, layers - 1, args.check_every))  # 0-based layer after the check
    config = EarlyExitConfig(layer_dropout=0.1, curve="exponential", exit_scale=1.0, exit_layers=exits)
    budget = args.train_minutes * 60

    def stop_on_time(trainer, record) -> None:
        if trainer.result.train_seconds >= budget:
            trainer.config.max_steps = trainer.step

    model.train()
    result = train_early_exit(model, windows, config, train_config=TrainConfig(
        max_steps=100_000, micro_batch_size=args.train_batch, seq_len=args.train_seq_len, lr=args.lr,
        warmup_steps=2, schedule="constant", compile=False, seed=0), callbacks=[stop_on_time])
    model.eval()
    print(f"LayerSkip training: {len(result.steps)} steps in {result.train_seconds:.0f} s, "
          f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}", flush=True)
    return {"steps": len(result.steps), "train_seconds": result.train_seconds, "losses": result.losses,
            "text": TRAIN_TEXT.name, "batch": args.train_batch, "seq_len": args.train_seq_len, "lr": args.lr,
            "layer_dropout": 0.1, "curve": "exponential", "exit_layers": list(exits), "exit_scale": 1.0,
            "optimizer": "AdamW", "compile": False}


def plot(rows, path: Path) -> str | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label in dict.fromkeys(r["model"] for r in rows):
        part = [r for r in rows if r["model"] == label]
        axes[0].plot([r["copy_layers"] for r in part], [r["copy_agreement"] for r in part], "o-",
                     label=f"{label}, copied KV")
        axes[0].plot([r["exact_layers"] for r in part], [r["exact_agreement"] for r in part], "s--",
                     label=f"{label}, exact KV")
        axes[1].plot([r["speedup"] for r in part], [r["decode_agreement"] for r in part], "o-", label=label)
    axes[0].set_xlabel("mean decoder layers used")
    axes[0].set_ylabel("teacher-forced agreement with the full model")
    axes[1].set_xlabel("decode speedup vs the same loop without exits")
    axes[1].set_ylabel("decoded tokens identical to the full model")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M early exit (eager, CPU, batch 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return str(path)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    from llmopt.models import load

    loaded = load("smollm2")
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    heldout = _ids(tokenizer, HELD_OUT)
    prompts = _prompts(heldout, args)
    if args.speed_only:
        print("| setting | decode layers | checks/token | tokens/s (median) | speedup (median; each round) |")
        print("| --- | --- | --- | --- | --- |")
        rows = speed(model, prompts, args)
        record = {"benchmark": "early_exit_speed", "note": NOTE, "machine": machine(load_start),
                  "versions": versions(), "rows": rows,
                  "settings": {"model": "smollm2 fp32", "criterion": args.criterion, "min_layer": args.min_layer,
                               "check_every": args.check_every, "prompts": args.prompts,
                               "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                               "repeats": args.repeats, "threads": torch.get_num_threads(), "compile": False,
                               "batch": 1, "kv_fill": "copy"}}
        print(f"record: {write_record('early_exit_speed', record, args.out)}")
        print(f"load average start {load_start}, end {os.getloadavg()}")
        return
    calibration = calibrate(model, tokenizer, args)
    thresholds = list(args.thresholds)
    if calibration["threshold"] is not None and calibration["threshold"] not in thresholds:
        thresholds.append(calibration["threshold"])
    thresholds.sort(reverse=True)
    print(HEADER)
    print("|" + " --- |" * 13)
    rows, timing = measure(model, heldout, prompts, args, thresholds, "SmolLM2 as shipped")
    settings = {"model": "smollm2 fp32", "criterion": args.criterion, "min_layer": args.min_layer,
                "check_every": args.check_every, "held_out": HELD_OUT.name, "ppl_tokens": args.ppl_tokens,
                "copy_tokens": args.copy_tokens, "score_context": 32, "prompts": args.prompts,
                "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                "threads": torch.get_num_threads(), "compile": False, "batch": 1}

    def record(training):
        return {"benchmark": "early_exit", "note": NOTE, "machine": machine(load_start), "versions": versions(),
                "settings": settings, "calibration": calibration, "training": training, "rows": rows,
                "seconds": timing["seconds"]}

    path = write_record("early_exit", record(None), args.out)  # rewritten below if training runs
    print(f"record so far: {path}", flush=True)
    if args.train_minutes > 0:
        trained = copy.deepcopy(model)
        training = train(trained, tokenizer, args)
        trained_calibration = calibrate(trained, tokenizer, args)
        training["calibration"] = trained_calibration
        more = list(args.thresholds)
        if trained_calibration["threshold"] is not None and trained_calibration["threshold"] not in more:
            more.append(trained_calibration["threshold"])
        more.sort(reverse=True)
        trained_rows, _ = measure(trained, heldout, prompts, args, more, "after LayerSkip training")
        rows += trained_rows
        write_record("early_exit", record(training), str(path))
    png = plot(rows, path.with_suffix(".png"))
    print("\n" + HEADER)
    print("|" + " --- |" * 13)
    for row in rows:
        print(_row_text(row))
    print(f"\nrecord: {path}" + (f"\nplot: {png}" if png else ""))
    print(f"load average start {load_start}, end {os.getloadavg()}")


if __name__ == "__main__":
    main()
