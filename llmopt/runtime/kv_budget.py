"""How many KV-cache blocks fit a memory budget.

One block holds ``block_size`` tokens' keys and values in every layer:
``2 * num_layers * block_size * num_kv_heads * head_dim * element size`` bytes.
"""

from __future__ import annotations

import torch

GIB = 1024**3


def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                    dtype: torch.dtype | str) -> int:
    for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim), ("block_size", block_size)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    return 2 * num_layers * block_size * num_kv_heads * head_dim * as_dtype(dtype).itemsize


# The short names users type (``dtype="bf16"``), beside torch's own.
_SHORT_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype, also from its name (``"bfloat16"``) or short name (``"bf16"``)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) in _SHORT_NAMES:
        return _SHORT_NAMES[str(dtype)]
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown KV cache dtype {dtype!r}; use a torch dtype such as torch.float16")
    return resolved


def num_blocks_for_budget(bytes_budget: int, num_layers: int, num_kv_heads: int,
                          head_dim: int, block_size: int, dtype: torch.dtype | str) -> int:
    """The number of whole blocks that fit ``bytes_budget``; ValueError if not even one."""
    dtype = as_dtype(dtype)
    per_block = bytes_per_block(num_layers, num_kv_heads, head_dim, block_size, dtype)
    num_blocks = int(bytes_budget) // per_block
    if num_blocks < 1:
        raise ValueError(
            f"a KV budget of {int(bytes_budget)} bytes holds no block: one block of "
            f"{block_size} tokens needs {per_block} bytes (2 x {num_layers} layers x "
            f"{block_size} tokens x {num_kv_heads} KV heads x {head_dim} head dim x "
            f"{dtype.itemsize} bytes for {dtype}); raise the budget or lower block_size"
        )
    return num_blocks


def gpu_budget_bytes(fraction: float = 0.9, device: int | str | torch.device | None = None) -> int:
    """``fraction`` of the GPU memory free now (call it after loading the weights)."""
    _check_fraction(fraction)
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device is available; give a CPU budget with cpu_budget_bytes(gib)")
    free, _total = torch.cuda.mem_get_info(device)
    return int(free * fraction)


def cpu_budget_bytes(gib: float) -> int:
    """A CPU budget, given in GiB."""
    if gib <= 0:
        raise ValueError(f"the CPU KV budget must be positive, got {gib} GiB")
    return int(gib * GIB)


def _check_fraction(fraction: float) -> None:
    if not 0 < fraction <= 1:
        raise ValueError(f"the GPU memory fraction must be in (0, 1], got {fraction}")
