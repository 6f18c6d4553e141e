"""PruneConfig: what to prune, how to score it, and how much."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from llmopt.errors import LLMOptConfigError, checked_fields

METHODS = ("magnitude", "wanda")
PATTERNS = ("unstructured", "2:4", "heads", "channels")
# Patterns that change layer shapes: done on the nn.Module by prune_model,
# not inside the backend (see llmopt/pruning/__init__.py).
STRUCTURED_PATTERNS = ("heads", "channels")
DEFAULT_SKIP = ("lm_head",)


@dataclass(frozen=True)
class PruneConfig:
    """Pruning settings.

    Attributes:
        method: ``"magnitude"`` scores a weight by ``|W|``; ``"wanda"`` by
            ``|W| * ||X||_2`` with ``||X||_2`` the norm of its input channel over
            calibration tokens.
        sparsity: fraction of weights (unstructured), KV-head groups (heads) or
            MLP channels (channels) removed. ``"2:4"`` is always 0.5.
        pattern: ``"unstructured"``, ``"2:4"`` (two of every four consecutive
            input weights are zero), ``"heads"`` or ``"channels"``.
        calibration: for Wanda, the activation norms of each linear layer's
            input, as returned by :func:`llmopt.pruning.collect_activation_norms`
            (module name -> 1-D tensor of ``in_features``).
        skip: linear layers whose module name contains one of these strings are
            left dense (the output head by default).
    """

    method: str = "magnitude"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    calibration: Mapping[str, torch.Tensor] | None = field(default=None, compare=False, hash=False, repr=False)
    skip: tuple[str, ...] = DEFAULT_SKIP

    def __post_init__(self) -> None:
        _check_choice("method", self.method, METHODS)
        _check_choice("pattern", self.pattern, PATTERNS)
        sparsity = self.sparsity
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 < sparsity < 1:
            raise LLMOptConfigError(f"prune option 'sparsity' must be a number in (0, 1), got {sparsity!r}")
        if self.pattern == "2:4" and not math.isclose(sparsity, 0.5):
            raise LLMOptConfigError(f"prune pattern '2:4' has sparsity 0.5 by definition, got sparsity={sparsity!r}")
        if self.calibration is not None and not isinstance(self.calibration, Mapping):
            raise LLMOptConfigError(
                "prune option 'calibration' must map module names to activation norms "
                "(llmopt.pruning.collect_activation_norms), got " + type(self.calibration).__name__
            )
        skip = self.skip
        if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
            raise LLMOptConfigError(f"prune option 'skip' must be a list of module-name parts, got {skip!r}")
        object.__setattr__(self, "skip", tuple(skip))
        object.__setattr__(self, "sparsity", float(sparsity))

    @classmethod
    def from_options(cls, options: "Mapping[str, Any] | PruneConfig") -> "PruneConfig":
        """A PruneConfig from a dict (or an existing PruneConfig), unknown keys rejected."""
        if isinstance(options, PruneConfig):
            return options
        if not isinstance(options, Mapping):
            raise LLMOptConfigError(
                f"option 'prune' must be None, a dict or a PruneConfig, got {type(options).__name__}"
            )
        return cls(**checked_fields(cls, options, "prune option"))

    @property
    def structured(self) -> bool:
        return self.pattern in STRUCTURED_PATTERNS

    def skips(self, module_name: str) -> bool:
        return any(part in module_name for part in self.skip)

    def describe(self) -> str:
        return f"{self.method} {self.pattern} {self.sparsity:.0%}"


def backend_prune_config(options: "Mapping[str, Any] | PruneConfig") -> PruneConfig:
    """The ``prune`` option of the backend: only patterns a graph pass can apply."""
    config = PruneConfig.from_options(options)
    if config.structured:
        raise LLMOptConfigError(
            f"option 'prune': pattern {config.pattern!r} removes whole heads or channels, which changes "
            "shapes baked into the traced graph; apply llmopt.pruning.prune_model(model, PruneConfig(...)) "
            "before torch.compile (the backend handles 'unstructured' and '2:4')"
        )
    if config.method == "wanda" and config.calibration is None:
        raise LLMOptConfigError(
            "option 'prune': method 'wanda' needs 'calibration': the activation norms from "
            "llmopt.pruning.collect_activation_norms(model, tokens)"
        )
    return config


def _check_choice(option: str, value: Any, choices) -> None:
    if value not in choices:
        raise LLMOptConfigError(f"prune option {option!r} got {value!r}; valid choices are {_quoted(choices)}")


def _quoted(names) -> str:
    return ", ".join(repr(n) for n in names)
