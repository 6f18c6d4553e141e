"""Knowledge distillation: a student trained on a teacher's next-token distributions.

``distill(student, teacher, train_data, DistillConfig(...))`` trains the
student with the :class:`~llmopt.training.Trainer` (every TrainConfig option
applies: accumulation, precision, recompute, schedules, early stopping) and a
loss that mixes the usual next-token cross-entropy with a divergence between
the teacher's and the student's distributions at temperature ``T``::

    loss = ce_weight * CE(student, labels) + (1 - ce_weight) * T**2 * D(teacher_T, student_T)

Both terms are per-token means over the same targets (the non-padding labels,
summed over the whole accumulated batch and divided by their count, as the
Trainer does for CE). ``p_T = softmax(logits / T)``. ``T**2`` is Hinton et
al.'s convention: it keeps the divergence's gradient on the same scale as
CE's when ``T`` changes. ``D`` is one of

* ``"forward_kl"``: ``KL(p_teacher || p_student)`` (mean-seeking, the classic one);
* ``"reverse_kl"``: ``KL(p_student || p_teacher)`` (mode-seeking);
* ``"jsd"``: ``0.5 KL(p_t || m) + 0.5 KL(p_s || m)``, ``m = (p_t + p_s) / 2``
  (symmetric, bounded by ``log 2``).

Memory: the divergence runs over the target positions ``chunk_size`` rows at
a time, each chunk under non-reentrant activation checkpointing, so its
fp32 intermediates (log-softmaxes, probabilities, the mixture: several
tokens x vocabulary tensors) exist for one chunk at a time, in the forward
and in the backward; only both models' logits (their outputs) are whole.

The teacher is any module returning logits (an HF model, a compiled or
quantized one): it runs under ``torch.no_grad()`` in eval mode and is never
updated. Its vocabulary must equal the student's (checked before training,
and on every batch by the logits' last dimension).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llmopt.errors import LLMOptConfigError, check_choice, checked_fields
from llmopt.training.config import TrainConfig
from llmopt.training.data import IGNORE
from llmopt.training.trainer import Trainer, TrainResult, token_cross_entropy

__all__ = ["DISTILL_LOSSES", "DistillConfig", "DistillTrainer", "check_vocabularies", "distill", "divergence_sum",
           "freeze_pruned_zeros", "token_divergence", "vocabulary_size"]

DISTILL_LOSSES = ("forward_kl", "reverse_kl", "jsd")
GROUP = "distill"


@dataclass(frozen=True)
class DistillConfig:
    """Distillation settings (see the module docstring for the loss).

    Attributes:
        loss: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
        temperature: ``T > 0``; both models' logits are divided by it.
        ce_weight: weight of the hard-label CE in ``[0, 1]``; the divergence gets ``1 - ce_weight``.
        chunk_size: target positions per chunk of the divergence (a positive int).
    """

    loss: str = "forward_kl"
    temperature: float = 1.0
    ce_weight: float = 0.5
    chunk_size: int = 1024

    def __post_init__(self) -> None:
        check_choice("loss", self.loss, DISTILL_LOSSES, group=GROUP)
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise LLMOptConfigError(f"{GROUP} option 'temperature' must be a positive number, got {t!r}")
        w = self.ce_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w <= 1:
            raise LLMOptConfigError(f"{GROUP} option 'ce_weight' must be a number in [0, 1], got {w!r}")
        c = self.chunk_size
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise LLMOptConfigError(f"{GROUP} option 'chunk_size' must be a positive integer, got {c!r}")
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "ce_weight", float(w))

    @classmethod
    def from_options(cls, options: "Mapping[str, Any] | DistillConfig | None") -> "DistillConfig":
        if options is None:
            return cls()
        if isinstance(options, DistillConfig):
            return options
        if not isinstance(options, Mapping):
            raise LLMOptConfigError(f"distill options must be a dict or a DistillConfig, got {type(options).__name__}")
        return cls(**checked_fields(cls, options, "distill option"))


# ---------------------------------------------------------------- the divergences


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, loss: str,
                     temperature: float = 1.0) -> torch.Tensor:
    """Per-row divergence ``D`` (no ``T**2`` factor) between ``(N, V)`` logits, computed in fp32
    (fp64 stays fp64). Rows are positions; the result has shape ``(N,)``."""
    check_choice("loss", loss, DISTILL_LOSSES, group=GROUP)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    if loss == "forward_kl":
        return _kl(log_t, log_s)
    if loss == "reverse_kl":
        return _kl(log_s, log_t)
    # log m = log((p_t + p_s) / 2), stable through logsumexp.
    log_m = torch.logsumexp(torch.stack([log_t, log_s]), dim=0) - math.log(2.0)
    return 0.5 * _kl(log_t, log_m) + 0.5 * _kl(log_s, log_m)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities; 0 * log 0 counts as 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def divergence_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                   loss: str = "forward_kl", temperature: float = 1.0, chunk_size: int = 1024) -> torch.Tensor:
    """Sum of ``token_divergence`` over the positions where ``mask`` is True, ``chunk_size``
    positions at a time (each chunk checkpointed when the student needs gradients: its
    intermediates are recomputed in the backward instead of kept). ``*_logits``: ``(..., V)``
    (contiguous, so the flattening is a view); ``mask``: bool ``(...)``."""
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise LLMOptConfigError(
            f"distill: the student's vocabulary ({student_logits.shape[-1]} logits) differs from the teacher's "
            f"({teacher_logits.shape[-1]}); distillation needs the same tokenizer and vocabulary"
        )
    vocab = student_logits.shape[-1]
    # Contiguous row ranges of views (no copies: checkpoint keeps its inputs alive until the
    # backward, so a gathered copy per chunk would add up to a second set of logits).
    s = student_logits.reshape(-1, vocab)
    t = teacher_logits.detach().reshape(-1, vocab)
    keep = mask.reshape(-1)
    total = s.new_zeros((), dtype=torch.promote_types(s.dtype, torch.float32))
    for start in range(0, s.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        if not bool(keep[rows].any()):
            continue
        if s.requires_grad and torch.is_grad_enabled():
            part = checkpoint(_chunk_sum, s[rows], t[rows], keep[rows], loss, temperature, use_reentrant=False)
        else:
            part = _chunk_sum(s[rows], t[rows], keep[rows], loss, temperature)
        total = total + part
    return total


def _chunk_sum(s: torch.Tensor, t: torch.Tensor, keep: torch.Tensor, loss: str, temperature: float) -> torch.Tensor:
    per_row = token_divergence(s, t, loss, temperature)
    return torch.where(keep, per_row, torch.zeros_like(per_row)).sum()


# ---------------------------------------------------------------- training


def vocabulary_size(model: torch.nn.Module) -> int | None:
    """The number of logits a model produces (its output embedding's rows, else its config's)."""
    model = getattr(model, "_orig_mod", model)
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(size) if isinstance(size, int) else None


def check_vocabularies(student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    s, t = vocabulary_size(student), vocabulary_size(teacher)
    if s is not None and t is not None and s != t:
        raise LLMOptConfigError(
            f"distill: the student's vocabulary ({s} tokens) differs from the teacher's ({t}); "
            "distillation compares next-token distributions, so both need the same tokenizer and vocabulary"
        )


class DistillTrainer(Trainer):
    """A :class:`~llmopt.training.Trainer` whose loss is the distillation loss (module docstring).

    Evaluation (``evaluate``, early stopping) stays the student's plain next-token loss,
    so eval perplexities compare with any other run's.
    """

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, config: TrainConfig | None = None,
                 train_data=None, eval_data=None, *, distill_config: "DistillConfig | Mapping[str, Any] | None" = None,
                 **kwargs):
        check_vocabularies(student, teacher)
        self.teacher = teacher
        self.distill_config = DistillConfig.from_options(distill_config)
        super().__init__(student, config, train_data, eval_data, **kwargs)

    def compute_loss(self, model, batch: dict) -> tuple[torch.Tensor, int]:
        cfg = self.distill_config
        outputs = self.forward(model, batch)
        labels = batch["labels"].to(self.device)
        ce_sum, count = token_cross_entropy(outputs.logits, labels)
        if cfg.ce_weight == 1.0:
            return ce_sum, count
        self.teacher.eval()
        with torch.no_grad():
            teacher_logits = self.teacher(**self.model_inputs(batch)).logits
        # position t is scored when its target labels[t + 1] is (HF's shift, as the CE)
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[:, :-1] = labels[:, 1:] != IGNORE
        kl_sum = divergence_sum(outputs.logits, teacher_logits, mask, cfg.loss, cfg.temperature, cfg.chunk_size)
        loss = (1.0 - cfg.ce_weight) * cfg.temperature ** 2 * kl_sum
        if cfg.ce_weight:
            loss = loss + cfg.ce_weight * ce_sum
        return loss, count


def distill(student: torch.nn.Module, teacher: torch.nn.Module, train_data,
            config: "DistillConfig | Mapping[str, Any] | None" = None, *, train_config: TrainConfig | None = None,
            eval_data=None, **trainer_kwargs) -> TrainResult:
    """Train ``student`` (in place) on ``teacher``'s distributions; returns the run's TrainResult.

    ``train_config``: every Trainer option (steps, batch, optimizer, compile...);
    ``trainer_kwargs`` go to the Trainer (``tokenizer`` for text data, ``callbacks``...).
    """
    trainer = DistillTrainer(student, teacher, train_config, train_data, eval_data, distill_config=config,
                             **trainer_kwargs)
    return trainer.train()


def freeze_pruned_zeros(model: torch.nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list:
    """Keep a pruned model's zero weights at zero while it trains (for 2:4 or unstructured pruning).

    Every Linear weight (not named in ``skip``) that holds zeros gets a hook that zeroes the
    gradient where the weight is zero, after each accumulation. With AdamW or Lion starting from
    a fresh state a zero gradient means a zero update (and decoupled decay of 0 is 0), so the
    sparsity pattern survives training. Returns the hook handles.
    """
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not any(part in name for part in skip):
            weight = module.weight
            keep = weight.detach() != 0
            if bool(keep.all()):
                continue

            def mask_grad(param, keep=keep):
                param.grad.mul_(keep)

            handles.append(weight.register_post_accumulate_grad_hook(mask_grad))
    return handles


# ---------------------------------------------------------------- ``llmopt distill``


def run_command(args, load) -> int:
    """``llmopt distill``: the CLI's arguments (``llmopt.cli``) -> a distillation run.

    The student is ``--student`` if given, else a copy of the teacher pruned with
    ``--prune`` (the pruned zeros are kept zero while training). ``load(name) ->
    (model, tokenizer)`` is the CLI's model loader.
    """
    import copy

    from llmopt.training.command import ByteTokenizer, config_from_args

    config = config_from_args(args)
    settings = DistillConfig(loss=args.loss, temperature=args.temperature, ce_weight=args.ce_weight,
                             chunk_size=args.chunk_size)
    if args.random_model:
        from llmopt.models import random_llama

        teacher, tokenizer = random_llama(num_layers=2, seed=config.seed), ByteTokenizer()
    else:
        teacher, tokenizer = load(args.teacher)
        teacher = teacher.float()
    if args.student:
        student, _ = load(args.student)  # same vocabulary: checked by DistillTrainer
        student = student.float()
    else:
        student = copy.deepcopy(teacher)
    if args.prune:
        from llmopt.pruning import PruneConfig, prune_model

        prune = PruneConfig(method="magnitude", pattern=args.prune,
                            sparsity=0.5 if args.prune == "2:4" else args.prune_sparsity)
        prune_model(student, prune)
        if not prune.structured:
            freeze_pruned_zeros(student)
        print(f"student: the {'student' if args.student else 'teacher'} pruned ({prune.describe()})")
    trainer = DistillTrainer(student, teacher, config, args.train, eval_data=args.eval, tokenizer=tokenizer,
                             distill_config=settings)
    before = trainer.evaluate() if args.eval else None
    result = trainer.train(resume_from=args.resume)
    last = result.steps[-1] if result.steps else {}
    print(f"steps: {len(result.steps)}  final loss: {last.get('loss', float('nan')):.4f}  "
          f"tokens/s: {result.tokens_per_second:.0f}  ({settings.loss}, T={settings.temperature:g}, "
          f"ce_weight={settings.ce_weight:g})")
    if before is not None:
        teacher_eval = Trainer(teacher, dataclasses.replace(config, output_dir=None, compile=False), args.eval,
                               eval_data=args.eval, tokenizer=tokenizer).evaluate()
        after = trainer.evaluate()
        print(f"held-out perplexity: teacher {teacher_eval['perplexity']:.2f}, student before "
              f"{before['perplexity']:.2f}, after {after['perplexity']:.2f}")
    print(f"wrote {args.output_dir}/: result.json, log.jsonl, loss.png, last/ (the student's weights)")
    return 0
