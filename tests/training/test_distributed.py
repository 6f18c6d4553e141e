"""Data parallel: 2 CPU processes (torchrun, gloo) give the losses of one process with the combined batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from . import ddp_worker

HERE = Path(__file__).resolve().parent


def test_two_processes_equal_one_with_the_combined_batch(tmp_path):
    out = tmp_path / "ranks.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1])}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "0", "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0",
                          str(HERE / "ddp_worker.py"), str(out)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = json.loads(out.read_text())
    single = ddp_worker.run(micro_batch_size=4)  # each step: the 2 ranks' rows in one process
    assert ranks["losses"] == pytest.approx(single["losses"], rel=1e-10)
    assert ranks["eval"] == pytest.approx(single["eval"], rel=1e-10)
    assert ranks["checksum"] == pytest.approx(single["checksum"], rel=1e-10)
