"""Hand the rewritten graph to Inductor, which runs AOTAutograd itself.

llmopt's custom ops stay opaque to Inductor (it calls their registered
CPU/CUDA kernels); their registered autograd gives the backward graph.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from torch.fx import GraphModule


def lower_inductor(gm: GraphModule, example_inputs: Sequence[Any]) -> Callable:
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, list(example_inputs))
