"""The converted copy of a GGUF model: what later loads read must be what the GGUF gives."""

from __future__ import annotations

import os

import pytest
import torch

from llmopt import models
from llmopt.models import converted_cache


def test_the_key_follows_the_file_and_the_location(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"abc")
    first = converted_cache.entry_path(gguf, tmp_path / "cache")
    assert converted_cache.entry_path(gguf, tmp_path / "cache") == first
    os.utime(gguf, ns=(1, 1))  # a changed file is another entry
    assert converted_cache.entry_path(gguf, tmp_path / "cache") != first
    monkeypatch.setenv("LLMOPT_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert converted_cache.cache_root() == tmp_path / "elsewhere" / "converted"
    monkeypatch.delenv("LLMOPT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert converted_cache.cache_root() == tmp_path / "xdg" / "llmopt" / "converted"


@pytest.mark.long
@pytest.mark.slow
def test_the_cached_copy_equals_the_gguf(tmp_path, monkeypatch):
    """Reference: transformers' own GGUF load (cache=False). The copy must give the same
    logits bit for bit (float32 weights written as they are), the same tokens and chat
    prompt, and a later load must read the copy, not the GGUF."""
    reference, tokenizer = models.load("smollm2", cache=False)
    monkeypatch.setenv("LLMOPT_CACHE_DIR", str(tmp_path))
    gguf = models.gguf_path()
    entry = converted_cache.entry_path(gguf)
    assert converted_cache.write_entry(entry, reference, tokenizer)
    assert converted_cache.is_complete(entry) and not list(entry.parent.glob(".*"))  # no scratch left

    messages = []
    copy, copy_tokenizer = models.load("smollm2", progress=messages.append)
    assert messages == []  # a hit: no conversion
    text = "The quick brown fox, naïve café: 12345 <|im_end|>"
    ids = tokenizer(text)["input_ids"]
    assert copy_tokenizer(text)["input_ids"] == ids
    assert copy_tokenizer.decode(ids) == tokenizer.decode(ids)
    spaced = tokenizer(" a , b . c ! d 's e n't")["input_ids"]
    assert copy_tokenizer.decode(spaced) == tokenizer.decode(spaced)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert (copy_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            == tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))
    assert copy.config.tie_word_embeddings == reference.config.tie_word_embeddings
    assert copy.lm_head.weight.data_ptr() == copy.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([ids])
    with torch.no_grad():
        assert torch.equal(copy(ids).logits, reference(ids).logits)

    half, _ = models.load("smollm2", dtype=torch.bfloat16)
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16


@pytest.mark.slow
def test_an_unwritable_cache_is_a_warning_not_an_error(tmp_path, smollm2):
    model, tokenizer = smollm2
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.warns(UserWarning, match="could not cache"):
        assert not converted_cache.write_entry(blocked / "entry", model, tokenizer)
