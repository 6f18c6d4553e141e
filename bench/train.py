"""Training benchmarks: step speed and memory, distillation of a pruned student, early exit.

Three tasks, each its own record (bench/results/<name>-<host>-<time>.json):

  speed       SmolLM2, sequences of 512 and 1024 tokens (batch 1): a plain PyTorch
              loop (the HF model eager, torch's AdamW, ``model(ids, labels=ids).loss``)
              against the llmopt Trainer compiled (``backend="llmopt"``) with
              recompute none / selective / full. Per setting: the step time (median
              of the timed steps, after warm-up steps that include compiling), tokens/s,
              and the bytes saved for backward during one training forward (distinct
              storages, parameters excluded, counted with saved_tensors_hooks; the
              compiled graphs' saved tensors go through the hooks too) on CPU, the peak
              allocated memory on CUDA. A second plain row runs the same loop with the
              allocator setting the Trainer makes on CPU (``keep_cpu_memory``: freed
              memory kept in the process), so the gain of compiling is shown apart. Each setting runs in a fresh process
              (``--same-process``: all in this one). Record ``train``, plot next to it.
  distill     recover a pruned SmolLM2 from the fp32 teacher (``--student``: 2:4 magnitude
              pruning of every linear but lm_head, the zeros kept zero while training,
              or ``heads`` / ``channels``: ``--student-sparsity`` of the KV-head groups /
              MLP channels of every layer removed, the projections shrunk): train on
              macbeth.txt, held-out perplexity on tempest.txt (another play). Rows:
              teacher, student before, after distillation (``--minutes`` of training,
              the steps it reached), after plain fine-tuning with the same steps and
              settings. Record ``train_distill``.
  early-exit  SmolLM2's per-layer exit agreement (llmopt.training.early_exit.exit_agreement)
              on held-out text before and after a short LayerSkip run. Record
              ``train_early_exit``, plot next to it.

``--tiny``: a small random Llama and short sequences instead of SmolLM2 (a quick
check that every path runs; its figures mean nothing).

    flock /tmp/bench.lock python bench/train.py --task speed [--seq-lens 512 1024] [--steps 3]
    flock /tmp/bench.lock python bench/train.py --task distill [--minutes 20]
    flock /tmp/bench.lock python bench/train.py --task early-exit [--steps 10]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, versions, write_record  # noqa: E402

TEXTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "text"
TRAIN_TEXT, HELDOUT_TEXT = TEXTS / "macbeth.txt", TEXTS / "tempest.txt"
PLAIN_KEEP = "plain-keep"
NOTE = ("CPU timings on a shared machine: other helpers' tests ran at the same time "
        "(see the load averages); compare settings within this record only.")


def _model(tiny: bool):
    if tiny:
        from llmopt.models import random_llama

        return random_llama(num_layers=4, hidden_size=64, vocab_size=512), None
    from llmopt.models import load

    return load("smollm2")


def _tokens(tokenizer, path: Path, vocab: int, count: int | None = None, seed: int = 0) -> torch.Tensor:
    """The text's token ids (a seeded random stream for the tiny model, which has no tokenizer)."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab, (count or 4096,), generator=g)
    ids = torch.tensor(tokenizer(path.read_text(), add_special_tokens=False)["input_ids"])
    return ids if count is None else ids[:count]


def _windows(ids: torch.Tensor, length: int) -> list[torch.Tensor]:
    return [w for w in ids.split(length) if w.numel() == length]


# ---------------------------------------------------------------- speed


def _saved_bytes(model, fn):
    from llmopt.training.memory import _count_saved

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        out.backward()
        return torch.cuda.max_memory_allocated()
    with _count_saved(model) as seen:
        out = fn()
    del out  # the count is taken at the end of the forward; no backward needed
    return sum(seen.values())


def _plain_loop(model, ids: torch.Tensor, steps: int, warmup: int) -> dict:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    saved = _saved_bytes(model, lambda: model(ids, labels=ids).loss)
    model.zero_grad(set_to_none=True)
    return {"step_s": statistics.median(times), "step_times_s": times, "saved_bytes": saved}


def _trainer_run(model, ids: torch.Tensor, recompute: str, steps: int, warmup: int, lower: str) -> dict:
    from llmopt.training import TrainConfig, Trainer

    rows = [ids[0]] * (warmup + steps)
    config = TrainConfig(max_steps=warmup + steps, micro_batch_size=1, seq_len=ids.shape[1], lr=1e-5,
                         schedule="constant", recompute=recompute, compile=True, compile_options={"lower": lower},
                         shuffle=False, max_grad_norm=None)
    trainer = Trainer(model, config, rows)
    result = trainer.train()
    times = [s["seconds"] for s in result.steps[warmup:]]
    batch = trainer.batches.step(1, 1)[0]
    saved = _saved_bytes(model, lambda: trainer.compute_loss(trainer.train_model, batch)[0])
    model.zero_grad(set_to_none=True)
    return {"step_s": statistics.median(times), "step_times_s": times, "saved_bytes": saved,
            "first_step_s": result.steps[0]["seconds"]}


def _speed_row(args, length: int, mode: str | None) -> dict:
    """One setting's figures, measured in this process."""
    base, _ = _model(args.tiny)
    ids = torch.randint(0, base.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
    if mode is None:
        return _plain_loop(base, ids, args.steps, args.warmup)
    if mode == PLAIN_KEEP:  # the plain loop with the allocator setting the Trainer makes on CPU
        from llmopt.training.memory import keep_freed_cpu_memory

        kept = keep_freed_cpu_memory()
        return {**_plain_loop(base, ids, args.steps, args.warmup), "kept_cpu_memory": kept}
    return _trainer_run(base, ids, mode, args.steps, args.warmup, args.lower)


def _speed_row_in_child(args, length: int, mode: str | None) -> dict:
    """The same in a fresh Python process: each setting starts from an empty heap and no
    Dynamo state, so no setting pays for the memory layout another one left behind (in one
    process, the settings after the first measured up to 25% slower on alternate steps)."""
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, str(Path(__file__).resolve()), "--task", "speed", "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--lower", args.lower, "--_row", str(length), mode or "plain",
                   out.name] + (["--tiny"] if args.tiny else []) + (["--threads", str(args.threads)]
                                                                   if args.threads else [])
        subprocess.run(command, check=True)
        return json.loads(Path(out.name).read_text())


def task_speed(args, on_row=None) -> dict:
    seq_lens = args.seq_lens or ([64, 128] if args.tiny else [512, 1024])
    rows = []
    for length in seq_lens:
        settings = ([("plain eager", None), ("plain eager, kept memory", PLAIN_KEEP)]
                    + [(f"llmopt recompute={m}", m) for m in args.recompute])
        for name, mode in settings:
            print(f"[{length} tokens] {name} ...", flush=True)
            figures = (_speed_row(args, length, mode) if args.same_process
                       else _speed_row_in_child(args, length, mode))
            figures.update(setting=name, seq_len=length, tokens_per_s=length / figures["step_s"])
            rows.append(figures)
            if on_row is not None:  # a run cut short still leaves its rows
                on_row(_speed_figures(rows, seq_lens, args, complete=False))
            print(f"  step {figures['step_s']:.3f} s  {figures['tokens_per_s']:.1f} tok/s  "
                  f"saved {figures['saved_bytes'] / 2**20:.1f} MiB", flush=True)
    return _speed_figures(rows, seq_lens, args, complete=True, show=True)


def _speed_figures(rows: list, seq_lens: list, args, complete: bool, show: bool = False) -> dict:
    for length in seq_lens:
        group = {r["setting"]: r for r in rows if r["seq_len"] == length}
        plain, none = group.get("plain eager"), group.get("llmopt recompute=none")
        full = group.get("llmopt recompute=full")
        if plain and none:
            none["speedup_vs_plain"] = plain["step_s"] / none["step_s"]
        if group.get("plain eager, kept memory") and none:
            none["speedup_vs_plain_kept_memory"] = group["plain eager, kept memory"]["step_s"] / none["step_s"]
        if none and full:
            full["saved_ratio_vs_none"] = none["saved_bytes"] / max(full["saved_bytes"], 1)
            full["time_ratio_vs_none"] = full["step_s"] / none["step_s"]
    if show:
        _print_speed_table(rows)
    return {"rows": rows, "complete": complete,
            "settings": {"seq_lens": seq_lens, "steps": args.steps, "warmup": args.warmup,
                         "batch": 1, "lower": args.lower, "optimizer": "AdamW lr 1e-5",
                         "process_per_setting": not args.same_process}}


def _print_speed_table(rows: list) -> None:
    print(f"\n{'tokens':>6} {'setting':<28} {'step s':>8} {'tok/s':>8} {'saved MiB':>10}  vs")
    for r in rows:
        extra = ""
        if "speedup_vs_plain" in r:
            extra = f"{r['speedup_vs_plain']:.2f}x plain's speed"
            if "speedup_vs_plain_kept_memory" in r:
                extra += f", {r['speedup_vs_plain_kept_memory']:.2f}x plain with kept memory"
        if "saved_ratio_vs_none" in r:
            extra = f"{r['saved_ratio_vs_none']:.2f}x less saved, {r['time_ratio_vs_none']:.2f}x none's time"
        print(f"{r['seq_len']:>6} {r['setting']:<28} {r['step_s']:>8.3f} {r['tokens_per_s']:>8.1f} "
              f"{r['saved_bytes'] / 2**20:>10.1f}  {extra}")


def plot_speed(record: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = record["rows"]
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    lengths = record["settings"]["seq_lens"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(settings)
    for i, name in enumerate(settings):
        mine = {r["seq_len"]: r for r in rows if r["setting"] == name}
        xs = [j + i * width for j in range(len(lengths))]
        # a run cut short may lack a length: its bars are 0
        axes[0].bar(xs, [mine[n]["tokens_per_s"] if n in mine else 0 for n in lengths], width, label=name)
        axes[1].bar(xs, [mine[n]["saved_bytes"] / 2**20 if n in mine else 0 for n in lengths], width, label=name)
    for ax, title in zip(axes, ("training tokens/s", "saved for backward (MiB)" if not torch.cuda.is_available()
                                else "peak allocated (MiB)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(lengths))], [f"{n} tokens" for n in lengths])
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return str(path)


# ---------------------------------------------------------------- distillation


def _perplexity(model, windows: list[torch.Tensor], batch: int = 8) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows), batch):
            ids = torch.stack(windows[start:start + batch])
            logits = model(ids).logits[:, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                             ids[:, 1:].reshape(-1), reduction="sum"))
            count += ids[:, 1:].numel()
    return math.exp(total / count)


class _TimeBudget:
    """A Trainer callback that ends the run once ``seconds`` of training have passed."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __call__(self, trainer, record) -> None:
        if trainer.result.train_seconds >= self.seconds:
            trainer.config.max_steps = trainer.step


def task_distill(args) -> dict:
    from llmopt.pruning import PruneConfig, prune_model
    from llmopt.training import TrainConfig, Trainer
    from llmopt.training.distill import DistillConfig, DistillTrainer, freeze_pruned_zeros

    teacher, tokenizer = _model(args.tiny)
    vocab = teacher.config.vocab_size
    seq_len = args.seq_len or (64 if args.tiny else 128)
    train = _windows(_tokens(tokenizer, TRAIN_TEXT, vocab, seed=1), seq_len)
    heldout = _windows(_tokens(tokenizer, HELDOUT_TEXT, vocab, count=args.heldout_tokens, seed=2), seq_len)
    if args.student == "2:4":
        prune = PruneConfig(method="magnitude", pattern="2:4")
        student_desc = "2:4 magnitude pruning of every linear but lm_head (zeros kept zero)"
    else:  # heads / channels: the projections shrink, nothing to keep at zero
        prune = PruneConfig(method="magnitude", pattern=args.student, sparsity=args.student_sparsity)
        student_desc = (f"structured magnitude pruning: {args.student_sparsity:.0%} of the "
                        f"{'KV-head groups' if args.student == 'heads' else 'MLP channels'} of every layer removed")
    pruned = prune_model(copy.deepcopy(teacher), prune)
    print(f"{len(train)} training windows of {seq_len} tokens, {len(heldout)} held-out", flush=True)
    table = {"teacher": _perplexity(teacher, heldout)}
    print(f"teacher {table['teacher']:.2f}", flush=True)
    table["student before"] = _perplexity(pruned, heldout)
    print(f"student before {table['student before']:.2f}", flush=True)
    settings = dict(micro_batch_size=args.batch, seq_len=seq_len, lr=args.lr, warmup_steps=2, schedule="constant",
                    compile=False, seed=0, max_grad_norm=1.0, weight_decay=0.0)
    distill_config = DistillConfig(loss=args.loss, temperature=args.temperature, ce_weight=args.ce_weight)

    student = copy.deepcopy(pruned)
    freeze_pruned_zeros(student)
    budget = args.minutes * 60
    trainer = DistillTrainer(student, teacher, TrainConfig(max_steps=100_000, **settings), train,
                             distill_config=distill_config, callbacks=[_TimeBudget(budget)])
    distilled = trainer.train()
    steps = len(distilled.steps)
    table["after distillation"] = _perplexity(student, heldout)
    print(f"after distillation ({steps} steps, {distilled.train_seconds:.0f} s) "
          f"{table['after distillation']:.2f}", flush=True)
    del student, trainer

    tuned_model = copy.deepcopy(pruned)
    freeze_pruned_zeros(tuned_model)
    tuned = Trainer(tuned_model, TrainConfig(max_steps=steps, **settings), train).train()
    table["after plain fine-tuning"] = _perplexity(tuned_model, heldout)
    print(f"after plain fine-tuning ({len(tuned.steps)} steps, {tuned.train_seconds:.0f} s) "
          f"{table['after plain fine-tuning']:.2f}", flush=True)

    lost = table["student before"] - table["teacher"]
    recovered = (table["student before"] - table["after distillation"]) / lost if lost > 0 else float("nan")
    print(f"\n{'model':<26} {'held-out ppl':>12}")
    for name, value in table.items():
        print(f"{name:<26} {value:>12.2f}")
    print(f"distillation recovered {recovered:.0%} of the perplexity {args.student} pruning lost "
          f"(target >= 50% within {args.minutes} min: {'met' if recovered >= 0.5 else 'NOT met'})")
    return {"perplexity": table, "recovered_fraction": recovered, "steps": steps,
            "distill_seconds": distilled.train_seconds, "finetune_seconds": tuned.train_seconds,
            "distill_losses": distilled.losses, "finetune_losses": tuned.losses,
            "settings": {"student": student_desc, "student_pattern": args.student,
                         "student_sparsity": 0.5 if args.student == "2:4" else args.student_sparsity,
                         "train_text": TRAIN_TEXT.name, "heldout_text": HELDOUT_TEXT.name,
                         "heldout_tokens": sum(w.numel() for w in heldout), "seq_len": seq_len,
                         "batch": args.batch, "lr": args.lr, "optimizer": "AdamW", "minutes": args.minutes,
                         "distill": {"loss": args.loss, "temperature": args.temperature,
                                     "ce_weight": args.ce_weight}, "compile": False}}


# ---------------------------------------------------------------- early exit


def task_early_exit(args) -> dict:
    from llmopt.training import TrainConfig
    from llmopt.training.early_exit import EarlyExitConfig, exit_agreement, train_early_exit

    model, tokenizer = _model(args.tiny)
    vocab = model.config.vocab_size
    seq_len = args.seq_len or (64 if args.tiny else 128)
    train = _windows(_tokens(tokenizer, TRAIN_TEXT, vocab, seed=1), seq_len)
    heldout_windows = _windows(_tokens(tokenizer, HELDOUT_TEXT, vocab, count=args.heldout_tokens, seed=2), seq_len)
    heldout = torch.stack(heldout_windows)
    layers = model.config.num_hidden_layers
    exits = tuple(range(args.exit_every - 1, layers - 1, args.exit_every))
    config = EarlyExitConfig(layer_dropout=args.layer_dropout, curve="exponential", exit_scale=args.exit_scale,
                             exit_layers=exits)
    before = exit_agreement(model, heldout)
    ppl_before = _perplexity(model, heldout_windows)
    print("before:", " ".join(f"{a:.2f}" for a in before), f" final-layer ppl {ppl_before:.2f}", flush=True)
    # --minutes bounds the run (the steps it reaches are recorded); --steps caps it
    callbacks = [_TimeBudget(args.minutes * 60)] if args.minutes else []
    result = train_early_exit(model, train, config, train_config=TrainConfig(
        max_steps=args.steps, micro_batch_size=args.batch, seq_len=seq_len, lr=args.lr, warmup_steps=2,
        schedule="constant", compile=False, seed=0), callbacks=callbacks)
    after = exit_agreement(model, heldout)
    ppl_after = _perplexity(model, heldout_windows)
    print("after: ", " ".join(f"{a:.2f}" for a in after), f" final-layer ppl {ppl_after:.2f}", flush=True)
    print(f"\n{len(result.steps)} steps of {args.batch} x {seq_len} tokens in {result.train_seconds:.0f} s")
    print(f"{'layer':>5} {'before':>7} {'after':>7}")
    for layer in range(layers):
        mark = " (exit loss)" if layer in exits else ""
        print(f"{layer:>5} {before[layer]:>7.3f} {after[layer]:>7.3f}{mark}")
    mean = lambda xs: sum(xs[:-1]) / (len(xs) - 1)  # noqa: E731  (the last layer is 1 by definition)
    print(f"{'mean':>5} {mean(before):>7.3f} {mean(after):>7.3f}   final-layer held-out ppl "
          f"{ppl_before:.2f} -> {ppl_after:.2f}")
    return {"agreement_before": before, "agreement_after": after, "losses": result.losses,
            "mean_agreement_before": mean(before), "mean_agreement_after": mean(after),
            "perplexity_before": ppl_before, "perplexity_after": ppl_after,
            "steps": len(result.steps), "train_seconds": result.train_seconds,
            "settings": {"max_steps": args.steps, "minutes": args.minutes, "batch": args.batch, "seq_len": seq_len,
                         "lr": args.lr, "layer_dropout": args.layer_dropout, "curve": "exponential",
                         "exit_scale": args.exit_scale, "exit_layers": list(exits),
                         "exit_weights": "linear", "train_text": TRAIN_TEXT.name, "heldout_text": HELDOUT_TEXT.name,
                         "heldout_tokens": int(heldout.numel()), "compile": False, "optimizer": "AdamW"}}


def plot_early_exit(record: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("agreement_before", "before"), ("agreement_after", "after the early-exit run")):
        ax.plot(range(len(record[key])), record[key], "o-", markersize=3, label=label)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("exit argmax == final argmax")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return str(path)


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("speed", "distill", "early-exit"), default="speed")
    parser.add_argument("--tiny", action="store_true", help="a small random Llama (quick check; figures mean nothing)")
    parser.add_argument("--seq-lens", type=int, nargs="+", help="speed: sequence lengths (default 512 1024)")
    parser.add_argument("--recompute", nargs="+", default=["none", "selective", "full"],
                        choices=("none", "selective", "full"), help="speed: Trainer recompute modes")
    parser.add_argument("--steps", type=int, default=None, help="speed: timed steps (3); early-exit: steps (10)")
    parser.add_argument("--warmup", type=int, default=1, help="speed: untimed first steps (compiling)")
    parser.add_argument("--lower", default="inductor", choices=("inductor", "eager"), help="speed: llmopt lowering")
    parser.add_argument("--same-process", action="store_true",
                        help="speed: run every setting in this process (default: a fresh process each)")
    parser.add_argument("--_row", nargs=3, metavar=("LEN", "MODE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--minutes", type=float, default=None,
                        help="distill (20) / early-exit (none: --steps only): training time budget")
    parser.add_argument("--seq-len", type=int, help="distill/early-exit: window length (128)")
    parser.add_argument("--batch", type=int, default=4, help="distill/early-exit: sequences per step")
    parser.add_argument("--lr", type=float, default=None, help="distill (2e-4) / early-exit (5e-5) learning rate")
    parser.add_argument("--heldout-tokens", type=int, default=4096, help="held-out tokens of tempest.txt")
    parser.add_argument("--student", default="2:4", choices=("2:4", "heads", "channels"),
                        help="distill: how the student is pruned from SmolLM2")
    parser.add_argument("--student-sparsity", type=float, default=0.25,
                        help="distill: fraction of KV-head groups / MLP channels removed (heads, channels)")
    parser.add_argument("--loss", default="forward_kl", choices=("forward_kl", "reverse_kl", "jsd"))
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--ce-weight", type=float, default=0.0)
    parser.add_argument("--layer-dropout", type=float, default=0.1, help="early-exit: p_max")
    parser.add_argument("--exit-every", type=int, default=4, help="early-exit: an exit loss every N layers")
    parser.add_argument("--exit-scale", type=float, default=1.0, help="early-exit: weight of the exit losses")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="record path (default bench/results/<name>-<host>-<time>.json)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps is None:
        args.steps = 3 if args.task == "speed" else 10
    if args.lr is None:
        args.lr = 2e-4 if args.task == "distill" else 5e-5
    if args.minutes is None and args.task == "distill":
        args.minutes = 20.0
    if args.tiny and args.minutes:
        args.minutes = min(args.minutes, 0.2)
    if args._row:  # a child of task_speed: one setting, figures to a file
        length, mode, out = args._row
        figures = _speed_row(args, int(length), None if mode == "plain" else mode)
        Path(out).write_text(json.dumps(figures))
        return 0
    load_start = os.getloadavg()
    name = {"speed": "train", "distill": "train_distill", "early-exit": "train_early_exit"}[args.task]
    path = None

    def save(figures: dict) -> Path:
        nonlocal path
        record = {"benchmark": name, "model": "random llama (tiny)" if args.tiny else "smollm2", "tiny": args.tiny,
                  "machine": machine(load_start), "versions": versions(), "notes": NOTE, **figures}
        path = write_record(name + ("_tiny" if args.tiny else ""), record, args.out or (str(path) if path else None))
        return path

    if args.task == "speed":  # the record is rewritten after every row (complete: false until the end)
        figures = task_speed(args, on_row=save)
    else:
        figures = {"distill": task_distill, "early-exit": task_early_exit}[args.task](args)
    save(figures)
    record = json.loads(path.read_text())
    plotter = {"speed": plot_speed, "early-exit": plot_early_exit}.get(args.task)
    png = plotter(record, path.with_suffix(".png")) if plotter else None
    print(f"record: {path}" + (f"\nplot: {png}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
