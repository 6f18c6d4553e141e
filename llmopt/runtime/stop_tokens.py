"""The one end-of-sequence rule, used by the engine and by the plain loop (``generate.py``).

EOS ids are the union of the generation config's ``eos_token_id`` (an int or a
list), the tokenizer's, and ``<|im_end|>`` where the vocabulary has it: chat
models end a turn with it, and it is not always marked as eos (the SmolLM2
GGUF tokenizer names ``<|im_start|>`` as its eos token).
"""

from __future__ import annotations

__all__ = ["eos_token_ids"]

CHAT_TURN_END = "<|im_end|>"


def eos_token_ids(model, tokenizer=None) -> set[int]:
    """The token ids that end a sequence for ``model`` (and ``tokenizer``, if given)."""
    ids: set[int] = set()
    generation = getattr(model, "generation_config", None)
    for value in (getattr(generation, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple, set, frozenset)):
            ids.update(int(v) for v in value)
    if tokenizer is not None and hasattr(tokenizer, "get_vocab") and CHAT_TURN_END in tokenizer.get_vocab():
        ids.add(int(tokenizer.convert_tokens_to_ids(CHAT_TURN_END)))
    return ids
