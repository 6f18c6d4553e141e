"""llmopt::attention (CPU path) against an fp64 reference, outputs and gradients."""

import pytest
import torch

from oracles import attention_reference

# fp64 in, fp64 out: both sides are exact up to summation order, so errors are
# a few ulps of values of size O(1); 1e-10 leaves room while catching any bug.
FP64_TOL = 1e-10


def _inputs(batch, q_heads, kv_heads, q_len, k_len, head_dim, dtype=torch.float64):
    gen = torch.Generator().manual_seed(q_heads * 100 + q_len)
    def make(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()
    return (make(batch, q_heads, q_len, head_dim), make(batch, kv_heads, k_len, head_dim),
            make(batch, kv_heads, k_len, head_dim))


def _mask(kind, batch, q_len, k_len):
    gen = torch.Generator().manual_seed(7)
    if kind == "bool_keys":  # padding-style mask, broadcast over heads and queries
        mask = torch.rand(batch, 1, 1, k_len, generator=gen) > 0.3
        mask[..., 0] = True
        return mask
    if kind == "additive":
        return torch.randn(1, 1, q_len, k_len, generator=gen, dtype=torch.float64)
    return None


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("causal_offset", [None, 0, 3])
@pytest.mark.parametrize("mask_kind", [None, "bool_keys", "additive"])
@pytest.mark.parametrize("lengths", [(5, 8), (1, 9), (7, 7)])
def test_attention_matches_fp64_reference(heads, causal_offset, mask_kind, lengths):
    q_len, k_len = lengths
    q, k, v = _inputs(2, heads[0], heads[1], q_len, k_len, 24)
    mask = _mask(mask_kind, 2, q_len, k_len)
    out, lse = torch.ops.llmopt.attention(q, k, v, mask, causal_offset, None)
    ref_out, ref_lse = attention_reference(q, k, v, mask, causal_offset, None)
    # Rows that see no key: both give out = 0; lse is only meaningful elsewhere.
    visible = torch.isfinite(ref_lse)
    torch.testing.assert_close(out, ref_out, atol=FP64_TOL, rtol=0)
    torch.testing.assert_close(lse[visible], ref_lse[visible], atol=FP64_TOL, rtol=0)

    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref_out, (q, k, v), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=FP64_TOL, rtol=0)


def test_attention_op_registration_is_consistent():
    # opcheck runs the fake impl, schema checks and autograd registration
    # against the real kernel.
    q, k, v = _inputs(1, 4, 2, 5, 6, 16, dtype=torch.float32)
    mask = torch.ones(1, 1, 5, 6, dtype=torch.bool)
    torch.library.opcheck(torch.ops.llmopt.attention.default, (q, k, v, mask, None, 0.3))
    torch.library.opcheck(torch.ops.llmopt.attention.default, (q, k, v, None, 1, None))
    # Non-contiguous inputs (heads transposed out of (B, L, H, D)): results must
    # still have the strides the fake kernel promises.
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.llmopt.attention.default, (qt, kt, vt, None, 0, None))


def test_attention_fp32_against_fp64():
    q, k, v = _inputs(2, 6, 2, 33, 33, 80, dtype=torch.float32)
    out, _ = torch.ops.llmopt.attention(q, k, v, None, 0, None)
    ref, _ = attention_reference(q.double(), k.double(), v.double(), None, 0, None)
    # fp32 accumulation over 33 keys of O(1) terms: error ~ 33 * 2^-24 relative.
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("heads", [(4, 4), (6, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("causal_offset", [None, 0])
def test_attention_dropout_matches_reference_with_same_mask(heads, causal_offset):
    q, k, v = _inputs(2, heads[0], heads[1], 6, 9, 16)
    seed = torch.tensor(1234)
    out, _ = torch.ops.llmopt.attention(q, k, v, None, causal_offset, None, 0.3, seed)
    ref, _ = attention_reference(q, k, v, None, causal_offset, None, 0.3, seed)
    torch.testing.assert_close(out, ref, atol=FP64_TOL, rtol=0)
    grad = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(g, w, atol=FP64_TOL, rtol=0)
    # The same seed gives the same mask; another seed another one.
    again, _ = torch.ops.llmopt.attention(q, k, v, None, causal_offset, None, 0.3, seed)
    other, _ = torch.ops.llmopt.attention(q, k, v, None, causal_offset, None, 0.3, torch.tensor(99))
    assert torch.equal(again, out) and not torch.equal(other, out)


def test_attention_dropout_drops_the_stated_fraction():
    q, k, v = _inputs(1, 2, 2, 64, 64, 16)
    keep = __import__("llmopt.kernels.attention_dropout", fromlist=["x"]).dropout_keep_mask(
        torch.tensor(5), (1, 2, 64, 64), 0.25, "cpu")
    # 8192 Bernoulli(0.75) draws: std of the mean is 0.0048; 0.02 is > 4 sigma.
    assert abs(keep.float().mean().item() - 0.75) < 0.02


# ---------------------------------------------------------------- native few-row kernel
# Decode-sized CPU calls (Lq <= 8, group * Lq <= 64 query rows per kv head, fp32/bf16) run in
# kernels/native/dense_attention.c. fp32 tolerance: fp32 accumulation over <= 300
# keys of O(1) terms with an exp polynomial of relative error < 1e-8 gives errors
# ~1e-6; 2e-5 catches any wrong key, mask entry or head mapping (errors of O(0.1)).
from llmopt.kernels import attention as attention_module  # noqa: E402


def _native_or_skip(q, k, v, mask, causal_offset):
    result = attention_module._native_rows_attention(q, k, v, mask, causal_offset, None)
    if result is None:
        pytest.skip("the native attention kernel could not be built here (no C compiler?)")
    return result


@pytest.mark.parametrize("shape", [
    # batch, q_heads, kv_heads, q_len, k_len, head_dim: GQA decode (SmolLM2), MQA with a
    # 32-query group, MHA appends; lengths around the 64-key chunk; odd head dims.
    (1, 9, 3, 1, 256, 64), (2, 32, 1, 1, 65, 128), (3, 4, 4, 3, 63, 24),
    (1, 8, 2, 4, 1, 72), (2, 6, 3, 2, 300, 80), (1, 16, 16, 1, 129, 256),
])
@pytest.mark.parametrize("mask_kind", [None, "bool_keys", "additive", "finfo_min", "causal"])
def test_native_rows_attention_fp32(shape, mask_kind):
    batch, q_heads, kv_heads, q_len, k_len, head_dim = shape
    q, k, v = (t.detach() for t in _inputs(batch, q_heads, kv_heads, q_len, k_len, head_dim, torch.float32))
    mask, causal_offset = None, None
    if mask_kind == "causal":
        causal_offset = k_len - q_len
    elif mask_kind == "finfo_min":  # Hugging Face's static-cache style: unused slots get the dtype's min
        mask = torch.zeros(batch, 1, q_len, k_len)
        mask[..., (k_len + 1) // 2:] = torch.finfo(torch.float32).min
    elif mask_kind is not None:
        mask = _mask(mask_kind, batch, q_len, k_len)
        mask = mask.float() if mask.dtype == torch.float64 else mask
    out, lse = _native_or_skip(q, k, v, mask, causal_offset)
    ref_out, ref_lse = attention_reference(q.double(), k.double(), v.double(),
                                           mask.double() if mask is not None and mask.is_floating_point() else mask,
                                           causal_offset, None)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=1e-6)


def test_native_rows_attention_strided_inputs_and_hidden_rows():
    # (B, L, H, D) tensors seen as (B, H, L, D), keys broadcast over the batch with
    # stride 0, and a row that sees no key (out 0, lse -inf, as the op's contract says).
    base_q = torch.randn(2, 1, 6, 40)
    base_k = torch.randn(1, 50, 2, 40).expand(2, 50, 2, 40)
    base_v = torch.randn(1, 50, 2, 40).expand(2, 50, 2, 40)
    q, k, v = (t.transpose(1, 2) for t in (base_q, base_k, base_v))
    mask = torch.ones(2, 1, 1, 50, dtype=torch.bool)
    mask[1] = False
    out, lse = _native_or_skip(q, k, v, mask, None)
    ref_out, ref_lse = attention_reference(q.double(), k.double(), v.double(), mask, None, None)
    torch.testing.assert_close(out[0].double(), ref_out[0], atol=2e-5, rtol=0)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isinf(lse[1]).all() and (lse[1] < 0).all()


@pytest.mark.parametrize("batch_kv_len", [(1, 320), (2, 190)])
def test_native_rows_attention_skips_hidden_chunks(batch_kv_len):
    """A static KV cache: most key chunks are hidden from every row and are skipped
    unread. Per-row (B, Hq, Lq, Lk) bool masks with different visible spans (one only
    inside the middle chunk) match the fp64 reference, and the same mask as 0/-inf
    floats gives bit-identical results."""
    batch, k_len = batch_kv_len
    q, k, v = (t.detach() for t in _inputs(batch, 6, 2, 3, k_len, 64, torch.float32))
    # Chunks of 64 keys: from 192 on no row sees a key, and reading one would poison the output.
    k[..., 192:, :] = float("nan")
    v[..., 192:, :] = float("nan")
    visible = torch.zeros(batch, 6, 3, k_len, dtype=torch.bool)
    visible[..., :128] = True  # decode of 3 appended tokens at positions 127..129, causal
    for row in range(3):
        visible[:, :, row, 128:128 + row] = True
    visible[:, 4, :, :] = False  # one head sees only keys 70..99 (the middle of chunk 1)
    visible[:, 4, :, 70:100] = True
    out, lse = _native_or_skip(q, k, v, visible, None)
    ref_out, ref_lse = attention_reference(q.double(), k.nan_to_num().double(), v.nan_to_num().double(),
                                           visible, None, None)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=1e-6)
    additive = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))
    out_f, lse_f = _native_or_skip(q, k, v, additive, None)
    assert torch.equal(out_f, out) and torch.equal(lse_f, lse)


def test_native_rows_attention_bf16():
    q, k, v = (t.detach().to(torch.bfloat16) for t in _inputs(2, 9, 3, 1, 200, 64, torch.float32))
    out, lse = _native_or_skip(q, k, v, None, None)
    assert out.dtype == torch.bfloat16
    ref_out, ref_lse = attention_reference(q.double(), k.double(), v.double(), None, None, None)
    # The inputs are exact in fp64; fp32 accumulation, then one bf16 rounding of
    # outputs of size < 1 (half an ulp: 2^-9).
    torch.testing.assert_close(out.double(), ref_out, atol=4e-3, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=1e-6)


def test_op_uses_native_rows_for_decode_and_flash_otherwise():
    q, k, v = (t.detach() for t in _inputs(1, 9, 3, 1, 40, 64, torch.float32))
    before = attention_module.native_rows_calls()
    decode, _ = torch.ops.llmopt.attention(q, k, v, None, 39, None)
    assert attention_module.native_rows_calls() == before + 1
    flash, _ = torch.ops.llmopt.attention(q, k, v, None, 39, None, impl="torch")  # the flash kernel only
    torch.testing.assert_close(decode, flash, atol=2e-6, rtol=0)
    assert attention_module.native_rows_calls() == before + 1  # impl="torch" did not reach the native kernel
    prefill = torch.randn(1, 9, 9, 64)  # 9 query tokens: a prefill chunk, for the flash kernel
    assert attention_module._native_rows_attention(prefill, k, v, None, 31, None) is None
    wide = torch.randn(1, 99, 2, 64)  # 2 tokens, but a group of 33: 66 rows per kv head, past 64
    assert attention_module._native_rows_attention(wide, k, v, None, 38, None) is None
    assert attention_module._native_rows_attention(q.double(), k.double(), v.double(), None, 39, None) is None
