"""User-facing options of the llmopt backend, as one validated dataclass.

``torch.compile(model, backend="llmopt", options={...})`` hands its ``options``
dict to the backend, which turns it into an :class:`LLMOptConfig` here. Every
key and value is checked so that a typo fails loudly instead of being ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from llmopt.backends.tensorrt_settings import TensorRTSettings
from llmopt.errors import LLMOptConfigError, check_bool, checked_fields, quoted
from llmopt.kernels.options import KernelOptions
from llmopt.parallel.config import TensorParallelConfig
from llmopt.passes.paging_options import PagingOptions
from llmopt.pruning.config import backend_prune_config
from llmopt.quantization.config import DEFAULT_GROUP_SIZE, check_backend_options

__all__ = ["LLMOptConfig", "LLMOptConfigError", "PASS_NAMES", "checked_fields"]

# Lowering targets the rewritten graph can be handed to. "onnx" is named so
# that its error can point to the ONNX export, which is not a torch.compile
# lowering (it writes a file rather than returning something to run).
LOWERING_TARGETS = ("inductor", "eager", "tensorrt", "onnx")
AVAILABLE_LOWERING_TARGETS = ("inductor", "eager", "tensorrt")

# The pipeline's passes, in order (rewriter/pipeline.py's PIPELINE checks it has
# exactly these): named here so that 'disable_passes' is checked without
# importing the passes.
PASS_NAMES = ("fuse_attention", "shard_tensor_parallel", "page_kv_cache", "prune_linear", "quantize_linear",
              "route_dense_linear", "eliminate_dead_code")


@dataclass(frozen=True)
class LLMOptConfig:
    """Options of the llmopt backend.

    Attributes:
        lower: where the rewritten graph goes: ``"inductor"`` (default) hands
            it to ``torch._inductor.compile_fx``; ``"eager"`` runs it as is;
            ``"tensorrt"`` hands it to Torch-TensorRT (``llmopt[tensorrt]``,
            CUDA, inference only; see ``backends/tensorrt.py``).
        tensorrt: settings for ``lower="tensorrt"``: None, or a dict /
            ``TensorRTSettings`` with ``precision``, ``workspace_size``,
            ``min_block_size``, ``optimization_level``, ``torch_executed_ops``.
        strict: if True, a pass or lowering that fails raises; by default it
            warns and the graph runs without that step.
        attention: rewrite attention regions to ``llmopt::attention``.
        disable_passes: names of pipeline passes to skip.
        verify: after each pass, re-run the graph on fake tensors and check
            its outputs keep their shapes and dtypes; a pass that breaks
            this is undone (or raises, with ``strict``).
        paging: the paging pass: None, or a dict / :class:`PagingOptions`
            (``enabled``): rewrite each fused attention to read and write the
            serving runtime's paged KV cache (``llmopt::paged_attention_layer``);
            the runtime calls the model with packed ``input_ids`` and
            ``position_ids`` (see ``passes/page_kv_cache.py``).
        paged_kv: the flat shorthand for ``paging={"enabled": ...}`` (the
            runtime's model runner sets it); after validation it mirrors
            ``paging.enabled``. Both given with different values is an error.
        prune: prune linear weights: None (default), or a dict / PruneConfig
            with ``method`` ("magnitude", "wanda"), ``sparsity`` and
            ``pattern`` ("unstructured", "2:4"); heads and channels are
            :func:`llmopt.pruning.prune_model` (see ``llmopt/pruning``).
        quantize: quantize the weights of linear layers: None (default),
            ``"int8"`` / ``"int4"`` (weight-only), ``"fp8"`` (e4m3 weights;
            emulated on CPU) or ``"w8a8"`` (int8 weights and activations); see
            ``passes/quantize_linear.py`` and ``llmopt/quantization``.
        group_size: int4 group length along the input features: 32 (default),
            64, 128 or 256 (the default is the one whose data-free int4 holds
            its quality: docs/PERFORMANCE.md, Quality).
        quantize_skip: layer-name patterns kept in float (globs on the module
            path or its tail, e.g. ``"lm_head"``; ``"re:<regex>"``); by
            default every linear layer is quantized.
        quantized_weights: weights quantized and saved before
            (``llmopt.quantization.save_quantized``), as a file path or a
            ``QuantizedWeights``: installed as they are, not re-quantized.
        kernels: which implementation each op runs: a dict /
            :class:`llmopt.kernels.options.KernelOptions` (``attention``,
            ``paged_attention``, ``native``, ``quantized_linear``,
            ``int4_cpu_kernel``, ``quant_cpu_dtype``, ``merge_siblings``), over
            the environment overrides ``LLMOPT_ATTENTION_IMPL``, ``LLMOPT_NATIVE``,
            ``LLMOPT_QUANT_IMPL``, ``LLMOPT_INT4_CPU_KERNEL``,
            ``LLMOPT_QUANT_CPU_DTYPE`` read once here.
            Resolved per site when the graph is compiled and recorded in the
            Report (see ``kernels/dispatch.py``).
        tensor_parallel: split the model over the ranks of an initialised
            ``torch.distributed`` process group: None (default), the size, or a
            dict / :class:`llmopt.parallel.config.TensorParallelConfig` (``size``,
            ``lm_head``, ``embedding``); see ``passes/shard_tensor_parallel.py``.

    Each option group is validated by its own dataclass, in its feature's
    package: ``prune`` (``pruning/config.py``), ``quantize``/``group_size``/
    ``quantize_skip`` (``quantization/config.py``), ``tensorrt``
    (``backends/tensorrt_settings.py``), ``kernels`` (``kernels/options.py``),
    ``paging``/``paged_kv`` (``passes/paging_options.py``);
    the error type and shared checks are in the leaf ``llmopt/errors.py``.
    """

    lower: str = "inductor"
    strict: bool = False
    attention: bool = True
    disable_passes: tuple[str, ...] = field(default_factory=tuple)
    verify: bool = True
    paged_kv: Optional[bool] = None  # None: not given (then paging decides)
    paging: Any = None
    prune: Any = None
    quantize: Optional[str] = None
    group_size: int = DEFAULT_GROUP_SIZE
    quantize_skip: tuple[str, ...] = field(default_factory=tuple)
    quantized_weights: Any = None
    tensorrt: Any = None
    kernels: Any = None
    tensor_parallel: Any = None

    def __post_init__(self) -> None:
        _check_choice("lower", self.lower, LOWERING_TARGETS)
        if self.lower == "onnx":
            raise LLMOptConfigError(
                "option 'lower': 'onnx' is not a torch.compile lowering; export the model with "
                "llmopt.export_onnx(model, ...) instead"
            )
        if self.lower not in AVAILABLE_LOWERING_TARGETS:
            raise LLMOptConfigError(
                f"option 'lower': target {self.lower!r} is not available in this "
                f"version of llmopt; choose one of {_quoted(AVAILABLE_LOWERING_TARGETS)}"
            )
        for name in ("strict", "attention", "verify"):
            check_bool(name, getattr(self, name))
        paging = PagingOptions.from_options(self.paging, paged_kv=self.paged_kv)
        object.__setattr__(self, "paging", paging)
        object.__setattr__(self, "paged_kv", paging.enabled)
        if self.prune is not None:
            object.__setattr__(self, "prune", backend_prune_config(self.prune))
        object.__setattr__(self, "kernels", KernelOptions.from_options(self.kernels))
        object.__setattr__(self, "tensor_parallel", TensorParallelConfig.from_options(self.tensor_parallel))
        object.__setattr__(self, "quantize_skip", check_backend_options(self))
        if self.tensorrt is not None:
            if self.lower != "tensorrt":
                raise LLMOptConfigError(
                    f"option 'tensorrt' applies only with lower='tensorrt', not lower={self.lower!r}"
                )
            object.__setattr__(self, "tensorrt", TensorRTSettings.from_options(self.tensorrt))
        disabled = self.disable_passes
        if isinstance(disabled, str) or not all(isinstance(p, str) for p in disabled):
            raise LLMOptConfigError(
                f"option 'disable_passes' must be a list of pass names, got {disabled!r}"
            )
        object.__setattr__(self, "disable_passes", tuple(disabled))
        for name in self.disable_passes:
            _check_choice("disable_passes", name, PASS_NAMES)

    @classmethod
    def from_options(cls, options: "Mapping[str, Any] | LLMOptConfig | None") -> "LLMOptConfig":
        """Build a config from what ``torch.compile(options=...)`` passed."""
        if options is None:
            return cls()
        if isinstance(options, LLMOptConfig):
            return options
        if not isinstance(options, Mapping):
            raise LLMOptConfigError(
                f"llmopt options must be a dict, got {type(options).__name__}"
            )
        return cls(**checked_fields(cls, options, "llmopt option"))

    def replace(self, **changes: Any) -> "LLMOptConfig":
        # paged_kv mirrors paging.enabled: changing one of them re-derives the other.
        if "paged_kv" in changes and "paging" not in changes:
            changes["paging"] = None
        elif "paging" in changes and "paged_kv" not in changes:
            changes["paged_kv"] = None
        return dataclasses.replace(self, **changes)


def _check_choice(option: str, value: Any, choices) -> None:
    if value not in choices:
        raise LLMOptConfigError(f"option {option!r} got {value!r}; valid choices are {quoted(choices)}")


_quoted = quoted
