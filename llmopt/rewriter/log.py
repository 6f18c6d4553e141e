"""The ``llmopt`` logger; ``LLMOPT_LOG=debug`` (or info, warning) turns it on."""

from __future__ import annotations

import logging
import os
import warnings

logger = logging.getLogger("llmopt")


class LLMOptWarning(UserWarning):
    """A pass or lowering failed and llmopt carried on without it."""


def _configure_from_env() -> None:
    level = os.environ.get("LLMOPT_LOG", "").strip().upper()
    if not level:
        return
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        warnings.warn(f"LLMOPT_LOG={level.lower()!r} is not one of debug, info, warning, error")
        return
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[llmopt %(levelname)s] %(message)s"))
        logger.addHandler(handler)


def warn_fallback(message: str) -> None:
    """Say that a step was dropped: as a Python warning and in the log."""
    logger.warning(message)
    warnings.warn(message, LLMOptWarning, stacklevel=3)


_configure_from_env()
