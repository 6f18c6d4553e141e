"""Options of the serving engine, as one validated dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from llmopt.kernels.options import KernelOptions
from llmopt.runtime.kv_budget import as_dtype
from llmopt.runtime.speculative.config import SpeculativeConfig


@dataclass
class EngineConfig:
    """Options of :class:`llmopt.LLM` / the engine.

    Attributes:
        dtype: weights and KV cache dtype (``"float32"``, ``"bfloat16"`` /
            ``"bf16"``, ...). The default is float32 on every CPU (Xeon and
            EPYC alike): its greedy tokens are Hugging Face fp32's. bf16 is
            the opt-in for throughput: its linears run oneDNN's bf16 kernels
            (AMX on Xeons that have it, AVX-512 BF16 on Zen 4 EPYCs) and its
            KV cache is half the size; int8 / int4 weights come through
            ``compile_options={"quantize": ...}``.
        device: ``"cpu"``, ``"cuda"``; None picks CUDA when present.
        lower: where llmopt lowers the compiled model (``"inductor"`` or ``"eager"``).
        block_size: tokens per KV block (a power of two).
        kv_cache_memory_gib: CPU KV cache budget.
        gpu_memory_utilization: fraction of free GPU memory for the KV cache.
        num_kv_blocks: the pool size in blocks, overriding both budgets.
        max_num_seqs: most sequences in one step.
        max_num_batched_tokens: token budget of one step.
        max_model_len: most tokens per sequence; None: the model's context
            length or what the pool holds, whichever is smaller.
        enable_prefix_caching: reuse the KV of shared prompt prefixes.
        enable_chunked_prefill: split long prompts across steps.
        long_prefill_token_threshold: cap on one prompt's chunk per step.
        kernels: the compiler's ``kernels`` option group (a dict or
            ``KernelOptions``): which implementation each op of the served
            graph runs, e.g. ``{"paged_attention": "gather_sdpa"}``.
        compile_options: more ``torch.compile(backend="llmopt")`` options for
            the served model, e.g. ``{"quantize": "int4"}`` or
            ``{"prune": {"pattern": "2:4"}}``; ``paged_kv``, ``lower`` and ``kernels`` are
            the engine's own (set them through the fields above).
        speculative_config: speculative decoding (a dict or
            ``SpeculativeConfig``: ``method`` "ngram" / "draft_model" /
            "layer_skip" / "lookahead", ``num_speculative_tokens``, ...);
            None: off.
        tensor_parallel_size: ranks the model is split over (Megatron-style,
            the compiler's ``tensor_parallel`` pass); above 1 the engine
            starts the other ranks as processes, or joins torchrun's
            (``runtime/tp_world.py``); the KV budget is per rank.
    """

    dtype: Any = "float32"
    device: str | None = None
    lower: str = "inductor"
    block_size: int = 16
    kv_cache_memory_gib: float = 2.0
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int | None = None
    kernels: Any = None
    compile_options: Any = None
    speculative_config: Any = None
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        self.dtype = as_dtype(self.dtype)
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype}")
        if self.lower not in ("inductor", "eager"):
            raise ValueError(f"lower must be 'inductor' or 'eager', got {self.lower!r}")
        if self.device is not None and torch.device(self.device).type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        bs = self.block_size
        if not isinstance(bs, int) or bs < 1 or bs & (bs - 1):
            raise ValueError(f"block_size must be a power of two, got {bs!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("num_kv_blocks", "max_model_len", "long_prefill_token_threshold"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 or None, got {value}")
        # Checked here, when the engine is built, with the compiler's own messages.
        self.kernels = KernelOptions.from_options(self.kernels)
        self.compile_options = _checked_compile_options(self.compile_options)
        self.speculative_config = SpeculativeConfig.from_options(self.speculative_config)
        _check_tensor_parallel(self)
        if not self.kv_cache_memory_gib > 0:
            raise ValueError(f"kv_cache_memory_gib must be positive, got {self.kv_cache_memory_gib}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s) {unknown}; valid options: {sorted(known)}")
        return cls(**kwargs)

    def resolved_device(self) -> torch.device:
        if self.device is not None:
            device = torch.device(self.device)
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError("device='cuda' was asked for but no CUDA device is available")
            return device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_ENGINE_OWNED = ("paged_kv", "paging", "lower", "kernels", "tensor_parallel")


def _check_tensor_parallel(config: EngineConfig) -> None:
    from llmopt.errors import LLMOptConfigError

    size = config.tensor_parallel_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise LLMOptConfigError(f"tensor_parallel_size must be a positive int (the number of ranks), got {size!r}")
    spec = config.speculative_config
    if size > 1 and spec is not None and spec.method != "ngram":
        # a drafter model has its own runner, which does not broadcast its steps to the workers
        raise LLMOptConfigError(f"speculative method {spec.method!r} does not run with tensor_parallel_size > 1 "
                                "yet; 'ngram' does")


def _checked_compile_options(options: Any) -> dict:
    """The served model's extra compiler options, checked with the compiler's own messages."""
    from collections.abc import Mapping

    from llmopt.config import LLMOptConfig
    from llmopt.errors import LLMOptConfigError

    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise LLMOptConfigError(f"compile_options must be a dict of llmopt options, "
                                f"got {type(options).__name__}")
    owned = sorted(set(options) & set(_ENGINE_OWNED))
    if owned:
        raise LLMOptConfigError(f"compile_options: {owned} belong to the engine (the paging pass is always on; "
                                "set lower=, kernels= and tensor_parallel_size= on the engine itself)")
    options = dict(options)
    LLMOptConfig.from_options(options)  # unknown keys and bad values fail here, before any compile
    return options
