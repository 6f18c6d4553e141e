"""Lowering targets: where a rewritten graph goes to be run."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from torch.fx import GraphModule

from llmopt.backends.eager import lower_eager
from llmopt.backends.inductor import lower_inductor

LOWERINGS: dict[str, Callable[[GraphModule, Sequence[Any]], Callable]] = {
    "inductor": lower_inductor,
    "eager": lower_eager,
}


def lower(target: str, gm: GraphModule, example_inputs: Sequence[Any]) -> Callable:
    return LOWERINGS[target](gm, example_inputs)
