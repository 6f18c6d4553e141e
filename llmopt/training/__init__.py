"""Training: :class:`Trainer` (gradient accumulation with exact token-count
normalisation, mixed precision, activation recompute, AdamW / :class:`Lion`,
warm-up + decay schedules, L1/L2/dropout, early stopping, checkpoints, data
parallel) on llmopt's compiled model; distillation (:func:`distill`) and
LayerSkip early-exit training (:func:`train_early_exit`) on its hooks.
See docs/ARCHITECTURE.md, "Training"."""

from llmopt.training.config import TrainConfig
from llmopt.training.optim import Lion, lr_at
from llmopt.training.trainer import Trainer, TrainResult, token_cross_entropy
from llmopt.training.distill import DistillConfig, DistillTrainer, distill
from llmopt.training.early_exit import EarlyExitConfig, EarlyExitTrainer, exit_agreement, train_early_exit

__all__ = ["DistillConfig", "DistillTrainer", "EarlyExitConfig", "EarlyExitTrainer", "Lion", "TrainConfig",
           "TrainResult", "Trainer", "distill", "exit_agreement", "lr_at", "token_cross_entropy",
           "train_early_exit"]
