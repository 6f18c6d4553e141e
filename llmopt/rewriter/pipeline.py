"""The ordered pass pipeline, with snapshot, verification and fallback.

Each pass edits the graph in place. Before it runs, the graph is copied;
if the pass raises, or (with ``verify``) leaves a graph whose outputs no
longer have the shapes and dtypes they had, the copy is put back and the
failure is reported (a warning, or an error with ``strict``).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch.fx import GraphModule

from llmopt.config import PASS_NAMES
from llmopt.passes.base import GraphPass, PassContext
from llmopt.passes.eliminate_dead_code import EliminateDeadCode
from llmopt.passes.fuse_attention import FuseAttention
from llmopt.passes.page_kv_cache import PageKVCache
from llmopt.passes.prune_linear import PruneLinear
from llmopt.passes.quantize_linear import QuantizeLinear
from llmopt.passes.route_dense_linear import RouteDenseLinear
from llmopt.passes.shard_tensor_parallel import ShardTensorParallel
from llmopt.passes.graph_utils import fake_value, known_equal, nested_graph_modules
from llmopt.rewriter.log import logger, warn_fallback
from llmopt.rewriter.report import GraphReport, PassRecord

# The order matters: rewrites first, clean-up last.
PIPELINE: tuple[GraphPass, ...] = (
    FuseAttention(),
    ShardTensorParallel(),  # on the fused attention calls; before paging and quantization (shards quantized)
    PageKVCache(),
    PruneLinear(),  # before any quantize pass: quantize the pruned weights
    QuantizeLinear(),
    RouteDenseLinear(),  # after quantization: the fp32 linears it left
    EliminateDeadCode(),
)


class LLMOptPassError(RuntimeError):
    """A pass failed while ``strict=True``."""


def pass_names() -> list[str]:
    return [p.name for p in PIPELINE]


# llmopt.config checks 'disable_passes' against its own list (it cannot import the passes).
assert tuple(pass_names()) == PASS_NAMES, (pass_names(), PASS_NAMES)


def run_pipeline(gm: GraphModule, ctx: PassContext, report: GraphReport) -> GraphModule:
    for graph_pass in PIPELINE:
        if not graph_pass.enabled(ctx.config):
            report.passes.append(PassRecord(graph_pass.name, "skipped (disabled)"))
            continue
        report.passes.append(_run_one(graph_pass, gm, ctx, report.index))
    return gm


def _run_one(graph_pass: GraphPass, gm: GraphModule, ctx: PassContext, index: int) -> PassRecord:
    record = PassRecord(graph_pass.name, "ran")
    # nested graphs (checkpointed layers' bodies) are edited in place too
    nested = nested_graph_modules(gm)
    snapshot = _clone_graph(gm.graph)
    nested_snapshots = [_clone_graph(module.graph) for module in nested]
    expected = _output_signature(gm)
    _log_graph(f"graph {index} before {graph_pass.name}", gm)
    start = time.perf_counter()
    try:
        result = graph_pass.run(gm, ctx)
        gm.graph.lint()
        gm.recompile()
        if ctx.config.verify and result.changed:
            _verify_outputs(gm, expected)
    except Exception as error:  # noqa: BLE001 - any failure means: undo this pass
        gm.graph = snapshot
        gm.recompile()
        for module, graph in zip(nested, nested_snapshots):
            module.graph = graph
            module.recompile()
        record.status = f"failed: {type(error).__name__}: {error}"
        if getattr(error, "fatal", False):  # e.g. tensor parallelism that cannot split the graph
            raise
        message = f"llmopt pass {graph_pass.name!r} failed on graph {index} and was undone: {error}"
        if ctx.config.strict:
            raise LLMOptPassError(message) from error
        warn_fallback(message + " (the graph runs without it; strict=True makes this an error)")
        return record
    finally:
        record.seconds = time.perf_counter() - start
    record.rewrites, record.skipped, record.notes = result.rewrites, result.skipped, result.notes
    _log_graph(f"graph {index} after {graph_pass.name}", gm)
    return record


def _clone_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    """A copy of ``graph`` to put back if a pass fails, Dynamo's node attributes included."""
    clone = copy.deepcopy(graph)
    for original, copied in zip(graph.nodes, clone.nodes):
        # Dynamo keeps e.g. ``_dynamo_source`` on placeholder nodes, outside meta;
        # Inductor needs it.
        for key, value in vars(original).items():
            if not hasattr(copied, key):
                setattr(copied, key, value)
    return clone


def _log_graph(title: str, gm: GraphModule) -> None:
    if logger.isEnabledFor(10):  # DEBUG; formatting a large graph is not free
        logger.debug("%s:\n%s", title, gm.graph)


def _output_signature(gm: GraphModule) -> list[Any]:
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    values = output.args[0]
    values = values if isinstance(values, (list, tuple)) else [values]
    return [fake_value(v) for v in values]


class _FakeAttrInterpreter(torch.fx.Interpreter):
    """Reads tensors a pass installed on the module (``get_attr``) as fakes of the run's mode."""

    def __init__(self, gm: GraphModule, fake_mode: Any) -> None:
        super().__init__(gm)
        self.fake_mode = fake_mode

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        if isinstance(value, torch.Tensor) and not isinstance(value, torch._subclasses.FakeTensor):
            return self.fake_mode.from_tensor(value, static_shapes=True)
        return value


def _verify_outputs(gm: GraphModule, expected: list[Any]) -> None:
    """Run the graph on Dynamo's fake inputs; its outputs must keep shape and dtype."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = [fake_value(n) for n in placeholders]
    # Dynamo's example values carry their own fake mode (not always the
    # tracing context's); run in that one so tensors never mix modes.
    fake_mode = next((i.fake_mode for i in inputs if hasattr(i, "fake_mode")), None)
    if fake_mode is None or any(i is None for i in inputs):
        return  # nothing to check against
    with fake_mode:
        outputs = _FakeAttrInterpreter(gm, fake_mode).run(*inputs)
    outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    if len(outputs) != len(expected):
        raise RuntimeError(f"graph now has {len(outputs)} outputs, had {len(expected)}")
    for i, (got, want) in enumerate(zip(outputs, expected)):
        if isinstance(want, torch.Tensor):
            same = (
                isinstance(got, torch.Tensor)
                and got.dtype == want.dtype
                and got.dim() == want.dim()
                and all(known_equal(a, b) for a, b in zip(got.shape, want.shape))
            )
            if not same:
                raise RuntimeError(
                    f"output {i} changed from {tuple(want.shape)} {want.dtype} to "
                    f"{getattr(got, 'shape', got)} {getattr(got, 'dtype', '')}"
                )
