"""What a cascade adds to a request's output: who answered and how the rule judged it."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmopt.runtime.outputs import RequestOutput


@dataclass
class CascadeInfo:
    """Attributes:
        deferral: ``"token"`` or ``"response"``.
        model_index: response level: the model (0 = cheapest) whose answer
            this is; token level: None (every token was judged on its own).
        confidences: response level: the mean confidence of each answer that
            was generated for the request, cheapest model first (the last
            one is the answer kept).
        num_judged / num_kept: token level: small-model tokens judged by the
            rule and kept (the others were replaced by the large model's).
        num_agree_large: token level: output tokens equal to the large
            model's greedy choice at their prefix.
    """

    deferral: str
    model_index: int | None = None
    confidences: list[float] = field(default_factory=list)
    num_judged: int = 0
    num_kept: int = 0
    num_agree_large: int = 0


@dataclass
class CascadeRequestOutput(RequestOutput):
    cascade: CascadeInfo | None = None
