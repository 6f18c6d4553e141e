"""What every pass shares: its signature, its context and what it reports.

A pass is a small object with a ``name`` and ``run(gm, ctx) -> PassResult``.
It edits ``gm.graph`` in place; the pipeline snapshots the graph first so a
pass that fails can be undone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch

if TYPE_CHECKING:
    from llmopt.config import LLMOptConfig


@dataclass(frozen=True)
class Rewrite:
    """One region a pass rewrote."""

    kind: str  # e.g. "attention"
    location: str  # module path in the user's model, e.g. "model.layers.0.self_attn"
    detail: str = ""
    impl: str = ""  # the implementation the new op call runs (kernels/dispatch.py), e.g. "sdpa"


@dataclass(frozen=True)
class Skipped:
    """One candidate site a pass left as it was, and why."""

    kind: str
    location: str
    reason: str


@dataclass
class PassResult:
    rewrites: list[Rewrite] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.rewrites)


@dataclass
class PassContext:
    """What a pass may read besides the graph.

    ``parameters`` maps a placeholder's name to the module path of the
    parameter or buffer it stands for (e.g. ``model.layers.0.mlp.up_proj.weight``);
    ``example_inputs`` holds the values, in placeholder order.
    """

    config: "LLMOptConfig"
    example_inputs: Sequence[Any]
    parameters: dict[str, str] = field(default_factory=dict)
    training: bool = False

    def parameter_value(self, gm: torch.fx.GraphModule, path: str) -> Any:
        """The example value of the parameter at module ``path``."""
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for node, value in zip(placeholders, self.example_inputs):
            if self.parameters.get(node.name) == path:
                return value
        raise KeyError(f"no parameter {path!r} among the graph's inputs")


class GraphPass:
    """Base class: subclasses set ``name`` and implement ``run``."""

    name: str = ""

    def enabled(self, config: "LLMOptConfig") -> bool:
        return self.name not in config.disable_passes

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:  # pragma: no cover
        raise NotImplementedError
