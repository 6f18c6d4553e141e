"""What every benchmark record holds besides its figures: the machine and the versions."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import statistics
import time
from datetime import datetime
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine(load_start=None) -> dict:
    cpu_model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    info = {
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        # Other work on the machine skews CPU timings; this shows if there was any.
        "load_average_start": list(load_start) if load_start else None,
        "load_average_end": list(os.getloadavg()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def versions() -> dict:
    import transformers

    import llmopt

    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "llmopt": llmopt.__version__,
    }
    with contextlib.suppress(ImportError):
        import triton

        found["triton"] = triton.__version__
    return found


def write_record(name: str, record: dict, out: str | None = None) -> Path:
    """Write ``record`` as JSON to ``out`` or bench/results/<name>-<host>-<time>.json."""
    if out is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = RESULTS_DIR / f"{name}-{socket.gethostname()}-{stamp}.json"
    else:
        path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def decode_workload_parser(description: str, prompt: str, settings, record_name: str,
                           threads_help: str = "torch threads (default: all cores)") -> argparse.ArgumentParser:
    """The options bench/decode.py and bench/onnx.py share: one chat prompt, greedy
    batch-1 decode of a fixed number of tokens, repeated, over named settings."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="smollm2", help="model name or local path (default smollm2)")
    parser.add_argument("--prompt", default=prompt, help="user message (chat-templated)")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per run (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (default 3)")
    parser.add_argument("--settings", nargs="+", choices=settings, default=list(settings),
                        help="which settings to run (default all)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help=threads_help)
    parser.add_argument("--out", help=f"JSON file to write (default bench/results/{record_name}-<host>-<time>.json)")
    return parser


def check_decode_workload(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    if args.max_tokens < 2 or args.repeats < 1:
        parser.error("--max-tokens must be >= 2 and --repeats >= 1")
    return args


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None when matplotlib is missing
    (a benchmark then writes its record without the plot)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def read_bandwidth_limit(nbytes: int, repeats: int = 7) -> dict:
    """The fastest read of an fp32 buffer of ``nbytes`` (one sum over it, all torch threads)."""
    buffer = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
    buffer.sum()  # first touch: page faults are not part of a read
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        times.append(time.perf_counter() - start)
    best = min(times)
    return {"bytes": nbytes, "read_s_best": best, "read_s_median": statistics.median(times),
            "gb_per_s": nbytes / best / 1e9, "fp32_tokens_per_s_limit": 1 / best}
