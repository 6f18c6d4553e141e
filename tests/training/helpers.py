"""Small data and models shared by the training tests."""

import torch

from llmopt.models import random_llama


def sequences(count, low=5, high=30, seed=0, vocab=256):
    """``count`` random token sequences of random lengths in [low, high)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=generator)
    return [torch.randint(0, vocab, (int(n),), generator=generator) for n in lengths]


def tiny(dtype=torch.float32, **overrides):
    return random_llama(**{"num_layers": 2, **overrides}).to(dtype)


def capture_grads(trainer):
    """Record the gradients each optimizer step sees (after clipping)."""
    seen = []

    def hook(optimizer, args, kwargs):
        seen.append({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None})

    trainer.optimizer.register_step_pre_hook(hook)
    return seen
