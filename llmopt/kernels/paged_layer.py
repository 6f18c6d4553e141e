"""The schema of ``llmopt::paged_attention_layer``, its fake, and a default that explains.

A graph compiled with ``paged_kv=True`` calls
``llmopt::paged_attention_layer(q, k, v, layer, scale, impl)`` where the model had
its attention: q ``(T, Hq, D)``, k/v ``(T, Hkv, D)``, the output shaped like
q; ``impl`` is the ``llmopt::paged_attention`` implementation the paging pass
resolved for the site when the graph was compiled. The step's metadata and the layer's KV cache are not arguments (they
change shape every step and a traced graph cannot gain inputs): the serving
runtime publishes them around each forward, as vLLM's forward context does,
and registers the op's real implementation, which reads them
(:mod:`llmopt.runtime.paged_context`). This module only defines what the
paging pass and the compiler need to trace and rewrite: the schema and the
fake kernel. kernels/ holds no per-step state.

Outside the runtime the op has no real implementation, so a paged graph run
there would get torch's "could not run ... with arguments from the 'CPU'
backend". Instead, the op's default (``CompositeExplicitAutograd``, which
every device key falls back to) raises :class:`PagedGraphOutsideRuntime`
saying where such a graph runs. :mod:`llmopt.runtime.paged_context` registers
the real implementation for the device keys themselves (``CPU``, ``CUDA``,
...): the dispatcher prefers a kernel registered for the device key over the
composite default, on every torch version, so neither registration replaces
the other and no module state is swapped.

The cache write is a side effect on the runtime's cache, not on an input, so
the schema declares no mutated arguments (a graph compiled once serves every
step; the caches are not graph values).
"""

from __future__ import annotations

import torch

__all__ = ["OP", "PagedGraphOutsideRuntime"]

OUTSIDE_RUNTIME = (
    "llmopt: this graph was compiled with the paging pass (options paged_kv=True or "
    "paging={'enabled': True}), so its attention is llmopt::paged_attention_layer, which reads "
    "the paged KV cache and step metadata that llmopt's serving runtime publishes around each "
    "forward; it runs only inside that runtime (llmopt.LLM, the engine, or "
    "llmopt.runtime.paged_context.paged_step). Compile without paged_kv to run the model directly.")


class PagedGraphOutsideRuntime(RuntimeError):
    """A graph compiled with the paging pass was run where the serving runtime is not loaded."""

_LIB = torch.library.Library("llmopt", "FRAGMENT")
_LIB.define("paged_attention_layer(Tensor q, Tensor k, Tensor v, str layer, float scale, "
            "str impl=\"auto\") -> Tensor")


@torch.library.register_fake("llmopt::paged_attention_layer", lib=_LIB)
def _(q, k, v, layer, scale, impl="auto"):
    return q.new_empty(q.shape)


def _outside_runtime(q, k, v, layer, scale, impl="auto"):
    raise PagedGraphOutsideRuntime(f"{OUTSIDE_RUNTIME} (layer {layer!r}, q on {q.device.type})")


_LIB.impl("paged_attention_layer", _outside_runtime, "CompositeExplicitAutograd")


OP = torch.ops.llmopt.paged_attention_layer
