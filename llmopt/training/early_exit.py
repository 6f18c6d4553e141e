"""Early-exit training (LayerSkip's recipe, Elhoushi et al. 2024) and a per-layer exit probe.

Two parts, both optional through :class:`EarlyExitConfig`:

* **Layer dropout rising with depth.** In training, each sequence of a batch
  skips decoder layer ``l`` (of ``L``) with probability ``p_l``; a skipped
  layer passes its input through unchanged (no rescaling, as in LayerSkip).
  ``curve="exponential"`` is LayerSkip's depth scale,
  ``p_l = p_max * (2**(l / (L-1)) - 1)`` (0 at the first layer, ``p_max`` at
  the last, rising slowly then fast); ``curve="linear"`` is
  ``p_l = p_max * l / (L-1)``. The rate is constant over training (LayerSkip's
  time curriculum is not implemented). The skip is a per-sequence select, not a
  branch, so the compiled graph has no data-dependent control flow; it saves no
  compute, it only trains the later layers to be skippable.
* **Early-exit loss.** The hidden state after intermediate layer ``l`` goes
  through the model's own final norm and ``lm_head`` (shared, not copies) and
  gets the usual next-token cross-entropy. The step's loss is
  ``CE_final + exit_scale * sum_l w_l * CE_l`` over the exit layers ``l``
  (default: every layer but the last), with ``w_l`` proportional to ``l + 1``
  (``exit_weights="linear"``, later layers weigh more, as in LayerSkip's
  scale) or equal (``"uniform"``), normalised to sum to 1. Every ``CE`` is
  the per-token sum over the batch's targets (the Trainer divides by the
  target count). Each exit's logits are checkpointed: its tokens x vocabulary
  tensors exist one exit at a time, in the forward and the backward.

:func:`exit_agreement` measures how well each layer's exit predicts the full
model's own greedy token: the fraction of positions where
``argmax lm_head(norm(h_l)) == argmax`` of the final logits (1.0 at the last
layer). The decoding work (self-speculative / early-exit decoding) reads it.

Llama-family models (``model.model.layers`` / ``model.model.norm``) and GPT-2
(``transformer.h`` / ``transformer.ln_f``) are supported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llmopt.errors import LLMOptConfigError, check_choice, checked_fields
from llmopt.training import data as data_mod
from llmopt.training.config import TrainConfig
from llmopt.training.trainer import Trainer, TrainResult

__all__ = [
    "CURVES",
    "EXIT_WEIGHTS",
    "EarlyExitConfig",
    "EarlyExitTrainer",
    "add_layer_dropout",
    "decoder_parts",
    "early_exit_loss_sum",
    "exit_agreement",
    "exit_weights",
    "layer_dropout_probabilities",
    "train_early_exit",
]

CURVES = ("exponential", "linear")
EXIT_WEIGHTS = ("linear", "uniform")
GROUP = "early_exit"
IGNORE = data_mod.IGNORE


@dataclass(frozen=True)
class EarlyExitConfig:
    """LayerSkip options (see the module docstring).

    Attributes:
        layer_dropout: ``p_max``, the last layer's skip probability, in ``[0, 1)`` (0: off).
        curve: ``"exponential"`` (LayerSkip) or ``"linear"`` rise of ``p_l`` with depth.
        exit_scale: total weight of the early-exit losses relative to the final loss (0: off).
        exit_layers: 0-based decoder layers with an exit loss; None: all but the last.
        exit_weights: ``"linear"`` (``w_l`` proportional to ``l + 1``) or ``"uniform"``.
    """

    layer_dropout: float = 0.1
    curve: str = "exponential"
    exit_scale: float = 1.0
    exit_layers: tuple[int, ...] | None = None
    exit_weights: str = "linear"

    def __post_init__(self) -> None:
        p = self.layer_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise LLMOptConfigError(f"{GROUP} option 'layer_dropout' must be a number in [0, 1), got {p!r}")
        check_choice("curve", self.curve, CURVES, group=GROUP)
        check_choice("exit_weights", self.exit_weights, EXIT_WEIGHTS, group=GROUP)
        s = self.exit_scale
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0:
            raise LLMOptConfigError(f"{GROUP} option 'exit_scale' must be a number >= 0, got {s!r}")
        if self.exit_layers is not None:
            layers = self.exit_layers
            if isinstance(layers, (str, int)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                        and i >= 0 for i in layers):
                raise LLMOptConfigError(f"{GROUP} option 'exit_layers' must be a list of layer indices, got {layers!r}")
            object.__setattr__(self, "exit_layers", tuple(sorted(set(layers))))
        object.__setattr__(self, "layer_dropout", float(p))
        object.__setattr__(self, "exit_scale", float(s))

    @classmethod
    def from_options(cls, options: "Mapping[str, Any] | EarlyExitConfig | None") -> "EarlyExitConfig":
        if options is None:
            return cls()
        if isinstance(options, EarlyExitConfig):
            return options
        if not isinstance(options, Mapping):
            raise LLMOptConfigError(f"early_exit options must be a dict or an EarlyExitConfig, "
                                    f"got {type(options).__name__}")
        return cls(**checked_fields(cls, options, "early_exit option"))

    def layers(self, num_layers: int) -> tuple[int, ...]:
        """The exit layers for a model of ``num_layers`` decoder layers (checked in range)."""
        if self.exit_layers is None:
            return tuple(range(num_layers - 1))
        bad = [i for i in self.exit_layers if i >= num_layers - 1]
        if bad:
            raise LLMOptConfigError(f"{GROUP} option 'exit_layers' {bad} out of range: the model has "
                                    f"{num_layers} layers and exits are taken before the last (0..{num_layers - 2})")
        return self.exit_layers


def layer_dropout_probabilities(num_layers: int, p_max: float, curve: str = "exponential") -> list[float]:
    """``p_l`` for ``l = 0 .. num_layers - 1`` (see the module docstring)."""
    check_choice("curve", curve, CURVES, group=GROUP)
    if num_layers == 1:
        return [0.0]
    depth = [layer / (num_layers - 1) for layer in range(num_layers)]
    if curve == "linear":
        return [p_max * d for d in depth]
    return [p_max * (2.0 ** d - 1.0) for d in depth]


def exit_weights(layers: Sequence[int], kind: str = "linear") -> list[float]:
    """``w_l`` for the exit layers, summing to 1."""
    check_choice("exit_weights", kind, EXIT_WEIGHTS, group=GROUP)
    raw = [float(layer + 1) if kind == "linear" else 1.0 for layer in layers]
    total = sum(raw)
    return [w / total for w in raw] if total else []


def decoder_parts(model: nn.Module) -> tuple[nn.ModuleList, nn.Module, nn.Module]:
    """(decoder layers, final norm, lm_head) of a Llama-family or GPT-2 model."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper
    body = getattr(model, "model", None)
    if body is not None and hasattr(body, "layers") and hasattr(body, "norm"):
        return body.layers, body.norm, model.get_output_embeddings()
    body = getattr(model, "transformer", None)
    if body is not None and hasattr(body, "h") and hasattr(body, "ln_f"):
        return body.h, body.ln_f, model.get_output_embeddings()
    raise LLMOptConfigError(f"early exit needs a Llama-family (model.layers, model.norm) or GPT-2 "
                            f"(transformer.h, transformer.ln_f) model, got {type(model).__name__}")


# ---------------------------------------------------------------- layer dropout


class _LayerDropout:
    """A forward hook: per sequence, replace the layer's output by its input with probability p."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, module, args, kwargs, output):
        if not module.training or self.p == 0.0:
            return output
        hidden_in = args[0] if args else kwargs["hidden_states"]
        hidden_out = output[0] if isinstance(output, tuple) else output
        keep = torch.rand(hidden_in.shape[0], 1, 1, device=hidden_in.device) >= self.p
        mixed = torch.where(keep, hidden_out, hidden_in.to(hidden_out.dtype))
        return (mixed, *output[1:]) if isinstance(output, tuple) else mixed


def add_layer_dropout(model: nn.Module, p_max: float, curve: str = "exponential") -> list:
    """Install depth-rising layer dropout on ``model``'s decoder layers (before compiling it).

    Active only in training mode. Returns the hook handles (``handle.remove()`` undoes it).
    """
    layers, _, _ = decoder_parts(model)
    probabilities = layer_dropout_probabilities(len(layers), p_max, curve)
    return [layer.register_forward_hook(_LayerDropout(p), with_kwargs=True)
            for layer, p in zip(layers, probabilities) if p > 0]


# ---------------------------------------------------------------- early-exit loss


def _exit_ce_sum(hidden: torch.Tensor, norm: nn.Module, head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    logits = head(norm(hidden)).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """The target of each position (HF shift: position t predicts labels[t + 1]; -100 at the end)."""
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    return targets


def early_exit_loss_sum(model: nn.Module, hidden_states: Sequence[torch.Tensor], labels: torch.Tensor,
                        config: EarlyExitConfig) -> torch.Tensor:
    """``exit_scale * sum_l w_l * CE_l`` (per-token sums) from HF's ``output_hidden_states``.

    ``hidden_states[l + 1]`` is the output of decoder layer ``l`` (``[0]`` is the embeddings;
    the last entry is the final norm's output, which is why the last layer is not an exit).
    """
    layers, norm, head = decoder_parts(model)
    exits = config.layers(len(layers))
    targets = shifted_targets(labels)
    total = hidden_states[0].new_zeros((), dtype=torch.float32)
    if config.exit_scale == 0 or not exits:
        return total
    for layer, weight in zip(exits, exit_weights(exits, config.exit_weights)):
        hidden = hidden_states[layer + 1]
        if hidden.requires_grad and torch.is_grad_enabled():
            part = checkpoint(_exit_ce_sum, hidden, norm, head, targets, use_reentrant=False)
        else:
            part = _exit_ce_sum(hidden, norm, head, targets)
        total = total + weight * part
    return config.exit_scale * total


# ---------------------------------------------------------------- the probe


@torch.no_grad()
def exit_agreement(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   batch_size: int = 8) -> list[float]:
    """Per decoder layer, the fraction of (non-padding) positions whose early-exit argmax
    equals the final logits' argmax; the last entry is 1.0. ``input_ids``: ``(B, T)``."""
    layers, norm, head = decoder_parts(model)
    was_training = model.training
    model.eval()
    agree = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start:start + batch_size]
            mask = attention_mask[start:start + batch_size] if attention_mask is not None else torch.ones_like(ids)
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            final = out.logits.argmax(-1)
            valid = mask.bool()
            for layer in range(len(layers) - 1):
                guess = head(norm(out.hidden_states[layer + 1])).argmax(-1)
                agree[layer] += ((guess == final) & valid).sum()
            agree[-1] += valid.sum()
            count += int(valid.sum())
    finally:
        model.train(was_training)
    return (agree / max(count, 1)).tolist()


# ---------------------------------------------------------------- training


class EarlyExitTrainer(Trainer):
    """A :class:`~llmopt.training.Trainer` with LayerSkip's layer dropout and early-exit loss.

    The layer-dropout hooks go on the model before it is compiled (they stay on it: remove
    them with ``trainer.remove_layer_dropout()``); the early-exit loss is the Trainer's
    ``extra_loss`` (a per-token sum, normalised with the final CE). Evaluation is the final
    layer's plain loss.
    """

    def __init__(self, model: nn.Module, config: TrainConfig | None = None, train_data=None, eval_data=None, *,
                 early_exit: "EarlyExitConfig | Mapping[str, Any] | None" = None, **kwargs):
        self.early_exit = EarlyExitConfig.from_options(early_exit)
        layers, _, _ = decoder_parts(model)
        self.early_exit.layers(len(layers))  # range check before any work
        self._dropout_handles = add_layer_dropout(model, self.early_exit.layer_dropout, self.early_exit.curve) \
            if self.early_exit.layer_dropout > 0 else []
        try:
            super().__init__(model, config, train_data, eval_data, **kwargs)
        except BaseException:
            self.remove_layer_dropout()  # leave the user's model as it was
            raise

    def has_random_ops(self, model) -> bool:
        # layer dropout draws per-sequence uniforms in the forward (the recompute budget refuses it)
        return self.early_exit.layer_dropout > 0 or super().has_random_ops(model)

    def model_inputs(self, batch: dict) -> dict:
        inputs = super().model_inputs(batch)
        if self.model.training and self.early_exit.exit_scale > 0:
            inputs["output_hidden_states"] = True
        return inputs

    def extra_loss(self, model, batch: dict, outputs):
        total = super().extra_loss(model, batch, outputs)
        hidden = getattr(outputs, "hidden_states", None)
        if hidden is None:
            return total
        term = early_exit_loss_sum(self.model, hidden, batch["labels"].to(self.device), self.early_exit)
        return term if total is None else total + term

    def remove_layer_dropout(self) -> None:
        for handle in self._dropout_handles:
            handle.remove()
        self._dropout_handles = []


def train_early_exit(model: nn.Module, train_data, early_exit: "EarlyExitConfig | Mapping[str, Any] | None" = None,
                     *, train_config: TrainConfig | None = None, eval_data=None, **trainer_kwargs) -> TrainResult:
    """Train ``model`` in place with LayerSkip's recipe; the layer-dropout hooks are removed
    at the end. Returns the run's TrainResult."""
    trainer = EarlyExitTrainer(model, train_config, train_data, eval_data, early_exit=early_exit, **trainer_kwargs)
    try:
        return trainer.train()
    finally:
        trainer.remove_layer_dropout()
