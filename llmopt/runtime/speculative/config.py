"""``speculative_config``: which drafter the engine speculates with, validated up front.

Names follow vLLM's ``speculative_config`` where it has them (``method``,
``num_speculative_tokens``, ``prompt_lookup_min/max``, ``model``,
``disable_by_batch_size``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from llmopt.errors import LLMOptConfigError, check_bool, check_choice, checked_fields

METHODS = ("ngram", "draft_model", "layer_skip", "lookahead")
_LOOKAHEAD_FIELDS = ("window", "ngram", "guesses")
_GROUP = "speculative_config"


@dataclass
class SpeculativeConfig:
    """Options of speculative decoding.

    Attributes:
        method: ``"ngram"`` (prompt lookup over the prompt and the output so
            far), ``"draft_model"`` (a smaller model with the target's
            vocabulary) or ``"layer_skip"`` (the target's first
            ``num_layers`` decoder layers + final norm + ``lm_head``) or
            ``"lookahead"`` (lookahead / Jacobi decoding, no drafter: see
            ``lookahead.py``; greedy requests only, sampled ones decode plainly).
        num_speculative_tokens: k, the most tokens drafted per sequence and step.
        prompt_lookup_min / prompt_lookup_max: n-gram sizes tried (longest
            first) when looking the sequence's last tokens up in its history.
        model: the draft (``draft_model``): a name (``"smollm2"``), a path or
            an ``nn.Module``.
        model_options: the draft's compile options, e.g. ``{"quantize": "int4"}``.
        num_layers: the draft's decoder layers (``layer_skip``), in
            ``[1, target layers)``.
        window: W (``lookahead``), Jacobi window positions per level, in [1, 64].
        ngram: N (``lookahead``), the n-gram size, in [2, 16]: the window keeps
            N - 1 levels and a step accepts at most N - 1 tokens plus one.
        guesses: G (``lookahead``), the most candidate n-grams verified per
            step, in [0, 64] (0: the window runs but nothing is verified).
            One lookahead step feeds 1 + (W + G) * (N - 1) tokens.
        adaptive: choose k per sequence from its recent acceptance (0
            switches the sequence off for a while).
        disable_by_batch_size: no drafts in a step while this many sequences
            or more run; None: always speculate. A verification step feeds
            1 + k tokens per sequence: in a small batch the step is bound by
            reading the weights and the extra rows cost little, but as the
            batch grows the step becomes compute-bound and verifying costs
            nearly 1 + k plain steps, which the kept drafts no longer repay.
            The default is the smallest batch at which, measured
            (``bench/spec_batch_cost.py``, docs/PERFORMANCE.md), verifying
            2 drafts per sequence needs a higher acceptance to break even
            than n-gram lookup reaches on text that does not copy its input;
            below it the per-sequence adaptive k switches off sequences whose
            drafts fail.
    """

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    model: Any = None
    model_options: dict = field(default_factory=dict)
    num_layers: int | None = None
    window: int | None = None
    ngram: int | None = None
    guesses: int | None = None
    adaptive: bool = True
    disable_by_batch_size: int | None = 8

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS, group=_GROUP)
        _check_int("num_speculative_tokens", self.num_speculative_tokens, 1)
        _check_int("prompt_lookup_min", self.prompt_lookup_min, 1)
        _check_int("prompt_lookup_max", self.prompt_lookup_max, 1)
        if self.prompt_lookup_max < self.prompt_lookup_min:
            raise LLMOptConfigError(
                f"{_GROUP}: prompt_lookup_max ({self.prompt_lookup_max}) is below "
                f"prompt_lookup_min ({self.prompt_lookup_min})")
        check_bool("adaptive", self.adaptive, group=_GROUP)
        if self.disable_by_batch_size is not None:
            _check_int("disable_by_batch_size", self.disable_by_batch_size, 1)
        if not isinstance(self.model_options, Mapping):
            raise LLMOptConfigError(f"{_GROUP}: model_options must be a dict of compile options, "
                                    f"got {type(self.model_options).__name__}")
        self.model_options = dict(self.model_options)
        if self.method == "draft_model" and self.model is None:
            raise LLMOptConfigError(f"{_GROUP}: method 'draft_model' needs model "
                                    "(a name such as 'smollm2', a path or an nn.Module)")
        if self.method != "draft_model" and (self.model is not None or self.model_options):
            raise LLMOptConfigError(f"{_GROUP}: model / model_options belong to method "
                                    f"'draft_model', not {self.method!r}")
        if self.method == "layer_skip":
            if self.num_layers is None:
                raise LLMOptConfigError(f"{_GROUP}: method 'layer_skip' needs num_layers "
                                        "(how many of the target's first decoder layers draft)")
            _check_int("num_layers", self.num_layers, 1)
        elif self.num_layers is not None:
            raise LLMOptConfigError(f"{_GROUP}: num_layers belongs to method 'layer_skip', "
                                    f"not {self.method!r}")
        if self.method == "lookahead":
            defaults = {"window": 5, "ngram": 4, "guesses": 5}
            for name, low, high in (("window", 1, 64), ("ngram", 2, 16), ("guesses", 0, 64)):
                if getattr(self, name) is None:
                    setattr(self, name, defaults[name])
                _check_int(name, getattr(self, name), low, high)
        else:
            given = [name for name in _LOOKAHEAD_FIELDS if getattr(self, name) is not None]
            if given:
                raise LLMOptConfigError(f"{_GROUP}: {', '.join(given)} belong to method "
                                        f"'lookahead', not {self.method!r}")

    @classmethod
    def from_options(cls, options: "SpeculativeConfig | Mapping[str, Any] | None"
                     ) -> "SpeculativeConfig | None":
        if options is None or isinstance(options, SpeculativeConfig):
            return options
        if not isinstance(options, Mapping):
            raise LLMOptConfigError(f"{_GROUP} must be a dict or a SpeculativeConfig, "
                                    f"got {type(options).__name__}")
        return cls(**checked_fields(cls, options, f"{_GROUP} option"))

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if out["model"] is not None and not isinstance(out["model"], str):
            out["model"] = type(self.model).__name__
        return out


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum \
            or (maximum is not None and value > maximum):
        wanted = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise LLMOptConfigError(f"{_GROUP}: {name} must be an int {wanted}, got {value!r}")
