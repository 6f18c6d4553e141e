"""What each model of a cascade costs: forwards, tokens, wall time and FLOPs.

FLOPs are counted from the model's shape, not measured: a fed token costs
``2 * (parameters of the decoder's linear layers)`` (one multiply-add per
weight) plus attention, ``4 * layers * heads * head_dim * context`` (scores
``Q K^T`` and the weighted sum ``A V``, each a multiply-add per cached
position); a row whose logits are computed adds ``2 * vocab * hidden`` for
``lm_head`` (the runner computes the head only on the rows it samples). A
quantized or 2:4-pruned model is counted at its dense shape: int4 weights
still do one multiply-add each, and a 2:4 pattern only halves the work
where a kernel skips the zeros.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ModelShape:
    """The parts of a model's shape its FLOPs per token depend on."""

    decoder_linear_params: int  # weights of every nn.Linear except lm_head
    head_params: int  # lm_head's weights (vocab x hidden)
    num_layers: int
    attention_width: int  # query heads x head dim

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ModelShape":
        head = getattr(model, "lm_head", None)
        head_params = head.weight.numel() if isinstance(head, torch.nn.Linear) else 0
        decoder = sum(m.weight.numel() for m in model.modules()
                      if isinstance(m, torch.nn.Linear) and m is not head)
        config = getattr(model, "config", None)
        layers = int(getattr(config, "num_hidden_layers", 0) or 0)
        heads = int(getattr(config, "num_attention_heads", 0) or 0)
        head_dim = getattr(config, "head_dim", None) or (
            int(getattr(config, "hidden_size", 0) or 0) // heads if heads else 0)
        return cls(decoder, head_params, layers, heads * int(head_dim))

    def forward_flops(self, start: int, count: int, logit_rows: int) -> int:
        """FLOPs of feeding ``count`` tokens at positions ``start...`` and computing
        ``logit_rows`` rows of logits. The token at position p attends to p + 1 positions."""
        # sum of (p + 1) for p in [start, start + count)
        context = count * start + count * (count + 1) // 2
        return (2 * self.decoder_linear_params * count + 2 * self.head_params * logit_rows
                + 4 * self.num_layers * self.attention_width * context)

    def flops_per_token(self, context: int) -> int:
        """One decoded token at a context of ``context`` positions (logits included)."""
        return self.forward_flops(max(context - 1, 0), 1, 1)


@dataclass
class ModelCost:
    """A cascade member's running totals."""

    name: str
    shape: ModelShape
    num_forwards: int = 0  # forward passes (one batch each)
    num_tokens: int = 0  # tokens fed
    num_emitted: int = 0  # output tokens this model's choice produced
    seconds: float = 0.0  # wall time of its forwards (and its sampling)
    flops: int = 0

    def add(self, seconds: float, forwards: int = 1) -> None:
        self.seconds += seconds
        self.num_forwards += forwards

    def add_tokens(self, start: int, count: int, logit_rows: int) -> None:
        self.num_tokens += count
        self.flops += self.shape.forward_flops(start, count, logit_rows)

    def to_dict(self) -> dict:
        return {"name": self.name, "forwards": self.num_forwards, "tokens_fed": self.num_tokens,
                "tokens_emitted": self.num_emitted, "seconds": self.seconds, "flops": self.flops,
                "ms_per_forward": 1e3 * self.seconds / self.num_forwards if self.num_forwards else None,
                "decoder_linear_params": self.shape.decoder_linear_params,
                "head_params": self.shape.head_params}


@dataclass
class CascadeStats:
    """Per-model costs and the cascade's deferrals, summed over every request so far."""

    models: list[ModelCost] = field(default_factory=list)
    num_requests: int = 0
    num_emitted: int = 0  # output tokens of finished requests
    # Token level: tokens judged by the rule, the small model's kept, and emitted
    # tokens equal to the large model's greedy choice at their prefix.
    num_judged: int = 0
    num_kept: int = 0
    num_agree_large: int = 0
    num_rounds: int = 0  # token level: draft-and-check rounds (one large forward each)
    # Response level: how many requests each model answered.
    answered_by: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = {"requests": self.num_requests, "tokens_emitted": self.num_emitted,
               "models": [m.to_dict() for m in self.models],
               "flops": sum(m.flops for m in self.models)}
        if self.num_judged:
            out.update(judged=self.num_judged, kept=self.num_kept, rounds=self.num_rounds,
                       agree_large=self.num_agree_large)
        if self.answered_by:
            out["answered_by"] = list(self.answered_by)
        return out
