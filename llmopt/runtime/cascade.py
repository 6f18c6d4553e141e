"""``llmopt.Cascade``: models ordered by cost, the cheapest answering first.

    cascade = llmopt.Cascade(
        [{"model": "smollm2", "compile_options": {"quantize": "int4"}},  # cheap
         "smollm2"],                                                     # expensive
        deferral="token", threshold=0.6, top_k=2, num_draft_tokens=4)
    llm = llmopt.LLM(cascade)                 # the engine options apply to every model
    outputs = llm.generate(prompts, llmopt.SamplingParams(temperature=0, max_tokens=64))
    llm.engine.stats.to_dict()                # forwards, tokens, seconds, FLOPs per model

Two deferral rules (``cascade_rules.py`` has their exact definitions):

- ``"token"`` (speculative cascade, two models): the small model proposes
  ``num_draft_tokens`` tokens, the large one scores them in one forward, and
  each is kept while the small model's probability of it is at least
  ``threshold`` or it is in the large model's ``top_k``; the first one that
  fails is replaced by the large model's token. Runs in its own loop
  (``cascade_token.py``), not on the engine's speculative decoding: that
  one's lossless rule always adds the target's token after the drafts and
  samples the first token of an answer from the target's prefill, so
  neither limit of the rule would give one model's output.
- ``"response"`` (FrugalGPT-style, two or more models): each model in turn
  answers the whole request until an answer's mean token confidence
  (``confidence``: ``"mean_max_prob"`` or ``"mean_logprob"``) reaches
  ``threshold`` (one value, or one per model but the last); the last model's
  answer is always kept. Each model runs on its own ``LLMEngine``
  (``cascade_response.py``): continuous batching, prefix caching and its
  KV pool as usual. A request's output appears once, finished.

A model is a name (``"smollm2"``), a local Hugging Face directory or
``.gguf`` file, an ``nn.Module`` (then pass the cascade a ``tokenizer``), or a
dict ``{"model": ..., "compile_options": {...}, "name": ...}`` whose
``compile_options`` are that model's llmopt options (``{"quantize": "int4"}``,
``{"prune": {"pattern": "2:4"}}``). All models must share one vocabulary
(the tokenizer of the first one named is used).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llmopt.errors import LLMOptConfigError, check_choice, quoted
from llmopt.runtime.cascade_rules import ResponseRule, TokenRule

DEFERRALS = ("token", "response")
_GROUP = "cascade"
_MODEL_KEYS = ("model", "compile_options", "name")


@dataclass
class CascadeModel:
    """One model of a cascade: what to load and how to compile it."""

    model: Any
    compile_options: dict | None = None
    name: str | None = None

    def label(self) -> str:
        if self.name:
            return self.name
        base = self.model if isinstance(self.model, str) else type(self.model).__name__
        extra = ",".join(f"{k}={v}" for k, v in (self.compile_options or {}).items())
        return f"{base}[{extra}]" if extra else base


class Cascade:
    """Models ordered by cost and the rule that decides when to defer to the next one.

    Args:
        models: two or more models, cheapest first (see the module docstring).
        deferral: ``"token"`` or ``"response"``.
        threshold: token level: the small model's probability at which its
            token is kept (<= 0 keeps all, > 1 keeps none by confidence);
            response level: the confidence an answer needs to be kept, one
            number or one per model but the last.
        top_k: token level: a token in the large model's top ``top_k`` is
            kept whatever its confidence (0: off).
        num_draft_tokens: token level: tokens the small model proposes per round.
        confidence: response level: ``"mean_max_prob"`` or ``"mean_logprob"``.
        tokenizer: needed when no model is given by name or path.
    """

    def __init__(self, models: Sequence[Any], deferral: str = "token", threshold: float | Sequence[float] = 0.5,
                 top_k: int | None = None, num_draft_tokens: int | None = None,
                 confidence: str | None = None, tokenizer: Any = None):
        if isinstance(models, (str, Mapping)) or not isinstance(models, Sequence) or len(models) < 2:
            raise LLMOptConfigError(f"{_GROUP}: models must be a list of two or more models, cheapest "
                                    f"first; got {models!r}")
        self.models = [_as_model(m, i) for i, m in enumerate(models)]
        check_choice("deferral", deferral, DEFERRALS, group=_GROUP)
        self.deferral = deferral
        self.tokenizer = tokenizer
        if deferral == "token":
            if len(self.models) != 2:
                raise LLMOptConfigError(f"{_GROUP}: deferral 'token' cascades exactly two models (a small "
                                        f"one drafting, a large one checking), got {len(self.models)}")
            if confidence is not None:
                raise LLMOptConfigError(f"{_GROUP}: confidence belongs to deferral 'response' "
                                        "(the token rule uses the small model's probability of each token)")
            self.rule = TokenRule(threshold, 0 if top_k is None else top_k,
                                  4 if num_draft_tokens is None else num_draft_tokens)
        else:
            for name, value in (("top_k", top_k), ("num_draft_tokens", num_draft_tokens)):
                if value is not None:
                    raise LLMOptConfigError(f"{_GROUP}: {name} belongs to deferral 'token', not 'response'")
            self.rule = ResponseRule.of(threshold, len(self.models),
                                        "mean_max_prob" if confidence is None else confidence)

    @classmethod
    def from_options(cls, options: "Cascade | Mapping[str, Any]") -> "Cascade":
        """A cascade from a dict (e.g. ``llmopt serve --cascade JSON``)."""
        if isinstance(options, Cascade):
            return options
        if not isinstance(options, Mapping):
            raise LLMOptConfigError(f"{_GROUP} must be a dict or a Cascade, got {type(options).__name__}")
        known = ("models", "deferral", "threshold", "top_k", "num_draft_tokens", "confidence")
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise LLMOptConfigError(f"unknown {_GROUP} option(s) {quoted(unknown)}; valid options are "
                                    f"{quoted(known)}")
        if "models" not in options:
            raise LLMOptConfigError(f"{_GROUP}: 'models' is required (a list of models, cheapest first)")
        return cls(**dict(options))

    def to_dict(self) -> dict:
        out = {"models": [{"model": m.label(), "compile_options": m.compile_options or {}} for m in self.models],
               "deferral": self.deferral}
        if self.deferral == "token":
            out.update(threshold=self.rule.threshold, top_k=self.rule.top_k,
                       num_draft_tokens=self.rule.num_draft_tokens)
        else:
            out.update(threshold=list(self.rule.thresholds), confidence=self.rule.confidence)
        return out

    def build_engine(self, tokenizer: Any = None, **engine_options: Any):
        """Load and compile every model; return the engine that ``LLM`` drives.

        ``engine_options``: :class:`EngineConfig` fields, applied to each model
        (``compile_options`` and ``speculative_config`` are per model here, so
        they are refused).
        """
        from llmopt.runtime.engine_config import EngineConfig

        for name in ("compile_options", "speculative_config"):
            if engine_options.get(name) is not None:
                raise LLMOptConfigError(
                    f"{_GROUP}: {name} cannot be set for the whole cascade; give each model its own "
                    "compile_options ({'model': ..., 'compile_options': {...}})"
                    if name == "compile_options" else
                    f"{_GROUP}: speculative_config cannot be combined with a cascade")
        config = EngineConfig.from_kwargs(**engine_options)
        if getattr(config, "tensor_parallel_size", 1) > 1:
            raise LLMOptConfigError(f"{_GROUP}: tensor_parallel_size > 1 does not run with a cascade yet")
        tokenizer = tokenizer or self.tokenizer
        loaded = []
        for member in self.models:
            module, member_tokenizer = _load(member.model, config)
            tokenizer = tokenizer or member_tokenizer
            loaded.append((member, module))
        if tokenizer is None:
            raise LLMOptConfigError(f"{_GROUP}: no tokenizer: pass tokenizer= when every model is an nn.Module")
        _check_vocabularies([m for _, m in loaded], [m.label() for m, _ in loaded])
        name = "+".join(m.label() for m in self.models)  # the served model id: no spaces
        if self.deferral == "token":
            from llmopt.runtime.cascade_token import TokenCascadeEngine

            return TokenCascadeEngine(loaded, tokenizer, config, self.rule, name)
        from llmopt.runtime.cascade_response import ResponseCascadeEngine

        return ResponseCascadeEngine(loaded, tokenizer, config, self.rule, name)


def _as_model(value: Any, index: int) -> CascadeModel:
    if isinstance(value, CascadeModel):
        model = value
    elif isinstance(value, Mapping):
        unknown = sorted(set(value) - set(_MODEL_KEYS))
        if unknown or "model" not in value:
            raise LLMOptConfigError(f"{_GROUP}: model {index} must be a dict with 'model' (and optionally "
                                    f"'compile_options', 'name'); got keys {sorted(value)}")
        model = CascadeModel(value["model"], value.get("compile_options"), value.get("name"))
    else:
        model = CascadeModel(value)
    if not isinstance(model.model, (str, torch.nn.Module)):
        raise LLMOptConfigError(f"{_GROUP}: model {index} must be a name, a path or an nn.Module, "
                                f"got {type(model.model).__name__}")
    if model.compile_options is not None:
        from llmopt.runtime.engine_config import _checked_compile_options

        model.compile_options = _checked_compile_options(model.compile_options)
    return model


def _load(model: Any, config) -> tuple[torch.nn.Module, Any]:
    tokenizer = None
    if isinstance(model, str):
        from llmopt.models import load

        loaded = load(model, dtype=config.dtype)
        model, tokenizer = loaded.model, loaded.tokenizer
    return model.to(device=config.resolved_device(), dtype=config.dtype).eval(), tokenizer


def _check_vocabularies(modules: list[torch.nn.Module], labels: list[str]) -> None:
    sizes = [getattr(getattr(m, "config", None), "vocab_size", None) for m in modules]
    known = {s for s in sizes if s is not None}
    if len(known) > 1:
        listed = ", ".join(f"{label}: {size}" for label, size in zip(labels, sizes))
        raise LLMOptConfigError(f"{_GROUP}: the models must share one vocabulary (one tokenizer); "
                                f"their vocabulary sizes differ ({listed})")
