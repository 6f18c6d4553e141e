"""The ``paging`` option group: :class:`PagingOptions`, validated where it is defined.

``options={"paging": {"enabled": True}}`` (or a :class:`PagingOptions`) turns on
``passes/page_kv_cache.py``: each fused attention reads and writes the serving
runtime's paged KV cache. ``options={"paged_kv": True}`` is the documented flat
shorthand for the same thing (the runtime's model runner sets it); giving both
with different values is an error.

Which implementation a paged site runs is not here: it is the ``kernels``
group's ``paged_attention`` (and ``native``), like every other kernel choice.

This module sits in the options layer (below the passes, beside
``backends/tensorrt_settings.py``): it imports only :mod:`llmopt.errors`, so
:mod:`llmopt.config` composes it with a plain import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from llmopt.errors import LLMOptConfigError, check_bool, checked_fields

__all__ = ["PagingOptions"]


@dataclass(frozen=True)
class PagingOptions:
    """Attributes:
        enabled: rewrite each fused attention into
            ``llmopt::paged_attention_layer`` (the serving runtime's paged KV
            cache). A graph compiled so runs only inside llmopt's serving
            runtime (``llmopt.LLM``, the engine), which publishes the step's
            paged context; the model is then called with one packed row of
            tokens (see ``passes/page_kv_cache.py``).
    """

    enabled: bool = False

    def __post_init__(self) -> None:
        check_bool("enabled", self.enabled, group="paging")

    @classmethod
    def from_options(cls, options: "Mapping[str, Any] | PagingOptions | None",
                     paged_kv: Optional[bool] = None) -> "PagingOptions":
        """The group from ``options={"paging": {...}}`` and the flat ``paged_kv`` shorthand
        (None: not given)."""
        if paged_kv is not None:
            check_bool("paged_kv", paged_kv)
        if options is None:
            return cls(enabled=bool(paged_kv))
        if isinstance(options, PagingOptions):
            group = options
        elif isinstance(options, Mapping):
            group = cls(**checked_fields(cls, options, "paging option"))
        else:
            raise LLMOptConfigError(
                f"option 'paging' must be a dict of paging options, got {type(options).__name__}")
        if paged_kv is not None and paged_kv != group.enabled:
            raise LLMOptConfigError(
                f"option 'paged_kv'={paged_kv!r} contradicts paging option 'enabled'={group.enabled!r}; "
                "'paged_kv' is shorthand for paging={'enabled': ...}: give one of them")
        return group
