"""llmopt::attention (CPU path) against an fp64 reference, outputs and gradients."""

import pytest
import torch

from llmopt.kernels.attention import attention_reference

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
