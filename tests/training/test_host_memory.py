"""``keep_cpu_memory``: freed CPU memory stays in the process, so a step's large
buffers stop page-faulting fresh pages in every step. Measured in child processes
(the setting is process-wide), against the same allocation pattern without it."""

import json
import platform
import subprocess
import sys

import pytest

from llmopt.training import TrainConfig

_CHILD = r"""
import json, resource, sys, torch
if sys.argv[1] == "keep":
    from llmopt.training.memory import keep_freed_cpu_memory
    applied = keep_freed_cpu_memory()
else:
    applied = False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):  # warm-up rounds: the heap grows to its size once, either way
    x = torch.empty(25_000_000); x.fill_(1.0); del x
before = faults()
for _ in range(4):
    x = torch.empty(25_000_000); x.fill_(1.0); del x  # 100 MB, like a step's logits
print(json.dumps({"applied": applied, "faults_per_round": (faults() - before) / 4}))
"""

glibc_linux = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                 reason="the setting applies to glibc's malloc only")


def _child(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_linux
def test_kept_memory_stops_page_faults_of_a_reused_large_buffer():
    plain, kept = _child("plain"), _child("keep")
    assert kept["applied"] and not plain["applied"]
    pages = 100e6 / 4096
    # Without the setting each 100 MB block is mmapped afresh: every page faults again.
    assert plain["faults_per_round"] > 0.9 * pages, plain
    # With it the block comes back from the heap already mapped.
    assert kept["faults_per_round"] < 0.05 * pages, kept


def test_keep_cpu_memory_is_on_by_default_and_can_be_turned_off():
    assert TrainConfig().keep_cpu_memory is True
    assert TrainConfig(keep_cpu_memory=False).keep_cpu_memory is False
