"""Regularisation: dropout set from the config, and the L1 / L2 penalties on the loss.

Decoupled weight decay (``TrainConfig.weight_decay``) is the optimizer's and never
enters the loss; ``l2_penalty`` is an explicit term of the loss. Both can be on at once.
"""

from __future__ import annotations

from typing import Optional

import torch

from llmopt.errors import LLMOptConfigError
from llmopt.training.optim import matches

__all__ = ["set_dropout", "penalty", "DROPOUT_FIELDS"]

# TrainConfig field -> (config attributes that hold it, module attribute / nn.Dropout name suffixes)
DROPOUT_FIELDS = {
    "attention_dropout": (("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob"),
                          ("attn_dropout",)),
    "residual_dropout": (("resid_pdrop", "hidden_dropout", "hidden_dropout_prob", "resid_dropout"),
                         ("resid_dropout",)),
    "embedding_dropout": (("embd_pdrop", "embedding_dropout", "emb_dropout"),
                          ("drop", "embed_dropout", "emb_dropout")),
}


def set_dropout(model: torch.nn.Module, config) -> dict:
    """Set each dropout of ``config`` that is not None on the model: its config field,
    the attention modules' ``attention_dropout`` float (Llama-style models read it at
    each forward) and the ``nn.Dropout`` modules of that role. Returns what was set.
    A non-zero dropout the model has no place for raises :class:`LLMOptConfigError`."""
    done = {}
    model_config = getattr(model, "config", None)
    for option, (config_keys, module_names) in DROPOUT_FIELDS.items():
        value = getattr(config, option)
        if value is None:
            continue
        places = []
        for key in config_keys:
            if model_config is not None and hasattr(model_config, key):
                setattr(model_config, key, float(value))
                places.append(f"config.{key}")
        for name, module in model.named_modules():
            if option == "attention_dropout" and isinstance(getattr(module, "attention_dropout", None), float):
                module.attention_dropout = float(value)
                places.append(name + ".attention_dropout")
            elif isinstance(module, torch.nn.Dropout) and name.split(".")[-1] in module_names:
                module.p = float(value)
                places.append(name)
        if not places and value > 0:
            raise LLMOptConfigError(
                f"train option {option!r}: the model ({type(model).__name__}) has no {option.replace('_', ' ')} "
                f"(none of its config fields {', '.join(config_keys)})")
        done[option] = places
    return done


def penalty(model: torch.nn.Module, config) -> Optional[torch.Tensor]:
    """``l1_penalty * sum(|p|)`` over the parameters matching ``l1_params`` plus
    ``l2_penalty / 2 * sum(p ** 2)`` over those matching ``l2_params`` (None if both are 0).
    Gradients: ``l1_penalty * sign(p)`` and ``l2_penalty * p``."""
    terms = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if config.l1_penalty and matches(name, config.l1_params):
            terms.append(config.l1_penalty * param.abs().sum())
        if config.l2_penalty and matches(name, config.l2_params):
            terms.append(0.5 * config.l2_penalty * param.pow(2).sum())
    if not terms:
        if (config.l1_penalty and not _any_match(model, config.l1_params)) or \
                (config.l2_penalty and not _any_match(model, config.l2_params)):
            raise LLMOptConfigError("train option 'l1_params'/'l2_params' matches no trainable parameter")
        return None
    return sum(terms[1:], terms[0])


def _any_match(model, patterns) -> bool:
    return any(matches(name, patterns) for name, p in model.named_parameters() if p.requires_grad)


def active_dropout(model: torch.nn.Module) -> list[str]:
    """Where the model draws random numbers in training: config dropout fields > 0,
    attention modules' ``attention_dropout`` > 0, ``nn.Dropout`` modules with p > 0."""
    found = []
    model_config = getattr(model, "config", None)
    for config_keys, _ in DROPOUT_FIELDS.values():
        for key in config_keys:
            value = getattr(model_config, key, None) if model_config is not None else None
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                found.append(f"config.{key}={value}")
    for name, module in model.named_modules():
        value = getattr(module, "attention_dropout", None)
        if isinstance(value, float) and value > 0:
            found.append(f"{name}.attention_dropout={value}")
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            found.append(f"{name}.p={module.p}")
    return found
