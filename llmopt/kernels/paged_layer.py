"""The schema of ``llmopt::paged_attention_layer``, and its fake; no implementation.

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

The cache write is a side effect on the runtime's cache, not on an input, so
the schema declares no mutated arguments (a graph compiled once serves every
step; the caches are not graph values).
"""

from __future__ import annotations

import torch

__all__ = ["OP"]

_LIB = torch.library.Library("llmopt", "FRAGMENT")
_LIB.define("paged_attention_layer(Tensor q, Tensor k, Tensor v, str layer, float scale, "
            "str impl=\"auto\") -> Tensor")


@torch.library.register_fake("llmopt::paged_attention_layer", lib=_LIB)
def _(q, k, v, layer, scale, impl="auto"):
    return q.new_empty(q.shape)


OP = torch.ops.llmopt.paged_attention_layer
