"""Run a function in N local processes joined by a process group, with a deadline.

``run_ranks(fn, size, *args)`` spawns ``size`` processes (torch.multiprocessing,
``spawn``: a fresh interpreter each, so no OpenMP pool is forked), each calls
``fn(rank, size, *args)`` inside ``init_process_group(backend)`` (gloo by
default) on a free port of 127.0.0.1 and returns a picklable value; the parent
gets the values in rank order. A rank that raises fails the call with its
traceback; past ``timeout`` every rank is killed and joined (no orphans), and
the call fails. ``fn`` must be importable by name (a module-level function).
Used by the tests and ``bench/tp.py``; each rank runs ``threads`` intra-op
threads (1 by default: the ranks share the machine's cores).
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback

import torch.multiprocessing as mp

__all__ = ["RankFailed", "free_port", "run_ranks"]


class RankFailed(RuntimeError):
    """A rank raised; the message holds every failed rank's traceback."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, size: int, port: int, out_dir: str, args: tuple, backend: str, threads: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        value = ("ok", fn(rank, size, *args))
    except BaseException:  # noqa: BLE001 - hand the traceback to the parent
        value = ("error", traceback.format_exc())
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(value, f)
    if value[0] == "ok":
        dist.barrier()  # a rank that failed may leave peers in a collective: the parent's deadline ends them
    dist.destroy_process_group()


def run_ranks(fn, size: int, *args, timeout: float = 120.0, backend: str = "gloo", threads: int = 1) -> list:
    with tempfile.TemporaryDirectory(prefix="llmopt-tp-") as out_dir:
        context = mp.start_processes(_entry, args=(fn, size, free_port(), out_dir, args, backend, threads),
                                     nprocs=size,
                                     join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=0.5):
                errors = _errors(out_dir, size)
                if errors:
                    raise RankFailed("rank failed:\n" + "\n".join(errors))
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{size} ranks still running after {timeout:.0f} s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                process.join(5)
        errors = _errors(out_dir, size)
        if errors:
            raise RankFailed("rank failed:\n" + "\n".join(errors))
        values = []
        for rank in range(size):
            with open(os.path.join(out_dir, f"{rank}.pkl"), "rb") as f:
                values.append(pickle.load(f)[1])
        return values


def _errors(out_dir: str, size: int) -> list[str]:
    found = []
    for rank in range(size):
        path = os.path.join(out_dir, f"{rank}.pkl")
        if os.path.exists(path):
            try:
                with open(path, "rb") as f:
                    status, value = pickle.load(f)
            except (EOFError, pickle.UnpicklingError):
                continue  # being written
            if status == "error":
                found.append(f"rank {rank}: {value}")
    return found
