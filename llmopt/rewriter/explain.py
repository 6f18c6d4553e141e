"""``llmopt.explain``: compile once and say what the backend did."""

from __future__ import annotations

import functools
from typing import Any, Mapping

import torch

from llmopt.config import LLMOptConfig
from llmopt.rewriter.backend import llmopt_backend
from llmopt.rewriter.report import Report


def explain(
    model: Any,
    *example_inputs: Any,
    options: "Mapping[str, Any] | LLMOptConfig | None" = None,
    **example_kwargs: Any,
) -> Report:
    """Compile ``model`` with the llmopt backend, run it once on the example
    inputs (without gradients) and return the :class:`Report`.

    Lowering defaults to ``"eager"`` here, since the report is about the
    rewrite; pass ``options={"lower": "inductor"}`` to include Inductor.
    Dynamo's caches are reset first (as ``torch._dynamo.explain`` does), so the
    report covers every graph of this model.
    """
    if isinstance(options, LLMOptConfig):
        config = options
    else:
        config = LLMOptConfig.from_options({"lower": "eager", **dict(options or {})})
    report = Report()
    backend = functools.partial(llmopt_backend, options=config, report=report)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        compiled(*example_inputs, **example_kwargs)
    torch._dynamo.reset()
    return report
