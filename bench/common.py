"""What every benchmark record holds besides its figures: the machine and the versions."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
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
