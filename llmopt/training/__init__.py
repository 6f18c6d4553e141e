"""Training: :class:`Trainer` (gradient accumulation with exact token-count
normalisation, mixed precision, activation recompute, AdamW / :class:`Lion`,
warm-up + decay schedules, L1/L2/dropout, early stopping, checkpoints, data
parallel) on llmopt's compiled model. See docs/ARCHITECTURE.md, "Training"."""

from llmopt.training.config import TrainConfig
from llmopt.training.optim import Lion, lr_at
from llmopt.training.trainer import Trainer, TrainResult, token_cross_entropy

__all__ = ["Lion", "TrainConfig", "TrainResult", "Trainer", "lr_at", "token_cross_entropy"]
