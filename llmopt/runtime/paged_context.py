"""The serving runtime's per-step context for paged attention, and the op's implementation.

A graph compiled with ``paged_kv=True`` calls
``llmopt::paged_attention_layer(q, k, v, layer, scale)`` where the model had
its attention. The step's metadata (slot mapping, block tables, sequence
lengths) changes shape every step and Dynamo's graph cannot gain inputs after
it was traced, so the op finds them, and the layer's KV cache, in the context
the model runner publishes around each forward (:func:`paged_step`) — the
same arrangement as vLLM's forward context. Inside, it is one
``llmopt::paged_attention`` call: write the new K/V, attend over the blocks.

The caches are created on first use, one pair per layer name, shaped from
that layer's K (KV heads, head dim, dtype): any model that follows the
runtime's protocol gets the right cache without being described up front. A
profile step (:attr:`PagedKVCache.layer_specs`) tells the runtime how big one
block is before it sizes the pool.

The op's schema and fake live in :mod:`llmopt.kernels.paged_layer` (what the
paging pass and tracing need); its real implementation is registered here,
with the state it reads, so kernels/ holds no per-step state and the passes
never import the runtime. The model runner imports this module, so any
process that runs a paged graph through the runtime has the implementation.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

import torch
from torch import Tensor

from llmopt.kernels import paged_attention as _paged  # noqa: F401  (registers llmopt::paged_attention)
from llmopt.kernels import paged_layer as _paged_layer  # noqa: F401  (defines llmopt::paged_attention_layer)

__all__ = ["LayerSpec", "PagedKVCache", "PagedStep", "paged_step", "paged_attention_layer"]


@dataclass(frozen=True)
class LayerSpec:
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def bytes_per_token(self) -> int:
        return 2 * self.kv_heads * self.head_dim * self.dtype.itemsize


@dataclass
class PagedStep:
    """One step's metadata, in the layout ``llmopt::paged_attention`` documents."""

    slot_mapping: Tensor  # (T,)
    block_tables: Tensor  # (N, max_blocks)
    seq_lens: Tensor  # (N,)
    query_start_loc: Tensor  # (N + 1,)
    max_query_len: int
    max_seq_len: int
    cpu_plan: object = None  # computed by the first layer on the CPU path, shared by the rest
    # {sequence index: (q_len, q_len) bool}: who sees whom among that sequence's new tokens
    # (a token tree, e.g. lookahead decoding) instead of causal order; None: causal.
    append_masks: dict | None = None


@dataclass
class PagedKVCache:
    """One (k_cache, v_cache) pair per attention layer, each ``(num_blocks, block_size, Hkv, D)``."""

    num_blocks: int
    block_size: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    layers: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    layer_specs: dict[str, LayerSpec] = field(default_factory=dict)

    def layer(self, name: str, k: Tensor) -> tuple[Tensor, Tensor]:
        pair = self.layers.get(name)
        spec = LayerSpec(int(k.shape[1]), int(k.shape[2]), k.dtype)
        if pair is None:
            shape = (self.num_blocks, self.block_size, spec.kv_heads, spec.head_dim)
            pair = (torch.zeros(shape, dtype=spec.dtype, device=self.device),
                    torch.zeros(shape, dtype=spec.dtype, device=self.device))
            self.layers[name] = pair
            self.layer_specs[name] = spec
        elif self.layer_specs[name] != spec:
            raise RuntimeError(f"llmopt: attention layer {name!r} was called with K/V of "
                               f"{spec} after {self.layer_specs[name]}; one cache cannot hold both")
        return pair

    @property
    def bytes_per_block(self) -> int:
        return sum(s.bytes_per_token() for s in self.layer_specs.values()) * self.block_size

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers.values())


_local = threading.local()


@contextlib.contextmanager
def paged_step(cache: PagedKVCache, step: PagedStep):
    """Publish ``cache`` and ``step`` to the paged attention layers for one forward."""
    previous = getattr(_local, "current", None)
    _local.current = (cache, step)
    try:
        yield
    finally:
        _local.current = previous


def _current() -> tuple[PagedKVCache, PagedStep]:
    current = getattr(_local, "current", None)
    if current is None:
        raise RuntimeError(
            "llmopt: this model was compiled with paged_kv=True, so its attention reads the "
            "serving runtime's paged KV cache; run it through llmopt.LLM (or inside "
            "llmopt.runtime.paged_context.paged_step) rather than calling it directly")
    return current


def paged_attention_layer(q: Tensor, k: Tensor, v: Tensor, layer: str, scale: float,
                          impl: str = "auto") -> Tensor:
    """Attention of one layer over the published paged cache: q ``(T, Hq, D)``, k/v ``(T, Hkv, D)``.

    The implementation of ``llmopt::paged_attention_layer`` (schema in
    :mod:`llmopt.kernels.paged_layer`): writes the step's K/V into the layer's
    cache slots and attends each sequence over its own blocks.
    """
    cache, step = _current()
    k_cache, v_cache = cache.layer(layer, k)
    impl = _paged.resolve_impl(impl, q.device)  # the pass resolved it already; "auto" from direct calls
    if _paged.uses_cpu_plan(impl):
        # Skip the op's per-call planning: every layer of the step shares one plan.
        if step.cpu_plan is None:
            step.cpu_plan = _paged.plan_cpu_step(
                step.block_tables, step.seq_lens, step.query_start_loc, cache.block_size,
                cache.num_blocks, q.shape[0], q.dtype, step.append_masks)
        return _paged.paged_attention_cpu_planned(q.contiguous(), k.contiguous(), v.contiguous(),
                                                  k_cache, v_cache, step.slot_mapping, step.cpu_plan,
                                                  scale, native=impl == "native")
    if step.append_masks:
        # Masks are not in the op's schema (nor the Triton kernels): the plain-PyTorch path.
        return _paged._paged_attention_gather_sdpa(
            q.contiguous(), k.contiguous(), v.contiguous(), k_cache, v_cache, step.slot_mapping,
            step.block_tables, step.seq_lens, step.query_start_loc, scale, step.append_masks)
    return torch.ops.llmopt.paged_attention(
        q.contiguous(), k.contiguous(), v.contiguous(), k_cache, v_cache, step.slot_mapping,
        step.block_tables, step.seq_lens, step.query_start_loc, step.max_query_len,
        step.max_seq_len, scale, impl)


# One implementation (the function dispatches itself), registered per device key:
# kernels/paged_layer.py's CompositeExplicitAutograd default (an error that says a
# paged graph runs only inside the runtime) stays for processes without the runtime,
# and the dispatcher prefers a device key's own kernel over it. No autograd: paged
# graphs are inference only.
RUNTIME_DEVICE_KEYS = ("CPU", "CUDA", "XPU", "MPS")
_LIB = torch.library.Library("llmopt", "IMPL")
for _key in RUNTIME_DEVICE_KEYS:
    _LIB.impl("paged_attention_layer", paged_attention_layer, _key)
