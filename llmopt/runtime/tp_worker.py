"""The engine across processes: rank 0 schedules, every rank runs the sharded paged forward.

Rank 0 is the ordinary engine whose model runner is a
:class:`TensorParallelRunner`: before each forward (the profile step, every
scheduler step, every drafter step) it broadcasts the step's inputs and paged
metadata to the other ranks, then runs the forward itself. Each worker holds
its own copy of the model, compiled with the same options plus
``tensor_parallel={"size": N}`` (the sharding pass keeps the rank's shards,
the paging pass gives it a cache of its KV heads), and loops: receive a step,
run the same compiled forward, whose all-reduces meet rank 0's. Only rank 0
computes logits (the engine's ``lm_head`` runs outside the compiled graph on
the sampled rows, replicated): a worker's forward stops at the hidden states.

One step on the wire (the control group, gloo, CPU tensors even when the model
runs on CUDA), two broadcasts from rank 0:

* a header of ``HEADER_LEN`` int64: command (``STEP`` or ``STOP``), tokens T,
  sequences N, block-table width W, max query length, max sequence length,
  the block count of a new KV cache (0: the cache is the one sent last), the
  payload's length, the number M of attention masks, and the dtypes of the
  four metadata tensors;
* the payload, int64: token ids (T), positions (T), slot mapping (T), block
  tables (N x W), sequence lengths (N), query start offsets (N + 1), then per
  mask (a sequence whose new tokens attend as a tree, ``PagedStep.append_masks``):
  its sequence index, its size q and the q x q mask.

Rank 0 replaces its cache object when it sizes the pool after profiling; the
header's block count makes each worker allocate the same pool then. A worker
whose model fails to load or run exits, and rank 0's next collective fails
with gloo's error; rank 0 going away ends the workers (``tp_world``).
"""

from __future__ import annotations

import atexit
import dataclasses
import sys
import traceback
from typing import Any

import torch
from torch import Tensor

from llmopt.runtime.model_runner import ModelRunner, RunnerOptions
from llmopt.runtime.paged_context import PagedStep
from llmopt.runtime.tp_world import TensorParallelWorld, join_as_spawned_worker, start_or_join

__all__ = ["TensorParallelRunner", "spawned_worker_main", "tensor_parallel_runner"]

STOP, STEP = 0, 1
HEADER_LEN = 13
_DTYPES = (torch.int32, torch.int64)
_NO_ROWS = torch.zeros(0, dtype=torch.long)


def tensor_parallel_runner(model: torch.nn.Module, options: RunnerOptions, size: int,
                           source: Any = None, dtype: torch.dtype = torch.float32) -> ModelRunner:
    """Rank 0's runner, after starting (or joining) the other ranks.

    ``source``: what a spawned worker loads (a model name or path, loaded in
    the worker with ``llmopt.models.load``); None sends it ``model`` instead
    (pickled through shared memory). Under torchrun every rank built its own
    ``model``; on a rank other than 0 this call serves rank 0 until it stops,
    then exits the process (``SystemExit(0)``).
    """
    options = dataclasses.replace(options, compile_options={**(options.compile_options or {}),
                                                            "tensor_parallel": size})
    world = start_or_join(size, options.device, spawned_worker_main, (model if source is None else source, dtype, options))
    options = dataclasses.replace(options, device=world.device)
    if world.rank != 0:
        _serve(model.to(world.device), options, world)
        raise SystemExit(0)
    return TensorParallelRunner(model, options, world)


class TensorParallelRunner(ModelRunner):
    """Rank 0's model runner: each forward is broadcast to the workers first."""

    def __init__(self, model: torch.nn.Module, options: RunnerOptions, world: TensorParallelWorld):
        self.world = world
        self._sent_cache = None
        self._stopped = False
        super().__init__(model, options)
        atexit.register(self.shutdown)

    @property
    def worker_pids(self) -> list[int]:
        return self.world.worker_pids

    def profile(self, num_tokens: int = 8):
        """The first forward compiles on every rank; if it fails here (a head count the size does
        not split, no attention to page), the workers are stopped before the error propagates."""
        try:
            return super().profile(num_tokens)
        except BaseException:
            self.shutdown()
            raise

    def _run(self, token_ids: Tensor, positions: Tensor, step: PagedStep, logit_rows: Tensor) -> Tensor:
        if self._stopped:
            raise RuntimeError("the tensor-parallel engine was shut down")
        new_cache = 0 if self.kv_cache is self._sent_cache else self.kv_cache.num_blocks
        self._sent_cache = self.kv_cache
        _send(self.world.control, token_ids, positions, step, new_cache)
        return super()._run(token_ids, positions, step, logit_rows)

    def shutdown(self) -> None:
        """Stop the workers (they leave their loop and exit) and leave the process group."""
        import torch.distributed as dist

        if self._stopped:
            return
        self._stopped = True
        try:
            dist.broadcast(torch.zeros(HEADER_LEN, dtype=torch.long), 0, group=self.world.control)
        except Exception:  # noqa: BLE001 - a worker already gone: nothing to tell it
            pass
        for process in self.world.workers:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join(5)
        if dist.is_initialized():
            dist.destroy_process_group()
        atexit.unregister(self.shutdown)


def _send(control, token_ids: Tensor, positions: Tensor, step: PagedStep, new_cache: int) -> None:
    import torch.distributed as dist

    meta = (step.slot_mapping, step.block_tables, step.seq_lens, step.query_start_loc)
    num_seqs, width = step.block_tables.shape
    masks = getattr(step, "append_masks", None) or {}
    parts = [t.reshape(-1).to("cpu", torch.long) for t in (token_ids, positions, *meta)]
    for index, mask in masks.items():
        parts += [torch.tensor([index, mask.shape[0]]), mask.reshape(-1).to("cpu", torch.long)]
    payload = torch.cat(parts)
    header = torch.tensor([STEP, token_ids.numel(), num_seqs, width, step.max_query_len, step.max_seq_len,
                           new_cache, payload.numel(), len(masks), *(_DTYPES.index(t.dtype) for t in meta)],
                          dtype=torch.long)
    dist.broadcast(header, 0, group=control)
    dist.broadcast(payload, 0, group=control)


def _receive(control) -> tuple[Tensor, Tensor, PagedStep, int] | None:
    """The next step from rank 0, or None when it says stop."""
    import torch.distributed as dist

    header = torch.zeros(HEADER_LEN, dtype=torch.long)
    dist.broadcast(header, 0, group=control)
    command, tokens, num_seqs, width, max_query, max_seq, new_cache, length, num_masks, *codes = header.tolist()
    if command == STOP:
        return None
    payload = torch.zeros(length, dtype=torch.long)
    dist.broadcast(payload, 0, group=control)
    sizes = [tokens, tokens, tokens, num_seqs * width, num_seqs, num_seqs + 1]
    token_ids, positions, slots, tables, lens, starts = payload[:sum(sizes)].split(sizes)
    dtypes = [_DTYPES[c] for c in codes]
    step = PagedStep(slots.to(dtypes[0]), tables.reshape(num_seqs, width).to(dtypes[1]), lens.to(dtypes[2]),
                     starts.to(dtypes[3]), max_query, max_seq)
    if num_masks:
        step.append_masks = _masks(payload[sum(sizes):].tolist(), num_masks)
    return token_ids, positions, step, new_cache


def _masks(flat: list[int], count: int) -> dict[int, Tensor]:
    masks, at = {}, 0
    for _ in range(count):
        index, q = flat[at], flat[at + 1]
        masks[index] = torch.tensor(flat[at + 2:at + 2 + q * q], dtype=torch.bool).reshape(q, q)
        at += 2 + q * q
    return masks


class _WorkerRunner(ModelRunner):
    """A worker's runner: runs what rank 0 sends, keeps no logits."""

    def serve(self, control) -> None:
        released = False
        while (received := _receive(control)) is not None:
            token_ids, positions, step, new_cache = received
            if new_cache:
                self.allocate_kv_cache(new_cache)
            self._run(token_ids, positions, step, _NO_ROWS)
            if not released:  # after the first (compiling) forward
                released = True
                held, freed = release_sharded_weights(self.model)
                print(f"llmopt tensor-parallel rank {torch.distributed.get_rank()}: released {freed} bytes of "
                      f"full weights the shards replace; holds {held} bytes of weights and shards",
                      file=sys.stderr, flush=True)


def release_sharded_weights(model: torch.nn.Module) -> tuple[int, int]:
    """Free the storage of every parameter of ``model`` whose shards the compiled graphs read instead,
    so the rank holds its shards and the replicated weights only; returns (bytes held, bytes freed).

    The parameters keep their shape and strides (Dynamo's guards check metadata, not data); a
    recompile takes the shards the pass keeps per weight. A weight tied to another use (an embedding shared with
    ``lm_head``) is kept: the other use reads it whole.
    """
    from llmopt.passes.shard_tensor_parallel import sharded_weights

    uses: dict[int, int] = {}  # storage -> parameter slots reading it (2 for a tied embedding)
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[p.untyped_storage().data_ptr()] = uses.get(p.untyped_storage().data_ptr(), 0) + 1
    params = {p.untyped_storage().data_ptr(): p for p in model.parameters()}
    freed = shards = 0
    for weight, shard_bytes in sharded_weights():
        shards += shard_bytes
        storage = weight.untyped_storage()
        if uses.get(storage.data_ptr()) == 1 and storage.nbytes():
            freed += storage.nbytes()
            param = params[storage.data_ptr()]
            # The loaded storage may be memory-mapped or shared (not resizable): give the parameter
            # a fresh one of the same layout (untouched pages, never read), then empty that.
            param.data = torch.empty_strided(param.shape, param.stride(), dtype=param.dtype, device=param.device)
            param.untyped_storage().resize_(0)
    held = sum(p.untyped_storage().nbytes() for p in model.parameters()) + shards
    return held, freed


def _serve(model: torch.nn.Module, options: RunnerOptions, world: TensorParallelWorld) -> None:
    import torch.distributed as dist

    try:
        _WorkerRunner(model, options).serve(world.control)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawned_worker_main(rank: int, size: int, port: int, parent_pid: int, threads: int, device: torch.device,
                        model: Any, dtype: torch.dtype, options: RunnerOptions) -> None:
    """A worker process rank 0 started: join, load the model (or take the one sent), serve."""
    try:
        world = join_as_spawned_worker(rank, size, port, parent_pid, threads, device)
        if isinstance(model, str):
            from llmopt.models import load

            model = load(model, dtype=dtype).model
        model = model.to(device=world.device, dtype=dtype).eval()
        _serve(model, dataclasses.replace(options, device=world.device), world)
    except BaseException:  # noqa: BLE001 - report, then exit: rank 0's next collective fails
        print(f"llmopt tensor-parallel rank {rank} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        raise SystemExit(1)
