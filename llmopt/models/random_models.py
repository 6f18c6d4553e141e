"""Tiny Hugging Face models with seeded random weights, for tests and benchmarks.

Small vocabularies and widths keep them fast on CPU; the same seed always
gives the same weights, and building one leaves the global RNG untouched.
"""

from __future__ import annotations

import torch

# Query heads -> key/value heads for each attention layout (4 query heads).
NUM_HEADS = 4
HEAD_LAYOUTS = {"mha": NUM_HEADS, "gqa": NUM_HEADS // 2, "mqa": 1}

# Shared by every architecture; any of them can be overridden per call.
# Random weights have no meaningful end token, so none is set: generation runs
# to its length limit unless the caller names stop tokens.
_SMALL = dict(
    vocab_size=256,
    max_position_embeddings=512,
    intermediate_size=128,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)


def random_llama(
    heads: str = "mha",
    num_layers: int = 2,
    hidden_size: int = 64,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    **overrides,
):
    """A seeded random LlamaForCausalLM; ``heads`` is "mha", "gqa" or "mqa"."""
    if heads not in HEAD_LAYOUTS:
        raise ValueError(f"unknown heads {heads!r}: use one of {', '.join(HEAD_LAYOUTS)}")
    settings = dict(
        num_hidden_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=HEAD_LAYOUTS[heads],
    )
    return random_hf_model("llama", attn_implementation, seed, **{**settings, **overrides})


def random_hf_model(arch: str, attn_implementation: str = "sdpa", seed: int = 0, **overrides):
    """A seeded random causal LM: ``arch`` is "llama", "qwen2", "mistral" or "gpt2".

    ``overrides`` are config fields (in the architecture's own naming).
    """
    if arch not in _CONFIGS:
        raise ValueError(f"unknown arch {arch!r}: use one of {', '.join(_CONFIGS)}")
    config = _CONFIGS[arch](overrides)
    config._attn_implementation = attn_implementation
    from transformers import AutoModelForCausalLM

    # fork_rng: seeding must not disturb the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def _llama_like(config_class_name: str):
    def build(overrides):
        import transformers

        fields = dict(
            _SMALL,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=NUM_HEADS,
            num_key_value_heads=NUM_HEADS,
            # Wider than HF's 0.02 so random logits are not nearly flat, which
            # would make greedy decoding hinge on rounding-level ties.
            initializer_range=0.1,
            tie_word_embeddings=False,
        )
        fields.update(overrides)
        return getattr(transformers, config_class_name)(**fields)

    return build


def _gpt2(overrides):
    from transformers import GPT2Config

    fields = dict(
        vocab_size=_SMALL["vocab_size"],
        n_positions=_SMALL["max_position_embeddings"],
        bos_token_id=None,
        eos_token_id=None,
        n_embd=64,
        n_layer=2,
        n_head=NUM_HEADS,
        initializer_range=0.1,
        # Dropout off so train/eval and compiled/eager runs agree exactly.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    fields.update(overrides)
    return GPT2Config(**fields)


_CONFIGS = {
    "llama": _llama_like("LlamaConfig"),
    "qwen2": _llama_like("Qwen2Config"),
    "mistral": _llama_like("MistralConfig"),
    "gpt2": _gpt2,
}
