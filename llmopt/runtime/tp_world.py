"""The ranks of a tensor-parallel engine: start them, or join the ones torchrun started.

``LLM(model, tensor_parallel_size=N)`` needs N processes in one
``torch.distributed`` group. Two ways in:

* **one process started by the user** (no ``WORLD_SIZE`` in the environment):
  it becomes rank 0 and spawns ranks 1..N-1 itself (``spawn``: fresh
  interpreters, no forked OpenMP pool), joined over a free port of
  127.0.0.1 (gloo on CPU, NCCL on CUDA, rank r on ``cuda:r``);
* **under torchrun** (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR`` set, any
  number of nodes): every process runs the same command, joins with
  ``init_method="env://"``; rank 0 serves, the others become workers
  (``LOCAL_RANK`` picks the GPU).

No orphans: a spawned worker polls its parent's pid (``os.getppid()``) every
0.2 s from a daemon thread and exits when rank 0 is gone, however it went
(``kill -9`` too: the kernel re-parents the worker and the poll sees it). A
poll and not ``PR_SET_PDEATHSIG``: that signal fires when the *thread* that
started the worker exits, which would kill the workers of an ``LLM`` built in
a short-lived thread. Under torchrun the elastic agent owns the processes
(it ends a node's workers when a peer fails), and a worker whose rank 0
closes the connection gets an error from its broadcast and exits.

Threads: N processes share the machine's cores, so each sets
``torch.set_num_threads(cores // local ranks)`` (``cores`` = the CPUs this
process may run on, ``os.sched_getaffinity``), rank 0 included; an explicit
``OMP_NUM_THREADS`` wins. torchrun sets ``OMP_NUM_THREADS=1`` itself when it
starts more than one process per node and the variable is unset, so there
each rank runs one thread unless the user sets it; with
``--nproc-per-node 1`` torchrun sets nothing and the rank gets every core.

The control group: the step broadcasts travel over their own gloo group whose
timeout is a week (a served engine can sit idle for hours and the workers
wait in that broadcast all the while); the model's collectives use the
default group with PyTorch's default timeout.
"""

from __future__ import annotations

import datetime
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["TensorParallelWorld", "launched_by_torchrun", "start_or_join", "threads_per_rank"]

CONTROL_TIMEOUT = datetime.timedelta(days=7)
PARENT_POLL_S = 0.2


@dataclass
class TensorParallelWorld:
    """This process's place among the ranks."""

    rank: int
    size: int
    device: torch.device
    control: Any  # the gloo group the step broadcasts use
    launcher: str  # "spawn" (rank 0 started the workers) or "torchrun"
    workers: list = field(default_factory=list)  # rank 0 with "spawn": the worker processes

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.workers]


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def threads_per_rank(local_ranks: int) -> int:
    """Intra-op threads for one of ``local_ranks`` processes on this machine (see the module docstring)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // local_ranks)


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _rank_device(device: torch.device, local_rank: int) -> torch.device:
    if device.type != "cuda":
        return device
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_or_join(size: int, device: torch.device, worker_main, worker_args: tuple) -> TensorParallelWorld:
    """Rank 0's world (after starting the workers, or joining torchrun's), or, on a worker rank
    under torchrun, the world that rank then serves (``rank != 0``).

    ``worker_main``: a spawned worker's entry point (``tp_worker.spawned_worker_main``), called
    with ``(rank, size, port, parent pid, threads, device, *worker_args)``.
    """
    import torch.distributed as dist

    from llmopt.errors import LLMOptConfigError

    if dist.is_initialized():
        raise LLMOptConfigError("tensor_parallel_size > 1: a torch.distributed process group is already "
                                "initialised in this process; the engine starts or joins its own")
    if launched_by_torchrun():
        world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        if world_size != size:
            raise LLMOptConfigError(f"tensor_parallel_size {size} differs from torchrun's WORLD_SIZE {world_size} "
                                    "(nnodes x nproc-per-node); launch as many processes as the size")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.set_num_threads(threads_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
        device = _rank_device(device, local_rank)
        dist.init_process_group(_backend(device), init_method="env://", rank=rank, world_size=size)
        return TensorParallelWorld(rank, size, device, _new_control_group(), "torchrun")
    import torch.multiprocessing as mp

    port = _free_port()
    threads = threads_per_rank(size)
    context = mp.get_context("spawn")
    workers = []
    for rank in range(1, size):
        process = context.Process(target=worker_main, name=f"llmopt-tp-rank-{rank}",
                                  args=(rank, size, port, os.getpid(), threads, device, *worker_args))
        process.start()
        workers.append(process)
    torch.set_num_threads(threads)
    device = _rank_device(device, 0)
    try:
        dist.init_process_group(_backend(device), init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=size)
        control = _new_control_group()
    except BaseException:
        for process in workers:
            process.kill()
            process.join(5)
        raise
    return TensorParallelWorld(0, size, device, control, "spawn", workers)


def join_as_spawned_worker(rank: int, size: int, port: int, parent_pid: int, threads: int,
                           device: torch.device) -> TensorParallelWorld:
    """A spawned worker's world: watch the parent, set the threads, join rank 0's group."""
    import torch.distributed as dist

    _exit_with_parent(parent_pid)
    torch.set_num_threads(threads)
    device = _rank_device(device, rank)
    dist.init_process_group(_backend(device), init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    return TensorParallelWorld(rank, size, device, _new_control_group(), "spawn")


def _new_control_group():
    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


def _exit_with_parent(parent_pid: int) -> None:
    """End this process (at once, whatever it is doing) when ``parent_pid`` is no longer its parent."""
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="llmopt-tp-parent-watch", daemon=True).start()
