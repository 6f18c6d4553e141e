"""Lowering targets: where a rewritten graph goes to be run."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from torch.fx import GraphModule

from llmopt.backends.eager import lower_eager
from llmopt.backends.inductor import lower_inductor
from llmopt.backends.tensorrt import lower_tensorrt

LOWERINGS: dict[str, Callable[..., Callable]] = {
    "inductor": lower_inductor,
    "eager": lower_eager,
    "tensorrt": lower_tensorrt,
}

# Lowerings with settings of their own; they also get the backend's LLMOptConfig.
TAKES_CONFIG = frozenset({"tensorrt"})


def lower(target: str, gm: GraphModule, example_inputs: Sequence[Any], config: Any = None) -> Callable:
    if target in TAKES_CONFIG:
        return LOWERINGS[target](gm, example_inputs, config)
    return LOWERINGS[target](gm, example_inputs)
