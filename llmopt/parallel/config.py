"""The ``tensor_parallel`` option group: how the sharding pass splits a model.

``options={"tensor_parallel": {"size": 2}}`` (or ``2``, or a
:class:`TensorParallelConfig`), compiled in every rank of an initialised
``torch.distributed`` process group of that size
(``passes/shard_tensor_parallel.py`` does the splitting).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from llmopt.errors import LLMOptConfigError, check_choice, checked_fields

__all__ = ["EMBEDDING_MODES", "LM_HEAD_MODES", "TensorParallelConfig"]

# lm_head: "vocab_parallel" (each rank computes its slice of the vocabulary, then an
# all-gather) or "replicated" (every rank holds the whole matrix, no collective).
LM_HEAD_MODES = ("vocab_parallel", "replicated")
# embedding: "replicated" (every rank holds the table) or "vocab_parallel" (each rank
# its rows: a masked lookup, then an all-reduce).
EMBEDDING_MODES = ("replicated", "vocab_parallel")


@dataclass(frozen=True)
class TensorParallelConfig:
    """Attributes:
        size: number of ranks the model is split over; must equal the world
            size of the process group when the graph is compiled.
        lm_head: ``"vocab_parallel"`` (default) or ``"replicated"``.
        embedding: ``"replicated"`` (default) or ``"vocab_parallel"``.
    """

    size: int = 1
    lm_head: str = "vocab_parallel"
    embedding: str = "replicated"

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise LLMOptConfigError(
                f"tensor_parallel option 'size' must be a positive int (the number of ranks), got {self.size!r}"
            )
        check_choice("lm_head", self.lm_head, LM_HEAD_MODES, group="tensor_parallel")
        check_choice("embedding", self.embedding, EMBEDDING_MODES, group="tensor_parallel")

    @classmethod
    def from_options(cls, value: Any) -> Optional["TensorParallelConfig"]:
        """None stays None (no sharding); an int is the size; a dict names the fields."""
        if value is None or isinstance(value, TensorParallelConfig):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(size=value)
        if not isinstance(value, Mapping):
            raise LLMOptConfigError(
                "option 'tensor_parallel' must be None, an int (the size) or a dict with 'size', "
                f"'lm_head', 'embedding'; got {type(value).__name__}"
            )
        return cls(**checked_fields(cls, value, "tensor_parallel option"))
