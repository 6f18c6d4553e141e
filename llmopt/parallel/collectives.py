"""Which process group the sharding pass uses, and the collectives it puts in graphs.

The pass inserts torch.distributed's *functional* collectives
(``torch.ops._c10d_functional.all_reduce`` / ``all_gather_into_tensor``, each
followed by ``wait_tensor``): they are ordinary ops with fake kernels, so
Dynamo's graph stays a graph, eager lowering runs them as calls, and Inductor
compiles them (it schedules the wait as late as it can).

Reduction dtype: gloo (CPU) has historically had no bf16/fp16 all-reduce and
sums low-precision partials in their own dtype where it has one; on gloo the
pass therefore reduces bf16/fp16 tensors in fp32 (cast, reduce, cast back), so
the sum of N partial products rounds once. NCCL (CUDA) reduces in the tensor's
dtype, as vLLM and gpt-fast do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["World", "world", "reduce_dtype"]

LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class World:
    """The default process group as the pass sees it when it compiles a graph."""

    rank: int
    size: int
    group_name: str
    backend: str


def world(size: int) -> World:
    """The initialised default group, checked against ``tensor_parallel.size``."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"tensor_parallel size {size} needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group(...) in every rank, e.g. under torchrun) "
            "before the model is compiled")
    ranks = dist.get_world_size()
    if ranks != size:
        raise RuntimeError(
            f"tensor_parallel size {size} differs from the process group's world size {ranks}; "
            "set the size to the number of ranks")
    group = dist.group.WORLD
    return World(dist.get_rank(), ranks, group.group_name, str(dist.get_backend(group)))


def reduce_dtype(dtype: torch.dtype, backend: str) -> torch.dtype:
    """The dtype a tensor of ``dtype`` is reduced in on ``backend`` (fp32 for bf16/fp16 on gloo)."""
    return torch.float32 if backend == "gloo" and dtype in LOW_PRECISION else dtype
