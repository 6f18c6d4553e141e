"""The ``llmopt`` torch.compile backend: Dynamo graph -> passes -> lowering.

Registered through the ``torch_dynamo_backends`` entry point only (registering
it again by decorator would make torch's lookup fail on a duplicate name).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch.fx import GraphModule

from llmopt.backends import lower
from llmopt.config import LLMOptConfig
from llmopt.passes.base import PassContext
from llmopt.passes.graph_utils import count_ops, placeholder_sources
from llmopt.rewriter.log import logger, warn_fallback
from llmopt.rewriter.pipeline import run_pipeline
from llmopt.rewriter.report import Report

_last_report: Optional[Report] = None


class LLMOptLoweringError(RuntimeError):
    """Lowering failed while ``strict=True``."""


def llmopt_backend(
    gm: GraphModule,
    example_inputs: Sequence[Any],
    options: "Mapping[str, Any] | LLMOptConfig | None" = None,
    report: Optional[Report] = None,
) -> Callable:
    """Rewrite ``gm`` with llmopt's passes, then lower it.

    ``options`` is what ``torch.compile(..., options=...)`` was given;
    ``report`` collects what was done (a new one per call if not given; the
    latest is returned by :func:`last_report`).
    """
    global _last_report
    config = LLMOptConfig.from_options(options)
    if report is None:
        report = Report()
    _last_report = report
    graph_report = report.new_graph()

    ctx = PassContext(
        config=config,
        example_inputs=list(example_inputs),
        parameters=placeholder_sources(gm.graph),
        training=torch.is_grad_enabled()
        and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs),
    )
    graph_report.ops_before = count_ops(gm.graph)
    run_pipeline(gm, ctx, graph_report)
    graph_report.ops_after = count_ops(gm.graph)
    logger.info(
        "graph %d: %d region(s) rewritten, lowering to %s",
        graph_report.index,
        sum(len(p.rewrites) for p in graph_report.passes),
        config.lower,
    )

    graph_report.lowering = config.lower
    try:
        compiled = lower(config.lower, gm, example_inputs, config)
    except Exception as error:  # noqa: BLE001
        message = f"llmopt lowering to {config.lower!r} failed: {type(error).__name__}: {error}"
        if config.strict:
            raise LLMOptLoweringError(message) from error
        warn_fallback(message + " (running the rewritten graph eagerly instead)")
        graph_report.lowering_status = "failed, ran eagerly"
        return gm.forward
    graph_report.lowering_status = "ok"
    return compiled


def last_report() -> Optional[Report]:
    """The report of the most recent llmopt compilation in this process."""
    return _last_report
