"""Run the rewritten graph as it is: no compile time, used by many tests."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from torch.fx import GraphModule


def lower_eager(gm: GraphModule, example_inputs: Sequence[Any]) -> Callable:
    return gm.forward
