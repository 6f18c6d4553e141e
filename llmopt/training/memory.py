"""``micro_batch_size="auto"``: the largest micro-batch whose training step fits a memory budget.

Candidates are powers of two from 1 up to ``max_micro_batch_size`` (and no more
than the rows there are); each is measured with a batch of the longest rows of
the training data, a forward and backward on the model as it will train
(precision and recompute included), no optimizer step.

* CUDA: the peak allocated memory of that forward + backward (it includes the
  weights and gradients) plus the optimizer state (AdamW two fp32 tensors per
  parameter, Lion one) if not allocated yet. Budget: ``memory_budget_bytes``,
  default 90% of the device's total memory. Candidates are tried upwards until one
  does not fit (or raises out-of-memory).
* CPU: weights + gradients + optimizer state + the bytes saved for backward,
  counted with ``torch.autograd.graph.saved_tensors_hooks`` during the forward
  (distinct storages, parameters excluded), plus, with ``recompute`` on, the
  decoder layers' inputs that the checkpoints hold and, with ``"selective"``, the
  outputs its policy caches (counted by a dispatch mode: a checkpoint's own hooks
  hide them from the saved-tensor hooks). Measured eagerly at 1 and 2 rows and
  extrapolated linearly (the saved bytes grow linearly in the batch). Budget:
  ``memory_budget_bytes``, default 80% of the available memory (``MemAvailable``
  of /proc/meminfo). With a float budget the bytes are those of ``"none"`` (an
  upper bound: the partitioner's choice is only known once compiled).
"""

from __future__ import annotations

import contextlib

import torch

from llmopt.errors import LLMOptConfigError

__all__ = ["auto_micro_batch_size", "keep_freed_cpu_memory", "saved_activation_bytes", "state_bytes"]


_KEPT = False


def keep_freed_cpu_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process: no mmap for large blocks
    (``M_MMAP_MAX`` 0) and no trimming of the heap top (``M_TRIM_THRESHOLD`` at its
    maximum). Why: by default a block above the mmap threshold (128 KiB, raised as
    blocks are freed, to at most 32 MiB) is mmapped and unmapped again when freed, so a training step's largest buffers (a 512-token step's logits
    and their gradient, 100 MB each for a 49k vocabulary) are page-faulted in afresh
    every step; first touch then costs about as much as the kernel writing them.
    Process-wide and not undone (resident memory stays at its peak, as with a caching
    allocator). Returns whether it was applied: only on Linux with glibc; elsewhere
    (musl, macOS, Windows) nothing is changed."""
    global _KEPT
    if _KEPT:
        return True
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h> parameter numbers
    _KEPT = bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
    return _KEPT


def state_bytes(model: torch.nn.Module, optimizer: str) -> int:
    """Weights + gradients + optimizer state (fp32 moments: AdamW 2, Lion 1 per parameter)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    moments = 2 if optimizer == "adamw" else 1
    return weights + trainable + moments * sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)


@contextlib.contextmanager
def _count_saved(model: torch.nn.Module, layers=None, selective: bool = False):
    """Count the distinct storages kept for the backward (parameters excluded): what
    autograd saves outside checkpointed layers (saved-tensor hooks; a checkpoint's own
    hooks take over inside its layer), the inputs of checkpointed ``layers``, and with
    ``selective`` the outputs the selective policy caches inside them."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from llmopt.training.recompute import CheckpointPolicy, selective_policy

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    inside = [0]

    def add(tensor):
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()

    def pack(tensor):
        add(tensor)
        return tensor

    class CachedOutputs(TorchDispatchMode):
        # sees each op after the checkpoint's caching mode: counts what the policy keeps
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if inside[0] and selective_policy(None, func, *args, **(kwargs or {})) == CheckpointPolicy.MUST_SAVE:
                for value in tree_leaves(out):
                    add(value)
            return out

    handles = []
    for layer in layers or ():
        def pre(module, args, kwargs):
            inside[0] += 1
            for value in (*args, *kwargs.values()):
                if isinstance(value, torch.Tensor) and value.requires_grad:
                    add(value)

        def post(module, args, kwargs, output):
            inside[0] -= 1

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
                (CachedOutputs() if selective else contextlib.nullcontext()):
            yield seen
    finally:
        for handle in handles:
            handle.remove()


def saved_activation_bytes(trainer, batch: dict) -> int:
    """Bytes held for the backward after an eager forward of ``batch`` (see the module docstring)."""
    from llmopt.training.recompute import decoder_layers

    model = trainer.model
    mode = trainer.config.recompute
    layers = decoder_layers(model) if mode in ("full", "selective") else None
    model.train()
    with _count_saved(model, layers, selective=mode == "selective") as seen, trainer._autocast():
        summed, _ = trainer.compute_loss(model, batch)
    trainer.last_outputs = None
    del summed
    return sum(seen.values())


def _probe_batch(trainer, rows: int) -> dict:
    from llmopt.training.data import collate

    longest = sorted(trainer.train_rows, key=lambda r: -(r["input_ids"] if isinstance(r, dict) else r[0]).numel())
    chosen = [longest[i % len(longest)] for i in range(rows)]
    return collate(chosen, trainer.pad_id)


def _available_cpu_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise LLMOptConfigError("micro_batch_size='auto' on CPU needs memory_budget_bytes (no /proc/meminfo here)")


def _candidates(trainer) -> list[int]:
    top = min(trainer.config.max_micro_batch_size, len(trainer.train_rows))
    sizes, size = [], 1
    while size <= top:
        sizes.append(size)
        size *= 2
    return sizes


def auto_micro_batch_size(trainer) -> int:
    cfg = trainer.config
    if trainer.device.type == "cuda":
        return _auto_cuda(trainer)
    budget = cfg.memory_budget_bytes or int(0.8 * _available_cpu_bytes())
    fixed = state_bytes(trainer.model, cfg.optimizer)
    one = saved_activation_bytes(trainer, _probe_batch(trainer, 1))
    two = saved_activation_bytes(trainer, _probe_batch(trainer, 2))
    per_row, base = max(two - one, 0), max(2 * one - two, 0)
    trainer.model.zero_grad(set_to_none=True)
    best = None
    for size in _candidates(trainer):
        if fixed + base + per_row * size <= budget:
            best = size
    if best is None:
        raise LLMOptConfigError(f"micro_batch_size='auto': not even 1 sequence fits the budget of {budget} bytes "
                                f"(weights, gradients and optimizer state alone take {fixed})")
    trainer.auto_memory = {"budget": budget, "fixed": fixed, "per_row": per_row, "base": base, "chosen": best}
    return best


def _auto_cuda(trainer) -> int:
    cfg = trainer.config
    device = trainer.device
    budget = cfg.memory_budget_bytes or int(0.9 * torch.cuda.get_device_properties(device).total_memory)
    moments = 0 if trainer.optimizer.state else (2 if cfg.optimizer == "adamw" else 1) * sum(
        p.numel() * 4 for p in trainer.model.parameters() if p.requires_grad)
    best, peaks = None, {}
    for size in _candidates(trainer):
        trainer.model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            with trainer._autocast(), trainer._budget():
                summed, _ = trainer.compute_loss(trainer.train_model, _probe_batch(trainer, size))
            summed.backward()
            peak = torch.cuda.max_memory_allocated(device) + moments
        except torch.cuda.OutOfMemoryError:
            peak = None
        finally:
            trainer.last_outputs = None
            summed = None
        trainer.model.zero_grad(set_to_none=True)
        if peak is None or peak > budget:
            break
        best, peaks[size] = size, peak
    torch.cuda.empty_cache()
    if best is None:
        raise LLMOptConfigError(f"micro_batch_size='auto': not even 1 sequence fits the budget of {budget} bytes")
    trainer.auto_memory = {"budget": budget, "peaks": peaks, "chosen": best}
    return best
