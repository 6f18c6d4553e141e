"""TrainConfig: every option of :class:`llmopt.training.Trainer`, validated on construction."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from llmopt.errors import LLMOptConfigError, check_bool, check_choice, checked_fields

__all__ = ["TrainConfig", "OPTIMIZERS", "SCHEDULES", "PRECISIONS", "RECOMPUTE_MODES"]

OPTIMIZERS = ("adamw", "lion")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
RECOMPUTE_MODES = ("none", "full", "selective")

_GROUP = "train"


@dataclass
class TrainConfig:
    """Options of a training run (all have defaults; unknown keys are refused by :meth:`from_dict`).

    Steps and batches:
        max_steps: optimizer steps to run.
        micro_batch_size: sequences per forward/backward, or ``"auto"``: the largest
            power of two (up to ``max_micro_batch_size``) whose training step fits
            ``memory_budget_bytes`` (see :func:`llmopt.training.memory.auto_micro_batch_size`).
        grad_accum_steps: micro-batches per optimizer step. The loss of a step is the
            sum of the per-token losses over every non-padding target token of all of
            its micro-batches (and all data-parallel ranks) divided by their total count.
        seq_len: window length a text is cut into, and the row length with ``packing``.
        packing: True packs documents into rows of ``seq_len`` tokens (position ids
            restart per document; no attention across documents); False pads each
            micro-batch to its longest sequence.
        shuffle, seed: a seeded permutation of the examples per epoch; ``seed`` also
            seeds dropout.

    Optimizer and schedule:
        optimizer: ``"adamw"`` (torch's, fused/foreach where available) or ``"lion"``.
        lr, min_lr, warmup_steps, schedule: linear warm-up to ``lr`` over
            ``warmup_steps`` steps, then ``"cosine"``, ``"linear"`` or ``"constant"``
            decay to ``min_lr`` at ``max_steps`` (closed form: :func:`llmopt.training.optim.lr_at`).
        betas, eps: None takes the optimizer's defaults (AdamW (0.9, 0.999), Lion (0.9, 0.99)).
        weight_decay: DECOUPLED weight decay applied by the optimizer (AdamW/Lion);
            not part of the loss. Parameters matching ``no_decay`` are exempt.
        max_grad_norm: clip gradients to this global L2 norm (None: no clipping).

    Regularisation (penalties are added to the loss once per optimizer step):
        l2_penalty: coefficient ``c`` of an explicit L2 term ``c/2 * sum(p**2)`` on the
            parameters matching ``l2_params`` (gradient ``c * p``); distinct from
            ``weight_decay``, which never enters the loss.
        l1_penalty, l1_params: ``c * sum(|p|)`` on the parameters matching the fnmatch
            patterns ``l1_params`` (gradient ``c * sign(p)``).
        attention_dropout, residual_dropout, embedding_dropout: set on the model (and
            its config) where it has them; None keeps the model's own value. Asking
            for a dropout the model has no place for is an error.

    Precision, recompute, compile:
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: autocast with fp32 master
            weights; fp16 uses a gradient scaler (``torch.amp.GradScaler``, on CUDA and
            CPU): a step whose gradients overflowed is skipped and the scale halved.
        recompute: ``"none"``, ``"full"`` (checkpoint every decoder layer),
            ``"selective"`` (per layer, save matmul and attention outputs, recompute
            the rest) or a float in [0, 1]: the min-cut partitioner's
            ``activation_memory_budget`` (needs ``compile`` and Inductor lowering).
        compile: compile the model with ``torch.compile(backend="llmopt")``;
            ``compile_options`` are the backend's options.
        keep_cpu_memory: on CPU with glibc, keep freed memory in the process instead of
            returning it to the system (``mallopt``: no mmap for large blocks, no heap
            trimming; see :func:`llmopt.training.memory.keep_freed_cpu_memory`), so a
            step's large buffers (logits, their gradient, the embedding's gradient)
            reuse pages instead of faulting fresh ones in every step. Process-wide and
            not undone: the resident memory stays at its peak. Single-process runs
            only (with data parallel gloo ranks sometimes aborted at exit). False
            leaves the allocator alone.

    Evaluation, early stopping, checkpoints, logs:
        eval_every: evaluate on ``eval_data`` every this many steps (0: only at the end).
        eval_batch_size: sequences per evaluation forward.
        patience, min_delta: stop after ``patience`` evaluations whose loss did not
            improve on the best by more than ``min_delta`` (None: never stop early).
        output_dir: where checkpoints (``best/``, ``last/``), the JSON log and the
            loss curve go (None: keep the best weights in memory only).
        save_every: also write ``last/`` every this many steps (0: never).
        restore_best: load the best evaluation's weights at the end.
        log_every: progress/JSON-log line every this many steps.
        progress: show a progress bar (tqdm if installed, else a plain line).
    """

    max_steps: int = 100
    micro_batch_size: Union[int, str] = 8
    grad_accum_steps: int = 1
    seq_len: int = 512
    packing: bool = False
    shuffle: bool = True
    seed: int = 0

    optimizer: str = "adamw"
    lr: float = 3e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    betas: Optional[tuple] = None
    eps: float = 1e-8
    weight_decay: float = 0.0
    no_decay: tuple = ("*bias", "*norm*")
    max_grad_norm: Optional[float] = 1.0

    l2_penalty: float = 0.0
    l2_params: tuple = ("*",)
    l1_penalty: float = 0.0
    l1_params: tuple = ("*",)
    attention_dropout: Optional[float] = None
    residual_dropout: Optional[float] = None
    embedding_dropout: Optional[float] = None

    precision: str = "fp32"
    recompute: Union[str, float] = "none"
    compile: bool = True
    compile_options: Optional[dict] = None
    keep_cpu_memory: bool = True

    eval_every: int = 0
    eval_batch_size: int = 8
    patience: Optional[int] = None
    min_delta: float = 0.0
    output_dir: Optional[str] = None
    save_every: int = 0
    restore_best: bool = True
    log_every: int = 1
    progress: bool = False

    memory_budget_bytes: Optional[int] = None
    max_micro_batch_size: int = 256

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for name in ("max_steps", "grad_accum_steps", "seq_len", "eval_batch_size", "log_every", "max_micro_batch_size"):
            _positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "eval_every", "save_every", "seed"):
            _non_negative_int(name, getattr(self, name))
        if self.micro_batch_size != "auto":
            _positive_int("micro_batch_size", self.micro_batch_size, extra=" or 'auto'")
        check_choice("optimizer", self.optimizer, OPTIMIZERS, group=_GROUP)
        check_choice("schedule", self.schedule, SCHEDULES, group=_GROUP)
        check_choice("precision", self.precision, PRECISIONS, group=_GROUP)
        for name in ("packing", "shuffle", "compile", "restore_best", "progress"):
            check_bool(name, getattr(self, name), group=_GROUP)
        if isinstance(self.recompute, bool) or not isinstance(self.recompute, (str, int, float)):
            raise LLMOptConfigError(f"train option 'recompute' got {self.recompute!r}; valid choices are "
                                    f"'none', 'full', 'selective' or a memory budget in [0, 1]")
        if isinstance(self.recompute, str):
            check_choice("recompute", self.recompute, RECOMPUTE_MODES, group=_GROUP)
        elif not 0.0 <= float(self.recompute) <= 1.0:
            raise LLMOptConfigError(f"train option 'recompute' budget must be in [0, 1], got {self.recompute!r}")
        elif not self.compile:
            raise LLMOptConfigError("train option 'recompute' as a memory budget needs compile=True "
                                    "(the budget is the compiler's min-cut partitioner's)")
        for name in ("lr", "min_lr", "eps", "weight_decay", "l2_penalty", "l1_penalty", "min_delta"):
            _non_negative_float(name, getattr(self, name))
        if self.min_lr > self.lr:
            raise LLMOptConfigError(f"train option 'min_lr' ({self.min_lr}) exceeds 'lr' ({self.lr})")
        if self.max_grad_norm is not None:
            _non_negative_float("max_grad_norm", self.max_grad_norm)
        if self.patience is not None:
            _positive_int("patience", self.patience)
        if self.betas is not None:
            if len(self.betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in self.betas):
                raise LLMOptConfigError(f"train option 'betas' must be two numbers in [0, 1), got {self.betas!r}")
            self.betas = tuple(float(b) for b in self.betas)
        for name in ("attention_dropout", "residual_dropout", "embedding_dropout"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise LLMOptConfigError(f"train option {name!r} must be in [0, 1) or None, got {value!r}")
        for name in ("no_decay", "l2_params", "l1_params"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            if not all(isinstance(p, str) for p in value):
                raise LLMOptConfigError(f"train option {name!r} must be name patterns (strings), got {value!r}")
            setattr(self, name, tuple(value))
        if self.memory_budget_bytes is not None:
            _positive_int("memory_budget_bytes", self.memory_budget_bytes)
        if self.compile_options is not None and not isinstance(self.compile_options, Mapping):
            raise LLMOptConfigError("train option 'compile_options' must be a dict of llmopt backend options")

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> "TrainConfig":
        return cls(**checked_fields(cls, options, "train option"))

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "TrainConfig":
        """A JSON file (or, with PyYAML installed, YAML) holding the options as a mapping."""
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            options = yaml.safe_load(text)
        else:
            options = json.loads(text)
        if not isinstance(options, Mapping):
            raise LLMOptConfigError(f"{path}: a training config file must hold a mapping of options")
        return cls.from_dict(options)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _positive_int(name, value, extra=""):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LLMOptConfigError(f"train option {name!r} must be a positive integer{extra}, got {value!r}")


def _non_negative_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise LLMOptConfigError(f"train option {name!r} must be a non-negative integer, got {value!r}")


def _non_negative_float(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise LLMOptConfigError(f"train option {name!r} must be a non-negative number, got {value!r}")
