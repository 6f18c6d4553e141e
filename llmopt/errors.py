"""The options' error type and the validators every option group shares.

A leaf module: it imports nothing from llmopt, so each feature's option group
(``kernels/options.py``, ``quantization/config.py``, ``pruning/config.py``,
``backends/tensorrt_settings.py``) and :mod:`llmopt.config`, which composes
them, can all import it without a cycle.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

__all__ = ["LLMOptConfigError", "check_bool", "check_choice", "checked_fields", "quoted"]


class LLMOptConfigError(ValueError):
    """A bad option passed to the llmopt backend."""


def quoted(names) -> str:
    return ", ".join(repr(n) for n in names)


def check_choice(option: str, value: Any, choices, *, group: str = "") -> None:
    """Raise unless ``value`` is one of ``choices``, listing them (``group``: e.g. "prune")."""
    if value not in choices:
        prefix = f"{group} option" if group else "option"
        raise LLMOptConfigError(f"{prefix} {option!r} got {value!r}; valid choices are {quoted(choices)}")


def check_bool(option: str, value: Any, *, group: str = "") -> None:
    if not isinstance(value, bool):
        prefix = f"{group} option" if group else "option"
        raise LLMOptConfigError(f"{prefix} {option!r} must be True or False, got {value!r}")


def checked_fields(cls, options: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``options`` as keyword arguments of the dataclass ``cls``; an unknown key raises,
    naming ``what`` it is and the valid ones (so a typo is not silently ignored)."""
    known = [f.name for f in dataclasses.fields(cls)]
    for key in options:
        if key not in known:
            raise LLMOptConfigError(f"unknown {what} {key!r}; valid options are {quoted(known)}")
    return dict(options)
