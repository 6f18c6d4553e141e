"""CPU attention speed: llmopt::attention against F.scaled_dot_product_attention, same run.

The GPU benchmark (bench/attention.py) measures the Triton kernels; this one
measures the CPU implementation the backend uses where there is no GPU.
Peers per shape: SDPA given the shared KV heads (``enable_gqa=True``) and
SDPA given KV heads repeated in memory (what Hugging Face's attention code
does before calling SDPA). Forward and forward+backward, median of repeats.

    python bench/attention_cpu.py [--quick] [--dtype float32 bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llmopt.kernels.attention  # noqa: E402,F401  (registers llmopt::attention)

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="two lengths, one dtype")
    p.add_argument("--seqlens", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def shapes(seqlens):
    # (label, batch, Hq, Hkv, D): MHA at two head dims, and SmolLM2's GQA layout.
    for length in seqlens:
        yield ("mha-d64", 1, 8, 8, 64, length)
        yield ("mha-d128", 1, 8, 8, 128, length)
        yield ("gqa-9/3-d64", 1, 9, 3, 64, length)


def median_seconds(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_case(label, batch, hq, hkv, d, length, dtype, repeats, causal):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, hq, length, d, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(batch, hkv, length, d, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(batch, hkv, length, d, generator=gen).to(dtype).requires_grad_()
    group = hq // hkv

    def ours():
        return torch.ops.llmopt.attention(q, k, v, None, 0 if causal else None, None)[0]

    def sdpa_gqa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=group > 1)

    def sdpa_repeated():
        kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        return F.scaled_dot_product_attention(q, kr, vr, is_causal=causal)

    peers = {"llmopt": ours, "sdpa(enable_gqa)": sdpa_gqa}
    if group > 1:
        peers["sdpa(repeated kv)"] = sdpa_repeated
    want = sdpa_repeated().float()
    record = {"shape": label, "batch": batch, "hq": hq, "hkv": hkv, "d": d, "len": length,
              "dtype": str(dtype).replace("torch.", ""), "causal": causal}
    record["max_abs_diff_vs_sdpa"] = float((ours().float() - want).abs().max())
    grad = torch.randn_like(want).to(dtype)
    for name, fn in peers.items():
        with torch.no_grad():
            record[f"{name} fwd ms"] = 1e3 * median_seconds(fn, repeats)
        record[f"{name} fwd+bwd ms"] = 1e3 * median_seconds(
            lambda fn=fn: torch.autograd.grad(fn(), (q, k, v), grad), max(3, repeats // 2))
    return record


def main(argv=None) -> int:
    args = parse_args(argv)
    seqlens = [256, 1024] if args.quick else args.seqlens
    dtypes = [getattr(torch, d) for d in (["float32"] if args.quick else args.dtype)]
    results = []
    for dtype in dtypes:
        for causal in (True, False):
            for label, b, hq, hkv, d, length in shapes(seqlens):
                rec = run_case(label, b, hq, hkv, d, length, dtype, args.repeats, causal)
                results.append(rec)
                print(format_row(rec), flush=True)
    record = {
        "benchmark": "attention_cpu",
        "time": datetime.now().isoformat(timespec="seconds"),
        "machine": {"hostname": socket.gethostname(), "processor": _cpu_model(), "cores": os.cpu_count(),
                    "threads": torch.get_num_threads(), "platform": platform.platform()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "settings": {"seqlens": seqlens, "dtypes": [str(d) for d in dtypes], "repeats": args.repeats},
        "results": results,
    }
    out = Path(args.out) if args.out else RESULTS / f"attention_cpu-{socket.gethostname()}-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"\nwrote {out}")
    return 0


def format_row(rec):
    ours_f, ours_b = rec["llmopt fwd ms"], rec["llmopt fwd+bwd ms"]
    sdpa_f, sdpa_b = rec["sdpa(enable_gqa) fwd ms"], rec["sdpa(enable_gqa) fwd+bwd ms"]
    row = (f"{rec['dtype']:>8} {'causal' if rec['causal'] else 'full':>6} {rec['shape']:>12} L={rec['len']:<5} "
           f"fwd {ours_f:8.2f} ms vs sdpa {sdpa_f:8.2f} ({sdpa_f / ours_f:4.2f}x)  "
           f"fwd+bwd {ours_b:8.2f} vs {sdpa_b:8.2f} ({sdpa_b / ours_b:4.2f}x)")
    if "sdpa(repeated kv) fwd ms" in rec:
        rf, rb = rec["sdpa(repeated kv) fwd ms"], rec["sdpa(repeated kv) fwd+bwd ms"]
        row += f"  | repeated-kv sdpa: fwd {rf / ours_f:4.2f}x fwd+bwd {rb / ours_b:4.2f}x"
    return row + f"  maxdiff {rec['max_abs_diff_vs_sdpa']:.1e}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
