"""Speculative decoding in the serving engine: drafters, the lossless verification rule,
per-sequence k. See ``speculator.py`` for how a step uses them."""

from llmopt.runtime.speculative.config import SpeculativeConfig

__all__ = ["SpeculativeConfig"]
