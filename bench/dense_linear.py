"""fp32 few-row linear layers on CPU: llmopt::dense_linear's C kernel against F.linear (MKL).

Both blockings of the kernel are timed ("narrow": 4 weight rows at a time with
software prefetch; "wide": 16 (AVX-512) or 12 (AVX2) rows, no prefetch); "native"
is the one ``default_blocking()`` picks on this CPU, which the speedup is of.

SmolLM2-135M's linear shapes (q/o 576x576, k/v 192x576, gate/up 1536x576, down
576x1536, the tied head 49152x576) at 1, 2, 4, 8 and 16 rows: the time per call
(median of repeats, each over a set of weight copies that together exceed the
last-level cache, so every call reads its weight from memory as a decode step
does), the weight bytes read per second, and the ratio. The read limit beside it
is the fastest sum over one fp32 buffer the size of those weight copies. The
crossovers (rows where F.linear becomes the faster) are what ``default_min_rows()``
and ``DEFAULT_NATIVE_ROWS`` in ``llmopt/kernels/dense_linear.py`` follow.

    flock /tmp/bench.lock python bench/dense_linear.py [--threads 2] [--rows 1 2 4 8 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, read_bandwidth_limit, versions, write_record  # noqa: E402

SHAPES = {"q_proj/o_proj": (576, 576), "k_proj/v_proj": (192, 576), "gate/up_proj": (1536, 576),
          "down_proj": (576, 1536), "lm_head": (49152, 576)}


def _copies(n: int, k: int, total_bytes: int) -> list[torch.Tensor]:
    count = max(2, -(-total_bytes // (n * k * 4)))
    return [torch.randn(n, k) for _ in range(count)]


def _time(fn, weights, x, repeats: int) -> float:
    for w in weights[:2]:
        fn(x, w)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for w in weights:
            fn(x, w)
        runs.append((time.perf_counter() - start) / len(weights))
    return statistics.median(runs)


def _calls_per_step(layer: str) -> int:
    """How often a SmolLM2 decode step makes a call of this shape: 30 layers, two
    projections for the paired names, one head."""
    return 1 if layer == "lm_head" else 30 * (2 if "/" in layer else 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--megabytes", type=int, default=1024,
                        help="weight copies per shape, in MB (more than the last-level cache)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from llmopt.kernels import dense_linear as dl

    if not dl.native_dense_available():
        print("the C kernel does not build here: nothing to compare")
        return 1
    blocking = dl.default_blocking()
    kernels = {name: (lambda x, w, name=name: dl.native_dense_linear(x, w, name)) for name in dl.BLOCKINGS}
    load_start = os.getloadavg()
    total = args.megabytes * 2**20
    limit = read_bandwidth_limit(total)["gb_per_s"] * 1e9
    print(f"read limit: {limit / 1e9:.1f} GB/s (sum over {args.megabytes} MB, {torch.get_num_threads()} threads)")
    rows_out = []
    print(f"default blocking on this CPU: {blocking}")
    print(f"{'layer':<14} {'N x K':>11} {'rows':>4} {'F.linear us':>11} {'GB/s':>6} {'narrow us':>9} {'GB/s':>6} "
          f"{'wide us':>9} {'GB/s':>6} {'speedup':>7}")
    for name, (n, k) in SHAPES.items():
        weights = _copies(n, k, total)
        for m in args.rows:
            x = torch.randn(m, k)
            for fn in kernels.values():
                torch.testing.assert_close(fn(x, weights[0]), F.linear(x, weights[0]), atol=1e-3, rtol=1e-4)
            torch_s = _time(F.linear, weights, x, args.repeats)
            kernel_s = {name: _time(fn, weights, x, args.repeats) for name, fn in kernels.items()}
            native_s = kernel_s[blocking]
            nbytes = n * k * 4
            row = {"layer": name, "n": n, "k": k, "rows": m, "torch_us": torch_s * 1e6, "native_us": native_s * 1e6,
                   "torch_gb_s": nbytes / torch_s / 1e9, "native_gb_s": nbytes / native_s / 1e9,
                   "speedup": torch_s / native_s, "blocking": blocking}
            for kernel, seconds in kernel_s.items():
                row[f"{kernel}_us"], row[f"{kernel}_gb_s"] = seconds * 1e6, nbytes / seconds / 1e9
            rows_out.append(row)
            print(f"{name:<14} {f'{n}x{k}':>11} {m:>4} {row['torch_us']:>11.1f} {row['torch_gb_s']:>6.1f} "
                  f"{row['narrow_us']:>9.1f} {row['narrow_gb_s']:>6.1f} {row['wide_us']:>9.1f} {row['wide_gb_s']:>6.1f} "
                  f"{row['speedup']:>6.2f}x", flush=True)
        del weights
    crossover = {}
    for m in args.rows:
        mine = [r for r in rows_out if r["rows"] == m]
        totals = {key: sum(r[f"{key}_us"] * _calls_per_step(r["layer"]) for r in mine) / 1e3
                  for key in ("torch", "native", *dl.BLOCKINGS)}
        crossover[m] = {f"{key}_ms_per_step": value for key, value in totals.items()}
        print(f"SmolLM2 linears of one step at {m} rows: F.linear {totals['torch']:.1f} ms, narrow "
              f"{totals['narrow']:.1f} ms, wide {totals['wide']:.1f} ms; {blocking} (default) "
              f"{totals['torch'] / totals['native']:.2f}x F.linear")
    record = {"benchmark": "dense_linear", "machine": machine(load_start), "versions": versions(),
              "settings": {"megabytes": args.megabytes, "repeats": args.repeats, "rows": args.rows,
                           "default_native_rows": [dl.default_min_rows(), dl.DEFAULT_NATIVE_ROWS],
                           "default_blocking": blocking},
              "read_limit_gb_s": limit / 1e9, "rows": rows_out, "smollm2_step": crossover}
    path = write_record("dense_linear", record, args.out)
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
