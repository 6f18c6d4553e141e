"""Weight pruning: magnitude or Wanda scores, unstructured / 2:4 / heads / channels.

Two ways in, by what the pattern does to shapes:

* ``"unstructured"`` and ``"2:4"`` keep every shape, so they run inside the
  backend: ``torch.compile(model, backend="llmopt", options={"prune":
  {"method": "magnitude", "sparsity": 0.5, "pattern": "2:4"}})``. The pass
  (``llmopt/passes/prune_linear.py``) installs the pruned weights on the
  compiled graph; the user's module keeps its own.
* ``"heads"`` and ``"channels"`` shrink layers. The attention's reshape sizes
  (heads x head_dim) are baked into the traced graph, so a graph pass cannot
  remove heads cleanly; these are a model transform applied before compiling:
  ``prune_model(model, PruneConfig(pattern="heads", sparsity=0.25))``. The
  backend rejects them with an error that says so.

Wanda (``|W| * ||X||_2``) needs calibration activations: for the backend,
``collect_activation_norms(model, tokens)`` and ``"calibration": norms``; for
``prune_model``, ``calibration_text`` (with the tokenizer).
"""

from llmopt.pruning.calibration import calibration_tokens, collect_activation_norms
from llmopt.pruning.config import METHODS, PATTERNS, STRUCTURED_PATTERNS, PruneConfig
from llmopt.pruning.masks import (
    magnitude_scores,
    two_four_mask,
    unstructured_mask,
    wanda_scores,
    weight_mask,
)
from llmopt.pruning.structured import prune_channels, prune_heads, prune_model

__all__ = [
    "METHODS",
    "PATTERNS",
    "STRUCTURED_PATTERNS",
    "PruneConfig",
    "calibration_tokens",
    "collect_activation_norms",
    "magnitude_scores",
    "prune_channels",
    "prune_heads",
    "prune_model",
    "two_four_mask",
    "unstructured_mask",
    "wanda_scores",
    "weight_mask",
]
