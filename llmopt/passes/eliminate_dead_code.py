"""Remove nodes whose results nobody uses (e.g. KV repeats left by fuse_attention)."""

from __future__ import annotations

import operator

from torch.fx import GraphModule, Node

from llmopt.passes.base import GraphPass, PassContext, PassResult
from llmopt.passes.graph_utils import nested_graph_modules


_IMPURE_OPERATORS = {getattr(operator, name) for name in (
    "setitem", "delitem", "iadd", "iand", "iconcat", "ifloordiv", "ilshift", "imatmul", "imod",
    "imul", "ior", "ipow", "irshift", "isub", "itruediv", "ixor")}


def _has_side_effects(node: Node) -> bool:
    # FX treats every method call as pure, but Dynamo graphs keep in-place
    # methods (``cache.index_copy_(...)``, ``x.add_(...)``) whose results go
    # unused: those must stay.
    if node.is_impure():
        return True
    if node.op == "call_function" and getattr(operator, getattr(node.target, "__name__", ""), None) is node.target:
        # ``operator.and_``/``or_``/``not_`` are pure; in-place operators are named ``iand`` etc.
        return node.target in _IMPURE_OPERATORS
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if node.op in ("call_method", "call_function") and name.endswith("_") and not name.endswith("__"):
        return True
    return node.op == "call_method" and name in ("__setitem__", "copy_", "record_stream")


class EliminateDeadCode(GraphPass):
    name = "eliminate_dead_code"

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        removed = 0
        for module in (gm, *nested_graph_modules(gm)):  # checkpointed layers' bodies too
            before = len(module.graph.nodes)
            module.graph.eliminate_dead_code(is_impure_node=_has_side_effects)
            removed += before - len(module.graph.nodes)
            if module is not gm:
                module.recompile()
        return PassResult(notes=[f"removed {removed} dead nodes"] if removed else [])
