"""Training checkpoints: ``model.safetensors`` (weights) and ``trainer_state.pt``
(optimizer, scheduler, gradient scaler, RNG states, data position, step, history,
early-stopping state), so that a resumed run continues exactly as if uninterrupted."""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

__all__ = ["save", "load", "load_weights", "WEIGHTS", "STATE"]

WEIGHTS = "model.safetensors"
STATE = "trainer_state.pt"


def save(path, trainer) -> None:
    from safetensors.torch import save_model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_model(trainer.model, str(path / WEIGHTS))  # handles tied weights (one stored copy)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy

        rng["numpy"] = numpy.random.get_state()
    except ImportError:
        pass
    state = {
        "step": trainer.step,
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "rng": rng,
        "data": trainer.batches.state_dict(),
        "micro_batch_size": trainer.micro_batch_size,
        "result": trainer.result.to_dict(),
        "best_loss": trainer.best_loss,
        "bad_evals": trainer.bad_evals,
        "config": trainer.config.to_dict(),
    }
    tmp = path / (STATE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path / STATE)


def load_weights(model: torch.nn.Module, path) -> None:
    from safetensors.torch import load_model

    load_model(model, str(Path(path) / WEIGHTS))


def load(path, trainer) -> None:
    path = Path(path)
    load_weights(trainer.model, path)
    state = torch.load(path / STATE, weights_only=False)
    trainer.step = state["step"]
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.scaler.load_state_dict(state["scaler"])
    trainer.batches.load_state_dict(state["data"])
    trainer.micro_batch_size = state["micro_batch_size"]
    trainer.best_loss = state["best_loss"]
    trainer.bad_evals = state["bad_evals"]
    saved = state["result"]
    result = trainer.result
    result.steps, result.evals = list(saved["steps"]), list(saved["evals"])
    result.best_step, result.best_eval_loss = saved["best_step"], saved["best_eval_loss"]
    result.tokens, result.train_seconds = saved["tokens"], saved["train_seconds"]
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if "numpy" in rng:
        import numpy

        numpy.random.set_state(rng["numpy"])
