"""Quality measurement: perplexity of a causal LM on a text.

Sliding windows, the Hugging Face recipe: windows of ``context_length``
tokens start every ``stride`` tokens, and each window scores only the tokens
the previous one did not, so every token but the first (which has no context)
is scored exactly once (with ``stride < context_length``; with equal values
the first token of each window has no context and is skipped). Each scored
token after the first window sees at least ``context_length - stride``
tokens of context. The numbers depend on both settings, so every result states them.

Works on any causal LM whose call ``model(ids)`` returns logits (a Hugging
Face output with ``.logits``, a tuple whose first item is the logits, or the
logits tensor), compiled or not.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from llmopt.calibration import read_text, tokenize  # noqa: F401  (part of this module's API)

DEFAULT_CONTEXT_LENGTH = 512
DEFAULT_STRIDE = 256
# Progress is shown by default when a text needs at least this many windows.
PROGRESS_WINDOWS = 4


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, in nats
    tokens_scored: int
    total_tokens: int
    context_length: int
    stride: int
    windows: int
    seconds: float

    def describe(self) -> str:
        return (
            f"perplexity {self.perplexity:.3f} over {self.tokens_scored} tokens "
            f"(context {self.context_length}, stride {self.stride}: each token scored once, "
            f"{self.windows} windows)"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def perplexity(
    model: Any,
    tokenizer: Any,
    text: "str | os.PathLike",
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    stride: int = DEFAULT_STRIDE,
    max_tokens: int | None = None,
    progress: bool | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` (a string, or a ``Path`` to read).

    ``max_tokens`` keeps only the first tokens of a long text. ``progress``
    (default: on when there are at least 4 windows) prints a progress line
    on stderr.
    """
    if isinstance(text, os.PathLike):
        text = read_text(text)
    tokens = tokenize(tokenizer, text)
    return perplexity_of_tokens(model, tokens, context_length, stride, max_tokens, progress)


@torch.no_grad()
def perplexity_of_tokens(
    model: Any,
    tokens: torch.Tensor,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    stride: int = DEFAULT_STRIDE,
    max_tokens: int | None = None,
    progress: bool | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on the token ids ``tokens`` (1-D, or ``(1, n)``)."""
    _check_window(context_length, stride)
    tokens = tokens.flatten()[:max_tokens] if max_tokens else tokens.flatten()
    if tokens.numel() < 2:
        raise ValueError(f"the text has {tokens.numel()} token(s); perplexity needs at least 2")
    windows = list(_windows(tokens.numel(), context_length, stride))
    show = len(windows) >= PROGRESS_WINDOWS if progress is None else progress
    device = _device_of(model)
    start = time.perf_counter()
    total_nll, scored = 0.0, 0
    for index, (begin, end, first) in enumerate(windows, 1):
        ids = tokens[begin:end].to(device)[None, :]
        log_probs = F.log_softmax(_logits(model(ids))[0].float(), dim=-1)
        # Token i is predicted by the logits at window position i - 1 - begin.
        targets = tokens[first:end].to(device)
        predicted = log_probs[first - 1 - begin:end - 1 - begin]
        total_nll -= predicted.gather(1, targets[:, None]).sum().item()
        scored += end - first
        if show:
            _progress(f"perplexity: window {index}/{len(windows)}, {scored} tokens scored", index == len(windows))
    nll = total_nll / scored
    return PerplexityResult(
        perplexity=math.exp(nll),
        nll=nll,
        tokens_scored=scored,
        total_tokens=tokens.numel(),
        context_length=context_length,
        stride=stride,
        windows=len(windows),
        seconds=time.perf_counter() - start,
    )


def _check_window(context_length: int, stride: int) -> None:
    if not isinstance(context_length, int) or context_length < 2:
        raise ValueError(f"context_length must be an integer >= 2, got {context_length!r}")
    if not isinstance(stride, int) or not 1 <= stride <= context_length:
        # A stride longer than the window would leave tokens unscored.
        raise ValueError(f"stride must be an integer in [1, context_length={context_length}], got {stride!r}")


def _windows(length: int, context_length: int, stride: int):
    """(begin, end, first scored token) per window; scored ranges tile [1, length)."""
    scored_until = 1  # token 0 has no context, so it is never scored
    for begin in range(0, length, stride):
        end = min(begin + context_length, length)
        # With stride == context_length a window's first token has no context
        # in it and is skipped: the count says so.
        first = max(scored_until, begin + 1)
        if end > first:
            yield begin, end, first
            scored_until = end
        if end == length:
            return


def _logits(output: Any) -> torch.Tensor:
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def _device_of(model: Any) -> torch.device:
    parameters = getattr(model, "parameters", None)
    first = next(parameters(), None) if callable(parameters) else None
    return first.device if first is not None else torch.device("cpu")


def _progress(message: str, last: bool) -> None:
    sys.stderr.write("\r" + message + ("\n" if last else ""))
    sys.stderr.flush()


# ---------------------------------------------------------------- compiled settings


@dataclass
class WeightBytes:
    """Bytes of the weights the compiled graphs read, filled in as graphs compile.

    The largest graph's figure is kept: recompiles (another window length)
    read the same weights again.
    """

    bytes: int = 0

    def add_graph(self, total: int) -> None:
        self.bytes = max(self.bytes, total)


def compile_with_llmopt(model: torch.nn.Module, options: "Mapping[str, Any] | None" = None):
    """``torch.compile(model, backend=llmopt)`` that also measures the weights each graph reads.

    Returns ``(compiled, WeightBytes)``. The measurement counts the model's
    parameters still read by the rewritten graph (tied ones once) plus the
    tensors passes installed on it (pruned or quantized weights).
    """
    from llmopt.passes.graph_utils import placeholder_sources
    from llmopt.rewriter.backend import llmopt_backend

    parameter_paths = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    record = WeightBytes()

    def backend(gm, example_inputs):
        sources = placeholder_sources(gm.graph)  # before the passes: they read the same table
        compiled = llmopt_backend(gm, example_inputs, options=options)
        record.add_graph(_graph_weight_bytes(gm, example_inputs, sources, parameter_paths))
        return compiled

    return torch.compile(model, backend=backend), record


def _graph_weight_bytes(gm, example_inputs, sources: dict[str, str], parameter_paths: set[str]) -> int:
    seen: set[int] = set()
    total = 0
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = [v for n, v in zip(placeholders, example_inputs) if n.users and sources.get(n.name) in parameter_paths]
    values += [_attr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"]
    for value in values:
        for tensor in _plain_tensors(value):
            key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)  # tied weights count once
            if key not in seen:
                seen.add(key)
                total += tensor.numel() * tensor.element_size()
    return total


def _attr(gm, target: str):
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _plain_tensors(value) -> list[torch.Tensor]:
    """The tensors holding ``value``'s data (inner tensors of a subclass such as 2:4 sparse)."""
    if not isinstance(value, torch.Tensor):
        return []
    flatten = getattr(type(value), "__tensor_flatten__", None)
    if flatten is None or type(value) in (torch.Tensor, torch.nn.Parameter):
        return [value]
    names, _ = value.__tensor_flatten__()
    return [t for name in names for t in _plain_tensors(getattr(value, name))]


def model_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of a module's parameters, tied ones counted once."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ---------------------------------------------------------------- settings and tables


@dataclass(frozen=True)
class Setting:
    """One row of a quality table: a dtype, then pruning and quantization.

    Structured pruning ("heads", "channels") is applied to a copy of the model
    (:func:`llmopt.pruning.prune_model`); unstructured / 2:4 pruning and
    quantization are backend options, so those settings are compiled.
    ``prune`` holds ``method``, ``sparsity`` and ``pattern``. Quantization
    with calibration (``quantize_method="gptq"``, or ``smoothquant`` for
    w8a8) quantizes first with :func:`llmopt.quantization.quantize_weights`
    and compiles with those weights (``quantized_weights``).
    """

    dtype: str = "float32"
    prune: Mapping[str, Any] | None = None
    quantize: str | None = None
    group_size: int | None = None
    compile: bool | None = None  # None: only when backend options need it
    lower: str = "eager"
    # int4: "rtn", "mse", "hqq", "gptq"; int8: "rtn", "mse" (None: what compiling does,
    # QuantConfig's data-free default)
    quantize_method: str | None = None
    quantize_skip: tuple[str, ...] = ()
    smoothquant: bool = False  # w8a8: SmoothQuant factors from the calibration text
    tune_steps: int = 0  # int4 with calibration: QuantConfig.tune_steps
    data_free: bool = False  # int4 "mse" without calibration (every input weighed alike)
    kernels: tuple[tuple[str, Any], ...] = ()  # the backend's ``kernels`` options, as (name, value) pairs

    @property
    def label(self) -> str:
        parts = [{"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(self.dtype, self.dtype)]
        if self.prune:
            p = self.prune
            parts.append(f"prune {p.get('method', 'magnitude')} {p.get('pattern', 'unstructured')} "
                         f"{p.get('sparsity', 0.5):.0%}")
        if self.quantize:
            parts.append(self.quantize + (f" g{self.group_size}" if self.group_size else ""))
            if self.quantize_method:
                parts.append(self.quantize_method + (" data-free" if self.data_free else ""))
            if self.smoothquant:
                parts.append("smoothquant")
            if self.quantize_skip:
                parts.append("(float: " + ", ".join(self.quantize_skip) + ")")
            if self.kernels:
                parts.append("[" + ", ".join(f"{k}={v}" for k, v in self.kernels) + "]")
        return " ".join(parts)

    @property
    def calibrated_quantization(self) -> bool:
        """Whether the weights are quantized from calibration statistics before compiling."""
        if not self.quantize:
            return False
        return self.smoothquant or self.quantize_method == "gptq" or (
            self.quantize_method == "mse" and self.quantize == "int4" and not self.data_free)

    @property
    def prequantized(self) -> bool:
        """Whether the weights are quantized before compiling: from calibration, or by a
        method named explicitly (compiling uses QuantConfig's default)."""
        return bool(self.quantize) and (self.calibrated_quantization or self.quantize_method is not None)

    @property
    def structured(self) -> bool:
        return bool(self.prune) and self.prune.get("pattern") in ("heads", "channels")

    def backend_options(self, calibration: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """Options for the llmopt backend; strict, so a pass that fails is an error, not a quiet no-op."""
        options: dict[str, Any] = {"lower": self.lower, "strict": True}
        if self.prune and not self.structured:
            options["prune"] = dict(self.prune, **({"calibration": calibration} if calibration else {}))
        if self.quantize:
            options["quantize"] = self.quantize
            if self.quantize_skip:
                options["quantize_skip"] = tuple(self.quantize_skip)
        if self.group_size:
            options["group_size"] = self.group_size
        if self.kernels:
            options["kernels"] = dict(self.kernels)
        return options

    @property
    def compiled(self) -> bool:
        needs = bool(self.quantize) or bool(self.prune and not self.structured)
        return needs if self.compile is None else self.compile


def evaluate(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    setting: Setting,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    stride: int = DEFAULT_STRIDE,
    calibration: torch.Tensor | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Perplexity of ``model`` under ``setting`` on ``tokens``: one table row (a dict).

    ``model`` is left as it is (a copy is made when the dtype or the layers
    change). ``calibration`` holds token ids for Wanda, GPTQ and SmoothQuant.
    ``seconds`` includes compiling, which happens on the first window, and
    quantizing from calibration (also reported alone as ``quantize_seconds``).
    """
    from llmopt.config import LLMOptConfig
    from llmopt.pruning import collect_activation_norms, prune_model

    work = _as_dtype(model, setting.dtype, copy=setting.structured)
    wanda = bool(setting.prune) and setting.prune.get("method") == "wanda"
    if wanda and calibration is None:
        raise ValueError("prune method 'wanda' needs calibration tokens (a calibration text)")
    norms = None
    if setting.structured:
        prune_model(work, setting.prune, calibration_text=calibration)
    elif wanda:
        norms = collect_activation_norms(work, calibration, context_length=context_length)
    start = time.perf_counter()
    quantize_seconds = None
    if setting.compiled:
        options = setting.backend_options(norms)
        if setting.prequantized:
            options["quantized_weights"] = _quantize_first(work, setting, calibration, context_length)
            quantize_seconds = time.perf_counter() - start
        LLMOptConfig.from_options(options)  # bad options fail here, before any compiling
        runner, weights = compile_with_llmopt(work, options)
    else:
        runner, weights = work, None
    result = perplexity_of_tokens(runner, tokens, context_length, stride, progress=progress)
    return {
        "setting": setting.label,
        **result.to_dict(),
        "seconds": time.perf_counter() - start,
        "quantize_seconds": quantize_seconds,
        "weight_bytes": weights.bytes if weights is not None else model_weight_bytes(work),
        "parameters": sum(p.numel() for p in work.parameters()),
        "compiled": setting.compiled,
        "dtype": setting.dtype,
        "prune": dict(setting.prune) if setting.prune else None,
        "quantize": setting.quantize,
        "group_size": setting.group_size,
        "quantize_method": setting.quantize_method,
        "quantize_skip": list(setting.quantize_skip),
        "smoothquant": setting.smoothquant,
        "resolved_method": _resolved_method(setting),
        "kernels": dict(setting.kernels),
    }


def _resolved_method(setting: Setting) -> str | None:
    """The rounding method the row's weights got (QuantConfig's default where none is named)."""
    if not setting.quantize:
        return None
    from llmopt.quantization import QuantConfig

    method = setting.quantize_method if setting.quantize in ("int4", "int8") else None
    return QuantConfig(setting.quantize, method=method).resolved_method(setting.calibrated_quantization)


def _quantize_first(model, setting: Setting, calibration, context_length: int):
    from llmopt.quantization import QuantConfig, quantize_weights, token_batches

    calibrated = setting.calibrated_quantization
    if calibrated and calibration is None:
        raise ValueError(f"{setting.label}: quantizing from calibration needs calibration tokens (a calibration text)")
    method = setting.quantize_method if setting.quantize in ("int4", "int8") else None
    sizes = {"group_size": setting.group_size} if setting.group_size else {}  # else QuantConfig's default
    config = QuantConfig(setting.quantize, skip=tuple(setting.quantize_skip), method=method,
                         tune_steps=setting.tune_steps, **sizes)
    batches = token_batches(calibration, context_length) if calibrated else None
    return quantize_weights(model, config, calibration=batches)


def _as_dtype(model: torch.nn.Module, dtype_name: str, copy: bool) -> torch.nn.Module:
    import copy as copying

    dtype = getattr(torch, dtype_name)
    current = next(model.parameters()).dtype
    if dtype == current and not copy:
        return model
    return copying.deepcopy(model).to(dtype)


TABLE_COLUMNS = ("setting", "perplexity", "tokens scored", "context/stride", "weight MB", "parameters", "seconds")


def format_table(rows: list[Mapping[str, Any]]) -> str:
    """A markdown table of :func:`evaluate` rows (with a "vs fp32" column where rows have ``vs_fp32``)."""
    relative = any("vs_fp32" in row for row in rows)
    columns = TABLE_COLUMNS[:2] + (("vs fp32",) if relative else ()) + TABLE_COLUMNS[2:]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        versus = (f"{row['vs_fp32']:+.2%}" if "vs_fp32" in row else "-",) if relative else ()
        cells = (
            row["setting"],
            f"{row['perplexity']:.3f}",
            *versus,
            str(row["tokens_scored"]),
            f"{row['context_length']}/{row['stride']}",
            f"{row['weight_bytes'] / 1e6:.1f}",
            f"{row['parameters'] / 1e6:.1f}M",
            f"{row['seconds']:.1f}",
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
