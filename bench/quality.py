"""Quality table: SmolLM2 perplexity under each dtype, quantization and pruning setting.

Perplexity on an evaluation text (--eval-text; default bench/data/julius_caesar.txt,
a play used neither for calibration nor for tuning any default) with fixed
windows (context 512, stride 256: each token scored once), capped to the
first --max-tokens tokens. The calibration text (Wanda, GPTQ, SmoothQuant,
tuning; --calibration, default ../shared/data/text/tempest.txt) is another
file, so the scored text is never seen during calibration; the two must
differ. Every run scores fp32 first and each row is compared with it
(``vs_fp32``). Families "defaults" (what a user gets: ``quantize="int8"``,
``quantize="int4"`` while compiling, ``quantize_weights(model,
QuantConfig("int4", group_size=128), calibration=...)``), "head" (those with
the tied lm_head in float, and the data-free clip searches), "int8" (its
rounding with and without a float lm_head, and fp32 activations), "int4free" (data-free int4 methods by group size, with
and without a float lm_head) and "gptq" (calibrated int4 g128 variants)
answer issue 18's targets. Extra rows "int4 g128 gptq+tuneN" quantize from the
whole calibration text and then tune the grids (--tune-steps). Rows "int4 g128
awq+gptq" (family "awq") first apply activation-aware equivalent scaling to a
copy of the float model (llmopt/quantization/awq.py, from the first
--awq-calibration-tokens calibration tokens), then quantize it like the gptq
row, and with --awq-tune-steps like the gptq+tuneN row; they run only with
--only awq. Quantized settings run only where the backend accepts the
option, through the real kernels (compiled, eager lowering). int4 rows: "rtn"
is what ``quantize="int4"`` does while compiling; "gptq" quantizes first from
the calibration text. Pruning has no quality target yet: the numbers are
reported as measured. Writes JSON under bench/results/ and prints a markdown
table.

    python bench/quality.py [--eval-text PATH] [--calibration PATH] [--max-tokens 4096] [--threads 1]
                            [--only defaults int8 int4free gptq fp32 bf16 quantize awq ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import socket
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmopt import quality  # noqa: E402
from llmopt.config import LLMOptConfig, LLMOptConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TEXTS = ROOT.parent / "shared" / "data" / "text"
HELD_OUT = ROOT / "bench" / "data" / "julius_caesar.txt"
QUANT_MODES = ("int8", "int4", "w8a8", "fp8")
GROUP_SIZES = (32, 64, 128, 256)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--eval-text", "--text", dest="text", default=str(HELD_OUT),
                   help="the text scored (default: a play no default was tuned on)")
    p.add_argument("--calibration", default=str(TEXTS / "tempest.txt"),
                   help="calibration and tuning text (Wanda, GPTQ, SmoothQuant, grid tuning); not the eval text")
    p.add_argument("--calibration-tokens", type=int, default=2048)
    p.add_argument("--gptq-calibration-tokens", type=int, nargs="*", default=[8192],
                   help="family gptq: one more row per value, GPTQ g128 from this many calibration tokens")
    p.add_argument("--tune-steps", type=int, nargs="*", default=[48],
                   help="extra rows int4 g128 gptq+tune (float: lm_head), one per value: GPTQ, then the grids "
                        "trained for this many calibration windows against the float model's outputs "
                        "(llmopt/quantization/tune.py); none: no such row")
    p.add_argument("--tune-calibration-tokens", type=int, default=None,
                   help="calibration tokens of that row, GPTQ's Hessians included (default: the whole "
                        "calibration text; tuning sees each window once)")
    p.add_argument("--awq-tune-steps", type=int, nargs="*", default=[0, 48],
                   help="rows int4 g128 awq+gptq (float: lm_head), family 'awq': activation-aware scaling, "
                        "then GPTQ (0: from --calibration-tokens, like the gptq row) or GPTQ and N tuning steps "
                        "(from --tune-calibration-tokens, like the gptq+tuneN row); none: no such row")
    p.add_argument("--awq-calibration-tokens", type=int, default=2048,
                   help="calibration tokens the scaling search runs on")
    p.add_argument("--awq-search", default="gptq", choices=("gptq", "rtn"),
                   help="quantizer judging each alpha in the scaling search")
    p.add_argument("--awq-o-proj", action="store_true", help="also scale o_proj's inputs (through v_proj)")
    p.add_argument("--context-length", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's; 1 on a CPU shared with other jobs)")
    p.add_argument("--sparsity", type=float, default=0.5, help="unstructured sparsity")
    p.add_argument("--structured-sparsity", type=float, nargs="+", default=[0.5, 0.25],
                   help="heads/channels ratios")
    p.add_argument("--only", nargs="+", default=None,
                   help="families to run: defaults int8 int4free gptq fp32 bf16 quantize unstructured 2:4 heads "
                        "channels awq, or tuned (only the gptq+tuneN rows of quantize) (default: all but awq, "
                        "int8, int4free and gptq, which run only when named); fp32 always runs")
    p.add_argument("--notes", default="", help="free text kept in the record (e.g. what else ran on the machine)")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def settings(args) -> list[tuple[str, quality.Setting]]:
    """(family, setting) for every row this run can measure."""
    rows = [("fp32", quality.Setting()), ("bf16", quality.Setting(dtype="bfloat16"))]
    for pattern in ("unstructured", "2:4"):
        for method in ("magnitude", "wanda"):
            prune = {"method": method, "pattern": pattern, "sparsity": 0.5 if pattern == "2:4" else args.sparsity}
            rows.append((pattern, quality.Setting(prune=prune)))
    for pattern in ("heads", "channels"):
        for sparsity in args.structured_sparsity:
            for method in ("magnitude", "wanda"):
                rows.append((pattern, quality.Setting(prune={"method": method, "pattern": pattern,
                                                             "sparsity": sparsity})))
    # Quantized settings last: on a busy CPU they are the slowest to run.
    rows += [("defaults", s) for s in DEFAULTS]
    for mode in QUANT_MODES:
        if not _accepted(mode):
            print(f"quantize {mode!r}: not accepted by the backend, skipped", file=sys.stderr)
            continue
        rows += [("quantize", s) for s in _quantize_settings(mode)]
    rows += [("int8", s) for s in INT8_ROWS] + [("int4free", s) for s in _data_free_int4()]
    rows += [("gptq", s) for s in GPTQ_ROWS]
    rows += [("head", s) for s in HEAD_ROWS]
    opt_in = {"awq", "int8", "int4free", "gptq", "head"}
    return [(family, s) for family, s in rows
            if family == "fp32" or (family in args.only if args.only else family not in opt_in)]


# What a user gets without choosing: the compile options alone, and quantize_weights with
# calibration at g128 (issue 18's calibrated target); QuantConfig's defaults otherwise.
FP32_ACTIVATIONS = (("quant_cpu_dtype", "float32"),)
DEFAULTS = (  # most telling first: a run cut short keeps them (the record is rewritten after each row)
    quality.Setting(quantize="int8"),  # its default rounding, bf16 activations on CPU
    quality.Setting(quantize="int4"),  # the data-free default (QuantConfig's method and group size)
    quality.Setting(quantize="int4", group_size=128, quantize_method="gptq"),  # calibrated
)
# Family "head": the defaults with the tied lm_head kept in float (what quantizing it costs),
# and the data-free int4 clip search (a candidate default).
HEAD_ROWS = (quality.Setting(quantize="int8", quantize_skip=("lm_head",)),
             quality.Setting(quantize="int4", quantize_skip=("lm_head",)),
             quality.Setting(quantize="int4", group_size=128, quantize_method="gptq", quantize_skip=("lm_head",)),
             quality.Setting(quantize="int8", quantize_method="rtn"),
             quality.Setting(quantize="int4", quantize_method="mse", data_free=True))
# Family "int8": the default (QuantConfig's method), then each rounding with the lm_head int8 and
# float, at the default arithmetic (bf16 activations on CPU: fp32 ones changed nothing, +0.75%
# against +0.76% in quality-vm-20261202-161954.json), and fp32 activations once.
INT8_ROWS = (quality.Setting(quantize="int8"),
             *(quality.Setting(quantize="int8", quantize_method=m, quantize_skip=skip)
               for m in ("rtn", "mse") for skip in ((), ("lm_head",))),
             quality.Setting(quantize="int8", kernels=FP32_ACTIVATIONS))


def _data_free_int4() -> list[quality.Setting]:
    rows = []
    for g in (32, 64, 128):
        for method in ("rtn", "mse", "hqq"):
            for skip in ((), ("lm_head",)):
                rows.append(quality.Setting(quantize="int4", group_size=g, quantize_method=method,
                                            quantize_skip=skip, data_free=method == "mse"))
    return rows


GPTQ_ROWS = (quality.Setting(quantize="int4", group_size=128, quantize_method="gptq", quantize_skip=("lm_head",)),)


def _quantize_settings(mode: str) -> list[quality.Setting]:
    if mode == "w8a8":
        return [quality.Setting(quantize=mode), quality.Setting(quantize=mode, smoothquant=True)]
    if mode != "int4":
        return [quality.Setting(quantize=mode)]
    # Compiling alone (round to nearest, every linear layer), then GPTQ from the
    # calibration text with the lm_head (tied to the embedding) kept in float;
    # at g128 the two cross (GPTQ with the lm_head in int4, RTN without) to
    # show what each choice costs.
    float_head = ("lm_head",)
    rows = [quality.Setting(quantize=mode, group_size=g, quantize_method="rtn") for g in GROUP_SIZES]
    rows += [quality.Setting(quantize=mode, group_size=g, quantize_method="gptq", quantize_skip=float_head)
             for g in GROUP_SIZES]
    rows += [quality.Setting(quantize=mode, group_size=128, quantize_method="gptq"),
             quality.Setting(quantize=mode, group_size=128, quantize_method="rtn", quantize_skip=float_head)]
    return rows


TUNED = quality.Setting(quantize="int4", group_size=128, quantize_method="gptq", quantize_skip=("lm_head",))


def _evaluate_tuned(model, tokens, args, calibration, steps: int) -> dict:
    """The g128 GPTQ row again, from more calibration text, with its grids tuned (same format: int4 g128)."""
    tuned = dataclasses.replace(TUNED, tune_steps=steps)
    row = quality.evaluate(model, tokens, tuned, args.context_length, args.stride, calibration)
    row["setting"] = _tuned_label(steps)
    row["tune_steps"] = steps
    row["calibration_tokens"] = len(calibration)
    return row


def _tuned_label(steps: int) -> str:
    return TUNED.label.replace(" gptq ", f" gptq+tune{steps} ")


class GptqRow:
    """The defaults' calibrated row (QuantConfig("int4"): GPTQ g128, lm_head int4) from N calibration tokens."""

    SETTING = quality.Setting(quantize="int4", quantize_method="gptq")

    def __init__(self, tokens: int):
        self.tokens = tokens

    @property
    def label(self) -> str:
        return f"{self.SETTING.label} ({self.tokens} calibration tokens)"


class AwqRow:
    """A row "int4 g128 awq+gptq[+tuneN]": the scaled float model (made once per run), quantized."""

    def __init__(self, steps: int):
        self.steps = steps

    @property
    def label(self) -> str:
        return TUNED.label.replace(" gptq ", " awq+gptq " if not self.steps else f" awq+gptq+tune{self.steps} ")


_SCALED: dict = {}  # the scaled copy of the model, its report and seconds, made by the first awq row


def _evaluate_awq(model, tokens, args, calibration, tune_calibration, row: AwqRow) -> dict:
    import copy

    from llmopt.quantization import apply_activation_scaling, token_batches

    if not _SCALED:
        start = time.perf_counter()
        scaled = copy.deepcopy(model)
        report = apply_activation_scaling(scaled, token_batches(args.awq_calibration_text, args.context_length),
                                          group_size=TUNED.group_size, scale_o_proj=args.awq_o_proj,
                                          search=args.awq_search)
        _SCALED.update(model=scaled, report=report, seconds=time.perf_counter() - start)
        print(f"   {report.describe()} ({_SCALED['seconds']:.0f} s)", file=sys.stderr, flush=True)
    scaled = _SCALED["model"]
    if row.steps:
        result = _evaluate_tuned(scaled, tokens, args, tune_calibration, row.steps)
    else:
        result = quality.evaluate(scaled, tokens, TUNED, args.context_length, args.stride, calibration)
        result["calibration_tokens"] = len(calibration)
    result["setting"] = row.label
    report = _SCALED["report"]
    result["awq"] = {"search": args.awq_search, "o_proj": args.awq_o_proj, "seconds": _SCALED["seconds"],
                     "alphas": report.alphas, **{k: v for k, v in report.to_dict().items() if k != "groups"}}
    return result


def _quantize_timings(model) -> dict:
    """Seconds to quantize every linear layer of the model (lm_head included), data-free, per method."""
    from llmopt.quantization import QuantConfig, quantize_weights

    timings = {}
    for method in ("mse", "rtn"):  # hqq (not a default) takes minutes
        start = time.perf_counter()
        quantize_weights(model, QuantConfig("int4", method=method))
        timings[f"int4 g32 {method}"] = time.perf_counter() - start
        print(f"   quantize int4 g32 {method}: {timings[f'int4 g32 {method}']:.1f} s", file=sys.stderr, flush=True)
    return timings


def _accepted(mode: str) -> bool:
    try:
        LLMOptConfig.from_options({"quantize": mode})
    except (LLMOptConfigError, TypeError, ImportError):
        return False
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    from llmopt.models import load

    load_at_start = os.getloadavg()[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    eval_text, calibration_source = quality.read_text(args.text), quality.read_text(args.calibration)
    if Path(args.text).resolve() == Path(args.calibration).resolve() or eval_text == calibration_source:
        print("error: --eval-text and --calibration are the same text; the scored text must be held out",
              file=sys.stderr)
        return 2
    model, tokenizer = load(args.model, dtype=torch.float32)
    tokens = quality.tokenize(tokenizer, eval_text)
    total_tokens = len(tokens)
    tokens = tokens[: args.max_tokens]
    calibration_text = quality.tokenize(tokenizer, calibration_source)
    calibration = calibration_text[: args.calibration_tokens]
    tune_calibration = calibration_text[: args.tune_calibration_tokens]
    jobs = settings(args)
    if (not args.only or {"quantize", "tuned"} & set(args.only)) and _accepted("int4"):
        jobs += [("quantize", steps) for steps in args.tune_steps if steps]  # an int: a tuned g128 row
    if args.only and "awq" in args.only and _accepted("int4"):  # opt-in: ~15 min more
        jobs += [("awq", AwqRow(steps)) for steps in args.awq_tune_steps]
    if args.only and "gptq" in args.only and _accepted("int4"):
        jobs += [("gptq", GptqRow(n)) for n in args.gptq_calibration_tokens]
    args.awq_calibration_text = calibration_text[: args.awq_calibration_tokens]
    rows = []
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"quality-{socket.gethostname()}-{datetime.now():%Y%m%d-%H%M%S}.json"

    def record(complete: bool) -> dict:
        return {
            "benchmark": "quality",
            "complete": complete,
            "date": datetime.now().isoformat(timespec="seconds"),
            "host": socket.gethostname(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "model": args.model,
            "text": Path(args.text).name,
            "text_sha256": hashlib.sha256(eval_text.encode()).hexdigest(),
            "calibration_text": Path(args.calibration).name,
            "load_average_at_start": load_at_start,
            "notes": args.notes,
            "text_tokens": total_tokens,
            "scored_prefix_tokens": len(tokens),
            "calibration": f"{Path(args.calibration).name}, first {len(calibration)} tokens "
                           f"(Wanda, GPTQ, SmoothQuant; windows of {args.context_length})",
            "tuned_rows": f"int4 g128 gptq+tuneN: GPTQ from the first {len(tune_calibration)} calibration tokens "
                          f"(windows of {args.context_length}), then N steps (one window each, cycling) training the "
                          f"grids against the float model's next-token distributions (KL); levels kept, grids "
                          f"bf16-exact; pure int4 g128 like the gptq row (lm_head float)",
            "awq_rows": f"int4 g128 awq+gptq[+tuneN]: activation-aware equivalent scaling (llmopt/quantization/awq.py; "
                        f"search quantizer {args.awq_search}, o_proj {'scaled' if args.awq_o_proj else 'not scaled'}, "
                        f"first {len(args.awq_calibration_text)} calibration tokens) folded into a copy of the float "
                        f"model, then the gptq row's (or the gptq+tuneN row's) quantization of it",
            "int4_cpu_kernel": "PyTorch's _weight_int4pack_mm (LLMOPT_NATIVE=0)" if os.environ.get("LLMOPT_NATIVE") == "0"
                               else "llmopt's native kernel (int8 activations) where it builds, else PyTorch's",
            "context_length": args.context_length,
            "stride": args.stride,
            "method": "sliding windows, each token scored once; lower='eager'; seconds include compiling "
                      "and quantizing from calibration (quantize_seconds); weight_bytes: the tensors the "
                      "compiled graphs read (tied embedding and lm_head once)",
            "quantize_seconds_whole_model": quantize_timings,
            "runtime_s": time.perf_counter() - started,
            "rows": rows,
        }

    quantize_timings: dict = {}
    for family, setting in jobs:
        label = _tuned_label(setting) if isinstance(setting, int) else setting.label  # AwqRow has one too
        print(f"== {label}", file=sys.stderr, flush=True)
        # Every setting compiles the same forward again: start from a clean Dynamo
        # cache, or the recompile limit would quietly run later settings eagerly.
        torch._dynamo.reset()
        try:
            if isinstance(setting, int):
                row = _evaluate_tuned(model, tokens, args, tune_calibration, setting)
            elif isinstance(setting, AwqRow):
                row = _evaluate_awq(model, tokens, args, calibration, tune_calibration, setting)
            elif isinstance(setting, GptqRow):
                row = quality.evaluate(model, tokens, GptqRow.SETTING, args.context_length, args.stride,
                                       calibration_text[: setting.tokens])
                row["setting"] = setting.label
            else:
                row = quality.evaluate(model, tokens, setting, args.context_length, args.stride, calibration)
        except Exception as error:  # noqa: BLE001 - one failed setting must not lose the table
            print(f"   failed: {type(error).__name__}: {error}", file=sys.stderr)
            rows.append({"setting": label, "family": family, "error": f"{type(error).__name__}: {error}"})
            continue
        row["family"] = family
        if family != "fp32" and rows and rows[0].get("family") == "fp32" and "perplexity" in rows[0]:
            row["vs_fp32"] = row["perplexity"] / rows[0]["perplexity"] - 1.0
        rows.append(row)
        out.write_text(json.dumps(record(False), indent=2))
        print(f"   perplexity {row['perplexity']:.3f}"
              + (f" ({row['vs_fp32']:+.2%} vs fp32)" if "vs_fp32" in row else "")
              + f" ({row['seconds']:.0f} s)", file=sys.stderr, flush=True)
    if args.only and {"defaults", "head"} & set(args.only):  # last: the rows matter more
        quantize_timings.update(_quantize_timings(model))
    runtime = time.perf_counter() - started
    out.write_text(json.dumps(record(True), indent=2))
    good = [r for r in rows if "error" not in r]
    print(f"\n{args.model} on {Path(args.text).name}: first {len(tokens)} of {total_tokens} tokens, "
          f"context {args.context_length}, stride {args.stride} (each token scored once)\n")
    print(quality.format_table(good))
    for row in rows:
        if "error" in row:
            print(f"\n{row['setting']}: {row['error']}")
    print(f"\nruntime {runtime / 60:.1f} min; JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
