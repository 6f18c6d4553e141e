"""Activation-aware equivalent scaling (the AWQ idea, Lin et al., 2023), folded into the float model.

A linear layer computes ``x W^T = (x / s) (W diag(s))^T`` for any positive
per-input-channel ``s``. Quantizing ``W diag(s)`` instead of ``W`` makes the
columns with a large ``s`` relatively finer on their group's grid: choosing
``s`` large where the activations are large (``s = mean|x|^alpha``) protects
the weights whose rounding error the output feels most. The ``x / s`` part is
folded into whatever makes ``x``, so no kernel or storage format changes:

* q/k/v inputs: ``input_layernorm.weight / s``, q, k, v weight columns ``* s``
  (one ``s`` for the three);
* gate/up inputs: the same with ``post_attention_layernorm.weight``;
* down inputs: ``up_proj`` weight rows (and bias) ``/ s``, down columns
  ``* s`` (exact: down's input is ``act(gate) * up``);
* o inputs (``scale_o_proj=True``): ``v_proj`` rows ``/ s``, o columns ``* s``.
  o's input channel ``(query head h, dim d)`` comes from v's row
  ``(kv head h // group, d)``, so ``s`` is shared by the query heads of one kv
  head (it is computed from their mean activation magnitudes).

The float model computes the same function afterwards (up to fp32 rounding);
quantizing it (GPTQ, grid tuning: :func:`llmopt.quantization.quantize_weights`)
is where it differs. ``alpha`` is chosen per group of layers and per decoder
block by a grid search: for each candidate, the group's weights are
quantized with scales ``s`` and the float output of the part of the block
they feed (the attention module for q/k/v, the MLP for gate/up, the layer
itself for down and o) is compared with the quantized one on the calibration
inputs; the least squared error wins. ``alpha = 0`` (``s = 1``, no scaling)
is always a candidate, so the search never picks scales that make that error
worse. The candidates are quantized by the pipeline's own int4 GPTQ (the
``"mse"`` grids, then GPTQ from the Hessian of the scaled inputs) by default:
AWQ's cheap stand-in, round to nearest on min..max grids (``search="rtn"``),
picks much larger alphas (0.3-0.5 on SmolLM2 at g128), which do not suit
GPTQ, while the GPTQ-judged search picks 0-0.3. On SmolLM2 the effect is
within what any small change of the grids does to its perplexity
(bench/quality.py's ``awq`` rows; docs/PERFORMANCE.md), so nothing applies
it by default.

Blocks run one at a time on cached hidden states
(:class:`~llmopt.quantization.calibration.BlockInputs`), each on the outputs
of the blocks before it (already transformed: the same values).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmopt.quantization import int4
from llmopt.quantization.calibration import BlockInputs, UnsupportedBlocks, find_blocks
from llmopt.quantization.config import check_group_size

ALPHAS = tuple(round(0.1 * i, 2) for i in range(11))  # 0, 0.1, ..., 1
SEARCH_QUANTIZERS = ("gptq", "rtn")  # how candidate scales are judged (see _Quantizer)
_MIN_MAGNITUDE = 1e-4  # mean |x| floor: a channel never active would get s -> 0

# The layers of a decoder block (Llama / Mistral / Qwen2 naming), relative to the block.
_REQUIRED = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
             "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass
class GroupScaling:
    """The scaling chosen for one group of layers."""

    alpha: float
    error: float  # mean squared output error, search quantizer, chosen scales
    unscaled_error: float  # the same without scaling (alpha 0)

    @property
    def gain(self) -> float:
        """Relative error reduction against no scaling (0: none)."""
        return 1.0 - self.error / self.unscaled_error if self.unscaled_error > 0 else 0.0


@dataclass
class ScalingReport:
    """What :func:`apply_activation_scaling` did: one entry per scaled group of layers.

    Keys are ``"<block path>.qkv"``, ``".o"``, ``".gate_up"``, ``".down"``.
    """

    groups: dict[str, GroupScaling] = field(default_factory=dict)
    tokens: int = 0
    group_size: int = 128
    alphas_tried: tuple[float, ...] = ALPHAS

    @property
    def alphas(self) -> dict[str, float]:
        return {name: g.alpha for name, g in self.groups.items()}

    def describe(self) -> str:
        by_kind: dict[str, list[float]] = {}
        for name, g in self.groups.items():
            by_kind.setdefault(name.rsplit(".", 1)[1], []).append(g.alpha)
        parts = [f"{kind}: " + " ".join(f"{a:g}" for a in alphas) for kind, alphas in by_kind.items()]
        return f"activation scaling over {self.tokens} tokens, g{self.group_size}; alpha per block: " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "group_size": self.group_size, "alphas_tried": list(self.alphas_tried),
                "groups": {n: {"alpha": g.alpha, "error": g.error, "unscaled_error": g.unscaled_error}
                           for n, g in self.groups.items()}}


@torch.no_grad()
def apply_activation_scaling(
    model: nn.Module,
    calibration_batches: Iterable[Any],
    group_size: int = 128,
    alphas: Sequence[float] = ALPHAS,
    scale_o_proj: bool = False,
    search: str = "gptq",
) -> ScalingReport:
    """Fold activation-aware scales into ``model``'s decoder blocks (in place); see the module docs.

    ``calibration_batches``: sample inputs as :func:`~llmopt.quantization.quantize_weights`
    takes them (``(1, L)`` token tensors, e.g. from
    :func:`~llmopt.quantization.calibration.token_batches`, or dicts of keyword
    arguments). ``group_size``: the int4 group length the model will be
    quantized with. ``alphas``: the exponents tried per group of layers (values
    in [0, 1]; 0 is always tried). ``scale_o_proj``: also scale o_proj's
    inputs through v_proj's rows. ``search``: how each candidate's weights are
    quantized to be judged: ``"gptq"`` (default: what
    :func:`~llmopt.quantization.quantize_weights` does with calibration, from
    the Hessian of these inputs) or ``"rtn"`` (min..max grids, AWQ's own
    choice; much faster). Returns a :class:`ScalingReport`.

    The model keeps computing the same function (fp32 rounding aside); only
    its weights change. Raises ``ValueError`` for a model whose blocks are not
    Llama-like (``input_layernorm``, ``self_attn.{q,k,v,o}_proj``,
    ``post_attention_layernorm``, ``mlp.{gate,up,down}_proj``) or for no
    calibration batches.
    """
    check_group_size(group_size)
    alphas = _check_alphas(alphas)
    if search not in SEARCH_QUANTIZERS:
        raise ValueError(f"search quantizer {search!r}; valid choices are "
                         f"{', '.join(repr(q) for q in SEARCH_QUANTIZERS)}")
    quantizer = _Quantizer(search, group_size)
    batches = list(calibration_batches)
    if not batches:
        raise ValueError("apply_activation_scaling: no calibration batches (it needs sample inputs to measure "
                         "activation magnitudes)")
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    blocks = find_blocks(model, linears)
    if not blocks:
        raise ValueError("apply_activation_scaling: found no decoder blocks (an nn.ModuleList of layers holding "
                         "linear layers) in the model")
    for path, block in blocks:
        _check_block(path, block)
    was_training = model.training
    model.eval()
    try:
        try:
            inputs = BlockInputs(model, blocks, batches)
        except UnsupportedBlocks as error:
            raise ValueError(f"apply_activation_scaling: cannot run the decoder blocks one at a time: {error}") from None
        report = ScalingReport(tokens=sum(h[..., 0].numel() for h in inputs.hidden), group_size=group_size,
                               alphas_tried=alphas)
        for index, (path, block) in enumerate(blocks):
            _scale_block(path, block, inputs._runs(index), quantizer, alphas, scale_o_proj, report)
            if index + 1 < len(blocks):
                inputs.advance(index)
    finally:
        model.train(was_training)
    return report


def _check_alphas(alphas: Sequence[float]) -> tuple[float, ...]:
    try:
        values = tuple(float(a) for a in alphas)
    except (TypeError, ValueError):
        raise ValueError(f"alphas must be numbers in [0, 1], got {alphas!r}") from None
    if not values or any(not 0.0 <= a <= 1.0 for a in values):
        raise ValueError(f"alphas must be a non-empty sequence of numbers in [0, 1], got {alphas!r}")
    return tuple(sorted(set(values) | {0.0}))


def _check_block(path: str, block: nn.Module) -> None:
    missing = []
    for name in _REQUIRED:
        try:
            module = block.get_submodule(name)
        except AttributeError:
            missing.append(name)
            continue
        if name.endswith("layernorm"):
            if not isinstance(getattr(module, "weight", None), Tensor):
                missing.append(f"{name}.weight")
        elif not isinstance(module, nn.Linear):
            missing.append(f"{name} (an nn.Linear)")
    if missing:
        raise ValueError(f"apply_activation_scaling: block {path} is not a Llama-like decoder layer; missing "
                         f"{', '.join(missing)}")


class _Capture:
    """One block run over the calibration batches, keeping what the searches need."""

    def __init__(self, block: nn.Module, runs: list):
        attn, mlp = block.self_attn, block.mlp
        self.attn_calls: list[tuple[tuple, dict]] = []
        self.attn_out: list[Tensor] = []
        self.mlp_in: list[Tensor] = []
        self.mlp_out: list[Tensor] = []
        self.o_in: list[Tensor] = []
        self.down_in: list[Tensor] = []

        def attn_pre(module, args, kwargs):
            self.attn_calls.append((args, dict(kwargs)))

        def attn_post(module, args, kwargs, out):
            self.attn_out.append(_first(out))

        def mlp_post(module, args, out):
            self.mlp_in.append(args[0])
            self.mlp_out.append(_first(out))

        handles = [attn.register_forward_pre_hook(attn_pre, with_kwargs=True),
                   attn.register_forward_hook(attn_post, with_kwargs=True),
                   mlp.register_forward_hook(mlp_post),
                   attn.o_proj.register_forward_pre_hook(lambda m, a: self.o_in.append(a[0])),
                   mlp.down_proj.register_forward_pre_hook(lambda m, a: self.down_in.append(a[0]))]
        try:
            for run in runs:
                run()
        finally:
            for handle in handles:
                handle.remove()
        if not (len(self.attn_calls) == len(self.attn_out) == len(self.mlp_in) == len(self.o_in)
                == len(self.down_in) == len(runs)):
            raise ValueError("apply_activation_scaling: the block's attention and MLP did not run once per batch")

    def attn_input(self) -> list[Tensor]:
        return [args[0] if args else kwargs["hidden_states"] for args, kwargs in self.attn_calls]


def _first(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _mean_abs(tensors: list[Tensor]) -> Tensor:
    total = sum(t.detach().reshape(-1, t.shape[-1]).float().abs().sum(0) for t in tensors)
    count = sum(t[..., 0].numel() for t in tensors)
    return total / count


def _scales(magnitude: Tensor, alpha: float) -> Tensor:
    s = magnitude.clamp(min=_MIN_MAGNITUDE).pow(alpha)
    return s / (s.max() * s.min()).sqrt()  # centred (geometric mean of the extremes 1)


def _fake_quantize(weight: Tensor, s: Tensor, group_size: int) -> Tensor:
    """``Q(W diag(s)) diag(s)^-1``: round to nearest on each group's min..max grid, in fp32."""
    w = weight.float() * s[None, :]
    padded = int4.pad_to_groups(w, group_size)
    n, kp = padded.shape
    groups = padded.reshape(n, -1, group_size)
    low, high = torch.aminmax(groups, dim=-1, keepdim=True)
    step = ((high - low) / int4.LEVELS).clamp(min=1e-12)
    q = torch.round((groups - low) / step).clamp_(0, int4.LEVELS) * step + low
    return (q.reshape(n, kp)[:, : w.shape[1]] / s[None, :]).to(weight.dtype)


class _Quantizer:
    """The search's stand-in for the real quantizer: ``Q(W diag(s)) diag(s)^-1`` for layers sharing
    an input, by round to nearest on min..max grids (``"rtn"``) or by the pipeline's own GPTQ
    (``"gptq"``: the ``"mse"`` grids, then GPTQ, from the inputs' Hessian scaled like the inputs)."""

    def __init__(self, method: str, group_size: int):
        self.method, self.group_size = method, group_size

    def __call__(self, weights: list[Tensor], s: Tensor, inputs: list[Tensor]) -> list[Tensor]:
        if self.method == "rtn":
            return [_fake_quantize(w, s, self.group_size) for w in weights]
        from llmopt.quantization.quantize import quantize_weight

        hessian = _hessian(inputs) / (s[:, None] * s[None, :])
        stacked = torch.cat([w.float() for w in weights]) * s[None, :]
        layer = quantize_weight(stacked, "int4", self.group_size, method="gptq", hessian=hessian)
        dequantized = layer.dequantize(torch.float32) / s[None, :]
        return [part.to(w.dtype) for part, w in zip(dequantized.split([w.shape[0] for w in weights]), weights)]


def _hessian(inputs: list[Tensor]) -> Tensor:
    rows = [x.detach().reshape(-1, x.shape[-1]).float() for x in inputs]
    return sum(r.t() @ r for r in rows)


def _search(magnitude: Tensor, layers: list[nn.Linear], run, reference: list[Tensor], inputs: list[Tensor],
            quantizer: _Quantizer, alphas: tuple[float, ...], expand: Optional[Tensor] = None
            ) -> tuple[Tensor, GroupScaling]:
    """The best alpha for ``layers`` (sharing ``inputs``): their weights are quantized with each
    candidate's scales, ``run()`` returns the outputs compared with ``reference``. ``expand``
    maps the scales (one per entry of ``magnitude``) to the layers' input features."""
    originals = [layer.weight.data for layer in layers]
    errors = {}
    try:
        for alpha in alphas:
            s = _scales(magnitude, alpha).to(originals[0].device)
            s = s if expand is None else s[expand]
            for layer, weight in zip(layers, quantizer(originals, s, inputs)):
                layer.weight.data = weight
            outputs = run()
            squared = sum(float((o.float() - r.float()).square().sum()) for o, r in zip(outputs, reference))
            errors[alpha] = squared / sum(r.numel() for r in reference)
    finally:
        for layer, weight in zip(layers, originals):
            layer.weight.data = weight
    best = min(alphas, key=lambda a: (errors[a], a))
    return _scales(magnitude, best), GroupScaling(best, errors[best], errors[0.0])


def _scale_block(path: str, block: nn.Module, runs: list, quantizer: _Quantizer, alphas: tuple[float, ...],
                 scale_o_proj: bool, report: ScalingReport) -> None:
    attn, mlp = block.self_attn, block.mlp
    cap = _Capture(block, runs)

    # q/k/v, judged on the attention module's output (o_proj float).
    def run_attention():
        return [_first(attn(*args, **kwargs)) for args, kwargs in cap.attn_calls]

    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    x = cap.attn_input()
    s, report.groups[f"{path}.qkv"] = _search(_mean_abs(x), qkv, run_attention, cap.attn_out, x, quantizer, alphas)
    _fold_into_norm(block.input_layernorm, s)
    _scale_columns(qkv, s)

    if scale_o_proj:
        o, v = attn.o_proj, attn.v_proj
        head_dim = _head_dim(attn)
        heads, kv_heads = o.in_features // head_dim, v.out_features // head_dim
        if heads * head_dim != o.in_features or kv_heads * head_dim != v.out_features or heads % kv_heads:
            raise ValueError(f"apply_activation_scaling: {path}: o_proj ({o.in_features} inputs) and v_proj "
                             f"({v.out_features} outputs) do not split into heads of {head_dim}")
        # One magnitude per (kv head, dim): the mean over the query heads that read that v row.
        per_kv = _mean_abs(cap.o_in).reshape(kv_heads, heads // kv_heads, head_dim).mean(1).reshape(-1)
        expand = torch.arange(o.in_features, device=per_kv.device)
        expand = (expand // head_dim) // (heads // kv_heads) * head_dim + expand % head_dim
        reference = [F.linear(x, o.weight, o.bias) for x in cap.o_in]
        s_kv, report.groups[f"{path}.o"] = _search(per_kv, [o], lambda: [o(x) for x in cap.o_in], reference,
                                                   cap.o_in, quantizer, alphas, expand)
        _scale_rows(v, s_kv)
        _scale_columns([o], s_kv[expand])

    # gate/up, judged on the MLP's output (down float).
    gate_up = [mlp.gate_proj, mlp.up_proj]
    s, report.groups[f"{path}.gate_up"] = _search(_mean_abs(cap.mlp_in), gate_up, lambda: [mlp(x) for x in cap.mlp_in],
                                                  cap.mlp_out, cap.mlp_in, quantizer, alphas)
    _fold_into_norm(block.post_attention_layernorm, s)
    _scale_columns(gate_up, s)

    # down, judged on its own output.
    down = mlp.down_proj
    reference = [F.linear(x, down.weight, down.bias) for x in cap.down_in]
    s, report.groups[f"{path}.down"] = _search(_mean_abs(cap.down_in), [down], lambda: [down(x) for x in cap.down_in],
                                               reference, cap.down_in, quantizer, alphas)
    _scale_rows(mlp.up_proj, s)
    _scale_columns([down], s)


def _head_dim(attn: nn.Module) -> int:
    head_dim = getattr(attn, "head_dim", None)
    if head_dim is None:
        config = getattr(attn, "config", None)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head_dim)


def _fold_into_norm(norm: nn.Module, s: Tensor) -> None:
    """The norm's output divided by ``s`` per channel (weight and bias, if any)."""
    _divide(norm.weight, s)
    if isinstance(getattr(norm, "bias", None), Tensor):
        _divide(norm.bias, s)


def _scale_rows(layer: nn.Linear, s: Tensor) -> None:
    """The layer's outputs divided by ``s``: rows and bias."""
    _divide(layer.weight, s[:, None])
    if layer.bias is not None:
        _divide(layer.bias, s)


def _scale_columns(layers: list[nn.Linear], s: Tensor) -> None:
    """Inputs expected multiplied by ``1 / s``: weight columns times ``s``."""
    for layer in layers:
        w = layer.weight
        w.data = (w.data.float() * s.to(w.device)[None, :]).to(w.dtype)


def _divide(t: Tensor, s: Tensor) -> None:
    t.data = (t.data.float() / s.to(t.device)).to(t.dtype)


__all__ = ["ALPHAS", "GroupScaling", "ScalingReport", "apply_activation_scaling"]
