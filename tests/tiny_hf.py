"""A seeded random Llama and a byte-level tokenizer, saved as a Hugging Face directory.

What tests hand to the CLI and the server through their documented
``--model DIR`` (a local Hugging Face model directory), so they load a small
model the way a user's would be loaded, with no loader patched.
"""

from __future__ import annotations

from pathlib import Path

VOCAB = 258  # 256 bytes, <s>, </s>


def byte_tokenizer(chat_template: str | None = None):
    """A byte-level BPE tokenizer with no merges: one token per byte, plus <s> and </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {char: i for i, char in enumerate(alphabet)}
    vocab.update({"<s>": 256, "</s>": 257})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    tokenizer.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def save_tiny_llama(folder: Path, *, heads: str = "gqa", chat_template: str | None = None, **model_settings) -> Path:
    """``random_llama(heads, vocab_size=258, **model_settings)`` and :func:`byte_tokenizer`, saved in ``folder``."""
    from llmopt.models.random_models import random_llama

    folder = Path(folder)
    byte_tokenizer(chat_template).save_pretrained(folder)
    random_llama(heads, **{"vocab_size": VOCAB, **model_settings}).save_pretrained(folder)
    return folder
