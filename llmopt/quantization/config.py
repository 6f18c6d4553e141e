"""What to quantize and how: :class:`QuantConfig`, checked like the backend's options.

The compile options ``quantize``, ``group_size`` and ``quantize_skip`` map to
``mode``, ``group_size`` and ``skip``; errors name the compile option.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from llmopt.errors import LLMOptConfigError

MODES = ("int8", "int4", "fp8", "w8a8")
METHODS = ("rtn", "mse", "hqq", "gptq")  # how int4 grids are chosen and weights rounded (quantization/int4.py)
# int4 without calibration: what `quantize="int4"` does while compiling. Round to nearest:
# "hqq" and its lp objective did worse on a held-out play (docs/PERFORMANCE.md, Quality).
DEFAULT_DATA_FREE_METHOD = "rtn"
INT8_METHODS = ("rtn", "mse")
# int8: each row's clipping range of least squared error (the unclipped max |w| is one of the
# candidates, so no row rounds worse than with "rtn"); on a held-out play it lost less than "rtn"
# (+0.74% against +0.82%, docs/PERFORMANCE.md, Quality), at the same size and speed.
DEFAULT_INT8_METHOD = "mse"
GROUP_SIZES = (32, 64, 128, 256)  # what PyTorch's CPU int4 kernel accepts; the Triton kernel too
# The default int4 group: data-free int4 at 64 or more loses far more quality
# (docs/PERFORMANCE.md, Quality); 32 is also the native kernel's block.
DEFAULT_GROUP_SIZE = 32
REGEX_PREFIX = "re:"
DEFAULT_TUNE_LR = 3e-4  # Adam's step size for the int4 grids (quantization/tune.py)


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize the linear layers of a model.

    Attributes:
        mode: ``"int8"`` (weight-only, symmetric, per output channel),
            ``"int4"`` (weight-only, asymmetric, group-wise along the input
            features), ``"fp8"`` (e4m3 weights, per-channel scales) or
            ``"w8a8"`` (int8 weights and per-token int8 activations).
        group_size: int4 group length along the input features (32 (default), 64, 128, 256).
        skip: layer-name patterns left in float. A glob matches the dotted
            module path (``"lm_head"``, ``"model.layers.0.*"``) or its tail
            (``"down_proj"`` matches every ``....mlp.down_proj``); a pattern
            starting with ``"re:"`` is a regular expression searched in the path.
        smoothquant_alpha: migration strength for w8a8 with calibration
            (0 keeps the activations' outliers, 1 moves them all to the weights).
        method: how weights are rounded. int4: ``"rtn"`` (each group's
            min..max grid, nearest level), ``"mse"`` (per-group grid of least
            squared error; weighted by the inputs' mean square with
            calibration), ``"hqq"`` (the ``"mse"`` grid refined by
            half-quadratic optimisation of an lp, p < 1, rounding error;
            data-free) or ``"gptq"`` (``"mse"`` grids, then GPTQ's error
            compensation; needs calibration). None (default): ``"gptq"`` when
            calibration batches are given, else ``"rtn"`` (what
            ``quantize="int4"`` does while compiling). int8: ``"mse"``
            (default: each row's clipping range of least squared error) or
            ``"rtn"`` (each row's max ``|w|``). fp8 and w8a8 only round
            to nearest (None or ``"rtn"``).
        sequential: GPTQ one group of layers at a time, each from the inputs
            that the layers already rounded make (``"true sequential"``;
            slower, slightly better on SmolLM2).
        tune_steps: after rounding, train the int4 grids (the levels kept) for
            this many calibration windows so that the quantized model's
            next-token distributions match the float one's
            (:mod:`llmopt.quantization.tune`); 0 (default) does not.
        tune_lr: the tuning's learning rate (Adam), positive.
    """

    mode: str
    group_size: int = DEFAULT_GROUP_SIZE
    skip: tuple[str, ...] = field(default_factory=tuple)
    smoothquant_alpha: float = 0.5
    method: Optional[str] = None
    sequential: bool = False
    tune_steps: int = 0
    tune_lr: float = DEFAULT_TUNE_LR

    def __post_init__(self) -> None:
        check_mode(self.mode)
        check_group_size(self.group_size)
        object.__setattr__(self, "skip", check_skip(self.skip))
        alpha = self.smoothquant_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise LLMOptConfigError(f"smoothquant_alpha must be a number in [0, 1], got {alpha!r}")
        if self.method is not None and self.method not in METHODS:
            raise LLMOptConfigError(
                f"quantization method {self.method!r}; valid choices are None, {', '.join(repr(m) for m in METHODS)}"
            )
        steps = self.tune_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise LLMOptConfigError(f"tune_steps must be an integer >= 0, got {steps!r}")
        lr = self.tune_lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0 or lr != lr or lr == float("inf"):
            raise LLMOptConfigError(f"tune_lr must be a positive finite number, got {lr!r}")
        if steps and self.mode != "int4":
            raise LLMOptConfigError(f"tune_steps tunes int4 grids; {self.mode} has none")
        if self.method not in (None, *INT8_METHODS) and self.mode == "int8":
            raise LLMOptConfigError(f"quantization method {self.method!r} is for int4; int8 takes "
                                    f"{', '.join(repr(m) for m in INT8_METHODS)}")
        if self.method not in (None, "rtn") and self.mode not in ("int4", "int8"):
            raise LLMOptConfigError(f"quantization method {self.method!r} is for int4; {self.mode} rounds to nearest")

    def resolved_method(self, calibrated: bool) -> str:
        """The method used, given whether calibration batches are at hand."""
        if self.mode not in ("int4", "int8"):
            return "rtn"
        if self.method is not None:
            return self.method
        if self.mode == "int8":
            return DEFAULT_INT8_METHOD
        return "gptq" if calibrated else DEFAULT_DATA_FREE_METHOD

    @classmethod
    def from_llmopt(cls, config: Any) -> "QuantConfig":
        """The quantization part of an :class:`llmopt.LLMOptConfig`."""
        return cls(mode=config.quantize, group_size=config.group_size, skip=config.quantize_skip)

    @property
    def label(self) -> str:
        """Short description for reports, e.g. ``"int4 g128"``."""
        return f"int4 g{self.group_size}" if self.mode == "int4" else self.mode

    def skip_pattern(self, name: str) -> Optional[str]:
        """The first ``skip`` pattern that matches layer ``name``, or None."""
        return next((p for p in self.skip if name_matches(name, p)), None)


def name_matches(name: str, pattern: str) -> bool:
    if pattern.startswith(REGEX_PREFIX):
        return re.search(pattern[len(REGEX_PREFIX):], name) is not None
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def check_mode(mode: Any, allow_none: bool = False) -> None:
    if mode is None and allow_none:
        return
    if mode not in MODES:
        choices = (None, *MODES) if allow_none else MODES
        raise LLMOptConfigError(
            f"option 'quantize' got {mode!r}; valid choices are {', '.join(repr(m) for m in choices)}"
        )


def check_group_size(group_size: Any) -> None:
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise LLMOptConfigError(
            f"option 'group_size' got {group_size!r}; valid choices are "
            f"{', '.join(str(g) for g in GROUP_SIZES)}"
        )


def check_skip(patterns: Any) -> tuple[str, ...]:
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise LLMOptConfigError(
            f"option 'quantize_skip' must be a list of layer-name patterns (globs, or 're:' + a "
            f"regular expression), got {patterns!r}"
        )
    for pattern in patterns:
        if pattern.startswith(REGEX_PREFIX):
            try:
                re.compile(pattern[len(REGEX_PREFIX):])
            except re.error as error:
                raise LLMOptConfigError(
                    f"option 'quantize_skip': bad regular expression {pattern!r}: {error}"
                ) from None
    return tuple(patterns)


def check_backend_options(config: Any) -> tuple[str, ...]:
    """Check the quantization options of an LLMOptConfig; returns ``quantize_skip`` as a tuple."""
    check_mode(config.quantize, allow_none=True)
    check_group_size(config.group_size)
    skip = check_skip(config.quantize_skip)
    weights = config.quantized_weights
    if weights is not None:
        from llmopt.quantization.layers import QuantizedWeights

        if not isinstance(weights, (str, os.PathLike, QuantizedWeights)):
            raise LLMOptConfigError(
                f"option 'quantized_weights' must be a file path or a QuantizedWeights, got {type(weights).__name__}"
            )
        if config.quantize is None:
            raise LLMOptConfigError(
                "option 'quantized_weights' needs option 'quantize' (the mode the weights were saved in)"
            )
    return skip
