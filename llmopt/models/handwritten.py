"""A GPT-2-style decoder written by hand, without transformers.

Its attention is spelled out op by op (matmul, scale, mask, softmax, matmul)
the way people write it in their own models, rather than calling
F.scaled_dot_product_attention, so llmopt must recognise the pattern itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn


@dataclass(frozen=True)
class HandwrittenGPTConfig:
    vocab_size: int = 256
    max_len: int = 128
    num_layers: int = 2
    num_heads: int = 4
    hidden_size: int = 64
    dropout: float = 0.0  # on the attention probabilities


class CausalSelfAttention(nn.Module):
    def __init__(self, config: HandwrittenGPTConfig):
        super().__init__()
        if config.hidden_size % config.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.hidden_size = config.hidden_size
        self.c_attn = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.c_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.attn_dropout = nn.Dropout(config.dropout)
        mask = torch.tril(torch.ones(config.max_len, config.max_len, dtype=torch.bool))
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.c_attn(x).split(self.hidden_size, dim=2)
        q = q.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        out = self.attend(q, k, v)
        out = out.transpose(1, 2).contiguous().view(batch, length, self.hidden_size)
        return self.c_proj(out)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention over (batch, heads, length, head_dim) tensors."""
        length = q.shape[-2]
        scores = q @ k.transpose(-2, -1)
        scores = scores / math.sqrt(self.head_dim)
        mask = self.causal_mask[:length, :length]
        scores = scores.masked_fill(~mask, float("-inf"))
        # Softmax in fp32 so half-precision runs keep their accuracy.
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        probs = self.attn_dropout(probs)
        return probs @ v


class MLP(nn.Module):
    def __init__(self, config: HandwrittenGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, 4 * config.hidden_size)
        self.act = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: HandwrittenGPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.hidden_size)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class HandwrittenGPT(nn.Module):
    """Pre-norm GPT-2 decoder; ``forward(input_ids)`` returns logits."""

    def __init__(self, config: HandwrittenGPTConfig | None = None):
        super().__init__()
        self.config = config = config or HandwrittenGPTConfig()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_len, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, T, V)``. ``position_ids`` (default ``0..T-1``) lets the serving
        runtime feed packed steps of several sequences (its model protocol)."""
        length = input_ids.shape[1]
        if position_ids is None:
            if length > self.config.max_len:
                raise ValueError(f"sequence of {length} tokens exceeds max_len={self.config.max_len}")
            position_ids = torch.arange(length, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(position_ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def random_handwritten_gpt(seed: int = 0, **overrides) -> HandwrittenGPT:
    """A seeded HandwrittenGPT in eval mode; ``overrides`` are config fields."""
    config = replace(HandwrittenGPTConfig(), **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HandwrittenGPT(config)
    return model.eval()
