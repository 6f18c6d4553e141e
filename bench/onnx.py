"""Batch-1 greedy decode speed: the model exported by llmopt, run in ONNX Runtime,
against llmopt in PyTorch, in one run on the same machine.

Settings (all on the same loaded model, SmolLM2-135M fp32 by default):
  llmopt              torch.compile(model, backend="llmopt") (lower=inductor), llmopt's
                      generation loop (transformers StaticCache)
  llmopt-int4         the same with options={"quantize": "int4", "group_size": 32} (on CPU llmopt
                      runs fp32 models' int4 layers with bf16 activations)
  llmopt-int4-fp32    llmopt-int4 with kernels={"quant_cpu_dtype": "float32"}: fp32 activations, the
                      arithmetic the exported int4 model (accuracy_level 0) does
  onnxruntime         llmopt.export_onnx(model) run by onnxruntime (CPU execution
                      provider; CUDA where onnxruntime has it), llmopt.onnx.OnnxCausalLM
  onnxruntime-noopt   the same, exported with optimize=False (no onnxscript optimizer)
  onnxruntime-nospin  the same, onnxruntime's threads not spinning while they wait
                      (its default spins: best on an idle machine, not on a busy one)
  onnxruntime-int4    export with the int4 options (MatMulNBits, accuracy_level 0: fp32 math)
  onnxruntime-int4-acc4  int4 with accuracy_level 4 (onnxruntime quantizes activations to int8)

Every setting generates exactly --max-tokens tokens (end tokens ignored); the
record says whether each produced the same tokens as the llmopt setting of
the same weights (fp32 or int4). Warm-up is compile time for llmopt and export
plus session creation for onnxruntime.

    python bench/onnx.py [--max-tokens 128] [--repeats 3] [--settings llmopt onnxruntime]
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import torch

_BENCH = Path(__file__).resolve().parent
# This file is onnx.py: with its folder on sys.path, `import onnx` (in onnxscript,
# torch.onnx) would find it instead of the onnx package. So the folder comes off
# the path and common.py is loaded from its file.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
_spec = importlib.util.spec_from_file_location("bench_common", _BENCH / "common.py")
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)
machine, versions, write_record = _common.machine, _common.versions, _common.write_record
decode_workload_parser, check_decode_workload = _common.decode_workload_parser, _common.check_decode_workload

PROMPT = "Write a short story about a robot who learns to paint."
INT4 = {"quantize": "int4", "group_size": 32}
SETTINGS = ("llmopt", "llmopt-int4", "llmopt-int4-fp32", "onnxruntime", "onnxruntime-noopt", "onnxruntime-nospin", "onnxruntime-int4",
            "onnxruntime-int4-acc4")
# setting -> (export options, export keywords); the llmopt settings compile instead.
_EXPORTS = {
    "onnxruntime": ({}, {}),
    "onnxruntime-noopt": ({}, {"optimize": False}),
    "onnxruntime-nospin": ({}, {}),
    "onnxruntime-int4": (INT4, {}),
    "onnxruntime-int4-acc4": (INT4, {"accuracy_level": 4}),
}
# setting -> (llmopt setting with the same arithmetic: tokens, llmopt setting to compare speed with)
_REFERENCE = {"onnxruntime": ("llmopt", "llmopt"), "onnxruntime-noopt": ("llmopt", "llmopt"),
              "onnxruntime-nospin": ("llmopt", "llmopt"), "onnxruntime-int4": ("llmopt-int4-fp32", "llmopt-int4"),
              "onnxruntime-int4-acc4": ("llmopt-int4-fp32", "llmopt-int4")}


@dataclass
class SettingResult:
    setting: str
    warmup_s: float  # llmopt: compile (first calls); onnxruntime: export + session creation
    prefill_s: float  # median over repeats
    decode_tokens_per_s: float  # median over repeats
    best_decode_tokens_per_s: float  # the repeat least slowed by other work on the machine
    new_tokens: int
    runs: list = field(default_factory=list)
    same_tokens_as: str | None = None  # the llmopt setting of the same arithmetic
    same_tokens: bool | None = None
    speed_vs: str | None = None  # the llmopt setting of the same weights the speed is compared with
    vs_llmopt: float | None = None  # decode tokens/s over that setting's
    providers: list | None = None
    tokens: list = field(default_factory=list)


def main(argv=None) -> int:
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    from llmopt.models import load

    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    model, tokenizer = load(args.model)
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                               add_generation_prompt=True, return_tensors="pt")["input_ids"]
    load_start = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for setting in args.settings:
            print(f"running {setting} ...", file=sys.stderr, flush=True)
            torch._dynamo.reset()
            run = _run_llmopt if setting.startswith("llmopt") else _run_onnxruntime
            result = run(setting, model, prompt_ids, args, Path(folder))
            print(f"  {setting}: warm-up {result.warmup_s:.1f} s, prefill {result.prefill_s:.3f} s, "
                  f"{result.decode_tokens_per_s:.1f} tokens/s", file=sys.stderr, flush=True)
            results.append(result)
    _compare(results)
    record = {
        "benchmark": "onnx",
        "time": datetime.now().isoformat(timespec="seconds"),
        "machine": machine(load_start),
        "versions": {**versions(), **_onnx_versions()},
        "config": {"model": args.model, "dtype": "float32", "batch_size": 1, "prompt": args.prompt,
                   "prompt_tokens": int(prompt_ids.shape[1]), "max_tokens": args.max_tokens,
                   "repeats": args.repeats, "torch_threads": args.threads, "onnxruntime_threads": args.threads},
        "results": [asdict(r) for r in results],
    }
    out = write_record("onnx", record, args.out)
    print(_table(results, record))
    print(f"wrote {out}")
    return 0


def _run_llmopt(setting, model, prompt_ids, args, folder) -> SettingResult:
    from llmopt.runtime.generate import generate, warm_up

    options = INT4 if setting.startswith("llmopt-int4") else {}
    if setting == "llmopt-int4-fp32":
        options = {**options, "kernels": {"quant_cpu_dtype": "float32"}}
    runner = torch.compile(model, backend="llmopt", options={"lower": "inductor", **options})
    warmup_s = warm_up(runner, prompt_ids, args.max_tokens)

    def once():
        tokens, stats = generate(runner, None, prompt_ids, args.max_tokens, eos_token_ids=())
        return tokens, stats.prefill_s, stats.decode_tokens_per_s

    return _timed(setting, warmup_s, args.repeats, once)


def _run_onnxruntime(setting, model, prompt_ids, args, folder) -> SettingResult:
    import llmopt
    from llmopt.onnx.runtime import GreedyStats, OnnxCausalLM

    options, keywords = _EXPORTS[setting]
    start = time.perf_counter()
    exported = llmopt.export_onnx(model, folder / f"{setting}.onnx", options=options, **keywords)
    session = OnnxCausalLM(exported.path, threads=args.threads, spin=setting != "onnxruntime-nospin")
    session.generate_greedy(prompt_ids[0].tolist(), 4)  # first runs allocate and tune
    warmup_s = time.perf_counter() - start

    def once():
        stats = GreedyStats()
        tokens = session.generate_greedy(prompt_ids[0].tolist(), args.max_tokens, stats=stats)
        return tokens, stats.prefill_s, stats.decode_tokens_per_s

    result = _timed(setting, warmup_s, args.repeats, once)
    result.providers = session.session.get_providers()
    return result


def _timed(setting, warmup_s, repeats, once) -> SettingResult:
    runs, tokens = [], []
    for _ in range(repeats):
        tokens, prefill_s, decode_tps = once()
        runs.append({"prefill_s": prefill_s, "decode_tokens_per_s": decode_tps})
    return SettingResult(
        setting=setting, warmup_s=warmup_s,
        prefill_s=statistics.median(r["prefill_s"] for r in runs),
        decode_tokens_per_s=statistics.median(r["decode_tokens_per_s"] for r in runs),
        best_decode_tokens_per_s=max(r["decode_tokens_per_s"] for r in runs),
        new_tokens=len(tokens), runs=runs, tokens=tokens)


def _compare(results) -> None:
    by_name = {r.setting: r for r in results}
    for r in results:
        tokens_of, speed_of = (by_name.get(name) for name in _REFERENCE.get(r.setting, (None, None)))
        if tokens_of is not None:
            r.same_tokens_as, r.same_tokens = tokens_of.setting, r.tokens == tokens_of.tokens
        if speed_of is not None:
            r.speed_vs, r.vs_llmopt = speed_of.setting, r.decode_tokens_per_s / speed_of.decode_tokens_per_s


def _onnx_versions() -> dict:
    import onnx
    import onnxruntime
    import onnxscript

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "onnxscript": onnxscript.__version__}


def _table(results, record) -> str:
    machine, config = record["machine"], record["config"]
    lines = [
        f"onnx benchmark: {config['model']} fp32 weights, batch 1, {config['prompt_tokens']} prompt tokens, "
        f"{config['max_tokens']} new tokens, median (and best) of {config['repeats']} runs",
        f"machine: {machine['cpu_model']}, {machine['cores']} cores, {config['torch_threads']} threads, "
        f"load average {machine['load_average_start'][0]:.1f} -> {machine['load_average_end'][0]:.1f}",
        "",
        f"{'setting':<23}{'warm-up s':>10}{'prefill s':>11}{'decode tok/s':>14}{'best':>8}"
        f"  {'speed vs llmopt':<27}same tokens as",
    ]
    for r in results:
        ratio = "-" if r.vs_llmopt is None else f"{r.vs_llmopt:.2f}x ({r.speed_vs})"
        same = "-" if r.same_tokens is None else f"{r.same_tokens_as}: {'yes' if r.same_tokens else 'NO'}"
        lines.append(f"{r.setting:<23}{r.warmup_s:>10.1f}{r.prefill_s:>11.3f}{r.decode_tokens_per_s:>14.1f}"
                     f"{r.best_decode_tokens_per_s:>8.1f}  {ratio:<27}{same}")
    return "\n".join(lines)


def _parse_args(argv):
    parser = decode_workload_parser(
        __doc__.split("\n")[0], PROMPT, SETTINGS, "onnx",
        threads_help="torch and onnxruntime intra-op threads (default: all cores; on a busy "
                     "machine 1 avoids threads waiting on each other)")
    return check_decode_workload(parser, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
