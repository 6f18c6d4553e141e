"""The ``tensorrt`` option group: :class:`TensorRTSettings`, validated where it is defined.

Kept apart from :mod:`llmopt.backends.tensorrt` (the partition estimate and the
call into torch-tensorrt) so that :mod:`llmopt.config` composes it with a plain
import: this module imports only torch and :mod:`llmopt.errors`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Collection, Mapping, Optional

import torch

from llmopt.errors import LLMOptConfigError, checked_fields

__all__ = ["DEFAULT_MIN_BLOCK_SIZE", "PRECISIONS", "TensorRTSettings", "llmopt_op_names"]

# Torch-TensorRT's own default for min_block_size: smaller TensorRT blocks
# cost more in engine switches than they gain, so they stay in PyTorch.
DEFAULT_MIN_BLOCK_SIZE = 5

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class TensorRTSettings:
    """The ``tensorrt`` option of the llmopt backend (with ``lower="tensorrt"``).

    Attributes:
        precision: None (default): layers run in the dtypes the graph has (cast
            the model, e.g. ``model.half()``, to choose). ``"fp16"`` / ``"bf16"``:
            TensorRT may run the layers of an fp32 model in that precision
            (releases with ``enabled_precisions`` only; strongly typed releases
            refuse it when lowering). ``"fp32"``: keep fp32 layers in fp32.
        workspace_size: bytes TensorRT may use as scratch while building and
            running an engine; 0 leaves it to TensorRT.
        min_block_size: the fewest operators a TensorRT engine may hold; shorter
            runs of supported operators stay in PyTorch.
        optimization_level: TensorRT builder optimization level 0-5 (higher
            builds longer, searching more kernels); None is TensorRT's default.
        torch_executed_ops: more ops to keep in PyTorch, as qualified ATen names
            (``"torch.ops.aten.embedding.default"``), in addition to llmopt's ops.
    """

    precision: Optional[str] = None
    workspace_size: int = 0
    min_block_size: int = DEFAULT_MIN_BLOCK_SIZE
    optimization_level: Optional[int] = None
    torch_executed_ops: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.precision is not None and self.precision not in PRECISIONS:
            raise LLMOptConfigError(
                f"tensorrt option 'precision' got {self.precision!r}; valid choices are None, "
                + ", ".join(repr(p) for p in PRECISIONS)
            )
        _check_int("workspace_size", self.workspace_size, low=0)
        _check_int("min_block_size", self.min_block_size, low=1)
        if self.optimization_level is not None:
            _check_int("optimization_level", self.optimization_level, low=0, high=5)
        ops = self.torch_executed_ops
        if isinstance(ops, str) or not all(isinstance(op, str) for op in ops):
            raise LLMOptConfigError(
                f"tensorrt option 'torch_executed_ops' must be a list of op names, got {ops!r}"
            )
        object.__setattr__(self, "torch_executed_ops", tuple(ops))

    @classmethod
    def from_options(cls, options: "Mapping[str, Any] | TensorRTSettings | None") -> "TensorRTSettings":
        """Build the settings from the dict given as ``options={"tensorrt": {...}}``."""
        if options is None:
            return cls()
        if isinstance(options, TensorRTSettings):
            return options
        if not isinstance(options, Mapping):
            raise LLMOptConfigError(
                f"option 'tensorrt' must be a dict of TensorRT settings, got {type(options).__name__}"
            )
        return cls(**checked_fields(cls, options, "tensorrt option"))

    def executed_in_pytorch(self) -> frozenset[str]:
        """Qualified names of the ops kept out of TensorRT: llmopt's, then the user's."""
        return frozenset(llmopt_op_names()) | frozenset(self.torch_executed_ops)

    def compile_options(
        self, available: Collection[str], *, pass_through_build_failures: bool = False
    ) -> tuple[dict[str, Any], list[str]]:
        """The ``options`` for Torch-TensorRT's backend, and what this version cannot take.

        ``available`` is the set of field names of the installed
        ``torch_tensorrt.dynamo.CompilationSettings``: the settings changed
        between releases (older ones have ``enabled_precisions``; newer ones,
        built on strongly typed TensorRT, drop it), and
        Torch-TensorRT silently ignores options it does not know, so they are
        left out here and returned as the second value for a warning.
        ``pass_through_build_failures`` (llmopt's ``strict``) makes a failed
        engine build raise instead of falling back to PyTorch quietly.
        """
        wanted: dict[str, Any] = {
            "min_block_size": self.min_block_size,
            "workspace_size": self.workspace_size,
            "torch_executed_ops": set(self.executed_in_pytorch()),
            "pass_through_build_failures": pass_through_build_failures,
        }
        if self.optimization_level is not None:
            wanted["optimization_level"] = self.optimization_level
        wanted.update(self._precision_options(available))
        options = {k: v for k, v in wanted.items() if k in available}
        ignored = sorted(k for k in wanted if k not in available)
        return options, ignored

    def _precision_options(self, available: Collection[str]) -> dict[str, Any]:
        if self.precision is None:
            return {}  # the graph's own dtypes decide, in every release
        dtype = PRECISIONS[self.precision]
        if "enabled_precisions" in available:
            options: dict[str, Any] = {"enabled_precisions": {dtype}}
            if "use_explicit_typing" in available:
                # Releases with both refuse enabled_precisions under explicit typing.
                options["use_explicit_typing"] = False
            return options
        if self.precision == "fp32":
            return {}  # strongly typed: fp32 layers stay fp32
        # Strongly typed releases (no enabled_precisions) do have an autocast
        # pass, but it reads reference outputs collected only on their
        # torch.export path, not on the torch.compile path used here.
        raise RuntimeError(
            f"this torch-tensorrt builds strongly typed engines (the graph's dtypes decide): "
            f"tensorrt option precision={self.precision!r} cannot be honoured; cast the model "
            f"to {dtype} instead and leave 'precision' unset"
        )


def _check_int(name: str, value: Any, *, low: int, high: Optional[int] = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise LLMOptConfigError(f"tensorrt option {name!r} must be an integer {bound}, got {value!r}")


def llmopt_op_names() -> list[str]:
    """``torch.ops.llmopt.<op>.<overload>`` for every llmopt op registered now.

    Qualified-name strings, the spelling Torch-TensorRT's partitioner compares
    node targets with (and the one that survives pickling its settings).
    Every op a rewritten graph can hold is registered by then: the passes
    import the kernels that define them.
    """
    names = []
    for qualified in sorted(torch._C._dispatch_get_all_op_names()):
        namespace, _, op = qualified.partition("::")
        if namespace != "llmopt":
            continue
        packet = getattr(torch.ops.llmopt, op)
        names += [f"torch.ops.llmopt.{op}.{overload}" for overload in packet.overloads()]
    return names
