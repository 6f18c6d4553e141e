"""``llmopt::attention_kv_cache`` (the export form of attention) against plain
attention over the concatenated cache, in fp64 (so only the kernel's own
rounding shows: observed <= 1e-14; the tolerance is torch's fp64 default)."""

import torch

from oracles import attention_reference
from llmopt.onnx.kv_attention import attention_kv_cache

F64 = torch.float64


def _qkv(batch, q_heads, kv_heads, tokens, past, head_dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    def t(h, n):
        return torch.randn(batch, h, n, head_dim, generator=g, dtype=F64)
    return t(q_heads, tokens), t(kv_heads, tokens), t(kv_heads, tokens), t(kv_heads, past), t(kv_heads, past)


def test_appends_to_the_cache_and_attends_causally_from_the_past_length():
    q, k, v, past_k, past_v = _qkv(batch=2, q_heads=4, kv_heads=2, tokens=3, past=5)
    out, present_k, present_v = attention_kv_cache(q, k, v, past_k, past_v, 0.3)
    torch.testing.assert_close(present_k, torch.cat((past_k, k), 2), rtol=0, atol=0)
    torch.testing.assert_close(present_v, torch.cat((past_v, v), 2), rtol=0, atol=0)
    # query i is at position 5 + i: it sees keys j <= 5 + i
    expected = attention_reference(q, present_k, present_v, causal_offset=5, scale=0.3)[0]
    torch.testing.assert_close(out, expected)


def test_empty_past_is_plain_causal_attention():
    q, k, v, past_k, past_v = _qkv(batch=1, q_heads=3, kv_heads=1, tokens=6, past=0)
    out, present_k, _ = attention_kv_cache(q, k, v, past_k, past_v, 0.5)
    assert present_k.shape == k.shape
    torch.testing.assert_close(out, attention_reference(q, k, v, causal_offset=0, scale=0.5)[0])


def test_sliding_window_sees_only_the_last_window_keys():
    q, k, v, past_k, past_v = _qkv(batch=1, q_heads=2, kv_heads=2, tokens=4, past=6)
    out, present_k, present_v = attention_kv_cache(q, k, v, past_k, past_v, 0.25, 3)
    rows = torch.arange(6, 10)[:, None]
    cols = torch.arange(10)[None, :]
    mask = (cols <= rows) & (rows - cols < 3)  # Mistral's window: i - j < window
    expected = attention_reference(q, present_k, present_v, attn_mask=mask, scale=0.25)[0]
    torch.testing.assert_close(out, expected)
