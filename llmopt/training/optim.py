"""Optimizers (torch's AdamW, :class:`Lion`) and the warm-up + decay learning-rate schedule."""

from __future__ import annotations

import fnmatch
import math
from typing import Iterable

import torch

__all__ = ["Lion", "build_optimizer", "lr_at", "build_scheduler", "matches"]


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

    Per parameter ``p`` with gradient ``g`` and momentum ``m`` (zero at the start)::

        c = beta1 * m + (1 - beta1) * g
        p = p - lr * (sign(c) + weight_decay * p)       # decoupled decay, scaled by lr
        m = beta2 * m + (1 - beta2) * g

    The update has the same magnitude in every coordinate (a sign), so it is
    larger than AdamW's: use a learning rate 3-10x smaller than AdamW's and a
    weight decay 3-10x larger, so that ``lr * weight_decay`` stays about the same.
    It keeps one state tensor per parameter (AdamW keeps two).

    ``foreach=True`` (the default where the parameters are on one device type)
    updates a whole group with ``torch._foreach_*`` calls instead of a loop.
    """

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0,
                 foreach: bool | None = None):
        if lr < 0:
            raise ValueError(f"Lion: lr must be non-negative, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lion: betas must be in [0, 1), got {betas}")
        if weight_decay < 0:
            raise ValueError(f"Lion: weight_decay must be non-negative, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, foreach=foreach))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, moms = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients")
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                moms.append(state["exp_avg"])
            if not params:
                continue
            foreach = group["foreach"]
            if foreach is None:
                foreach = len({(p.device, p.dtype) for p in params}) == 1 and not torch.jit.is_scripting()
            (_lion_foreach if foreach else _lion_loop)(params, grads, moms, group)
        return loss


def _lion_loop(params, grads, moms, group):
    lr, wd = group["lr"], group["weight_decay"]
    beta1, beta2 = group["betas"]
    for p, g, m in zip(params, grads, moms):
        c = m.mul(beta1).add_(g, alpha=1 - beta1)
        if wd:
            p.mul_(1 - lr * wd)
        p.add_(c.sign_(), alpha=-lr)
        m.mul_(beta2).add_(g, alpha=1 - beta2)


def _lion_foreach(params, grads, moms, group):
    lr, wd = group["lr"], group["weight_decay"]
    beta1, beta2 = group["betas"]
    c = torch._foreach_mul(moms, beta1)
    torch._foreach_add_(c, grads, alpha=1 - beta1)
    if wd:
        torch._foreach_mul_(params, 1 - lr * wd)
    torch._foreach_sign_(c)
    torch._foreach_add_(params, c, alpha=-lr)
    torch._foreach_mul_(moms, beta2)
    torch._foreach_add_(moms, grads, alpha=1 - beta2)


def matches(name: str, patterns: Iterable[str]) -> bool:
    """True if the parameter name matches any fnmatch pattern (``"*norm*"``, ``"model.layers.0.*"``)."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def build_optimizer(model: torch.nn.Module, config) -> torch.optim.Optimizer:
    """AdamW or Lion over the trainable parameters, in two groups: with decoupled
    weight decay, and without it (the names matching ``config.no_decay``)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if matches(name, config.no_decay) else decay).append(param)
    groups = [g for g in ({"params": decay, "weight_decay": config.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if config.optimizer == "lion":
        return Lion(groups, lr=config.lr, betas=config.betas or (0.9, 0.99))
    devices = {p.device.type for g in groups for p in g["params"]}
    kwargs = {}
    # fused AdamW (one kernel for all parameters) where torch has it for the device; else foreach
    if devices <= {"cuda", "cpu"} and len(devices) == 1:
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    try:
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas or (0.9, 0.999), eps=config.eps, **kwargs)
    except (RuntimeError, ValueError):  # fused not supported for these dtypes/devices
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas or (0.9, 0.999), eps=config.eps,
                                 foreach=True)


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int, schedule: str) -> float:
    """The learning rate of optimizer step ``step`` (0-based).

    Warm-up: ``lr * (step + 1) / warmup_steps`` for ``step < warmup_steps`` (the last
    warm-up step reaches ``lr``). Then, with ``t = (step - warmup_steps) / (max_steps - warmup_steps)``
    in [0, 1): cosine ``min_lr + (lr - min_lr) * (1 + cos(pi * t)) / 2``, linear
    ``lr - (lr - min_lr) * t``, constant ``lr``.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    t = min(max(t, 0.0), 1.0)
    if schedule == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "linear":
        return lr - (lr - min_lr) * t
    return lr


def build_scheduler(optimizer: torch.optim.Optimizer, config) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose factor makes the group's learning rate :func:`lr_at` of the step."""
    base = config.lr

    def factor(step: int) -> float:
        if base == 0:
            return 0.0
        return lr_at(step, lr=base, min_lr=config.min_lr, warmup_steps=config.warmup_steps,
                     max_steps=config.max_steps, schedule=config.schedule) / base

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
