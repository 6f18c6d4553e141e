"""Remove nodes whose results nobody uses (e.g. KV repeats left by fuse_attention)."""

from __future__ import annotations

from torch.fx import GraphModule, Node

from llmopt.passes.base import GraphPass, PassContext, PassResult


def _has_side_effects(node: Node) -> bool:
    # FX treats every method call as pure, but Dynamo graphs keep in-place
    # methods (``cache.index_copy_(...)``, ``x.add_(...)``) whose results go
    # unused: those must stay.
    if node.is_impure():
        return True
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if node.op in ("call_method", "call_function") and name.endswith("_") and not name.endswith("__"):
        return True
    return node.op == "call_method" and name in ("__setitem__", "copy_", "record_stream")


class EliminateDeadCode(GraphPass):
    name = "eliminate_dead_code"

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        before = len(gm.graph.nodes)
        gm.graph.eliminate_dead_code(is_impure_node=_has_side_effects)
        removed = before - len(gm.graph.nodes)
        return PassResult(notes=[f"removed {removed} dead nodes"] if removed else [])
