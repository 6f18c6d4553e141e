"""Triton flash-attention kernels (llmopt.kernels.triton_flash) against an fp64 reference.

On a CPU-only machine the kernels run under the Triton interpreter (TRITON_INTERPRET=1,
set below before triton is imported). With ``TRITON_INTERPRET=0`` on a CUDA machine the
same tests run on the GPU, with bf16 added to the dtypes.

Every comparison is against a float64 PyTorch reference computed from the *same*
(already rounded) low-precision inputs, so only the kernel's own rounding is measured.
Repeated KV heads are materialised in the reference only.
"""

import math
import os

import pytest
import torch

# Interpreter on CPU-only machines; real kernels where CUDA is present (as in tests/conftest.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from llmopt.kernels import triton_flash as tf  # noqa: E402

INTERPRET = tf._INTERPRET
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("triton_flash was imported without TRITON_INTERPRET=1 and no CUDA device is present",
                allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# The interpreter has no bf16 tl.dot; on a GPU bf16 is covered too.
DTYPES = [F32, F16] if INTERPRET else [F32, F16, BF16]

# Tolerances (atol, rtol), applied elementwise as |x - ref| <= atol + rtol * |ref|.
# Values are O(1): inputs ~ N(0, 1), scores ~ N(0, 1) after the 1/sqrt(D) scale,
# and sequences are <= 70 keys, so gradients stay O(1..10).
TOL = {
    # fp32 inputs, fp32 (IEEE) matmuls and fp32 softmax statistics: errors come from fp32
    # rounding (2^-24 ~ 6e-8 relative) in sums of <= 256 products and in exp2/log2, i.e.
    # ~1e-6 absolute on O(1) values (observed under the interpreter: out 1.1e-6, lse 6e-7,
    # grads 2.3e-6). 2e-5 / 5e-5 leave >10x headroom and still catch indexing / masking
    # bugs, which produce O(0.1..1) errors.
    (F32, "out"): (2e-5, 1e-4),
    (F32, "lse"): (2e-5, 1e-5),
    (F32, "grad"): (5e-5, 2e-4),
    # fp16: P is rounded to fp16 before the P@V matmul and the output is rounded to fp16
    # (eps 2^-11 ~ 4.9e-4 relative), so with |out| <= ~3 errors reach ~1.5e-3
    # (observed 1.0e-3): atol 2e-3 plus rtol 2e-3.
    (F16, "out"): (2e-3, 2e-3),
    # lse only depends on Q K^T of fp16 values accumulated in fp32 (products are exact in
    # fp32), so it has fp32-level error (observed 1.1e-6), same bound as fp32.
    (F16, "lse"): (2e-5, 1e-5),
    # gradients: P, dS and dO enter the backward matmuls as fp16 (each ~4.9e-4 relative),
    # sums run over up to 6 heads x 70 rows, and dq/dk/dv are rounded to fp16; values reach
    # ~10, so atol 1e-2 plus rtol 1e-2 (observed max abs error 3e-3).
    (F16, "grad"): (1e-2, 1e-2),
    # bf16 (GPU only): eps 2^-8 ~ 3.9e-3, i.e. 8x the fp16 rounding.
    (BF16, "out"): (1.6e-2, 1.6e-2),
    (BF16, "lse"): (2e-5, 1e-5),
    (BF16, "grad"): (8e-2, 5e-2),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


# ----------------------------------------------------------------------------- reference


def _resolve_offset(causal_offset, lq, lk):
    if causal_offset == "bottom_right":
        return lk - lq
    if causal_offset == "top_left":
        return 0
    return causal_offset


def reference_attention(q, k, v, mask=None, causal_offset=None, scale=None):
    """float64 attention with the kernels' semantics (rows with no visible key -> 0).

    ``q`` (B, Hq, Lq, D), ``k``/``v`` (B, Hkv, Lk, D); float64 tensors, may require grad.
    Returns (out, lse).
    """
    _, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = hq // hkv
    k = k.repeat_interleave(group, dim=1)  # materialised in the reference only
    v = v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            s = s.masked_fill(~mask.to(s.device), float("-inf"))
        else:
            s = s + mask.to(device=s.device, dtype=torch.float64)
    c = _resolve_offset(causal_offset, lq, lk)
    if c is not None:
        rows = torch.arange(lq, device=s.device)[:, None]
        cols = torch.arange(lk, device=s.device)[None, :]
        s = s.masked_fill(cols > rows + c, float("-inf"))
    lse = torch.logsumexp(s.detach(), dim=-1)
    valid = (s.detach() > float("-inf")).any(dim=-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~valid, 0.0), dim=-1) * valid
    return torch.matmul(p, v), lse


def _assert_close(actual, expected, dtype, kind, what):
    atol, rtol = TOL[(dtype, kind)]
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{what}: NaN in kernel output"
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=False, msg=lambda m: f"{what}: {m}")


def _make_qkv(b, hq, hkv, lq, lk, d, dtype):
    q = torch.randn(b, hq, lq, d, device=DEVICE).to(dtype)
    k = torch.randn(b, hkv, lk, d, device=DEVICE).to(dtype)
    v = torch.randn(b, hkv, lk, d, device=DEVICE).to(dtype)
    return q, k, v


def _check_against_reference(q, k, v, mask=None, causal_offset=None, scale=None, grad_out=None, backward=True):
    """Run kernel forward (+ backward) and compare with the fp64 reference."""
    dtype = q.dtype
    out, lse = tf.flash_attention_forward(q, k, v, mask=mask, causal_offset=causal_offset, scale=scale)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.is_contiguous() and lse.is_contiguous()

    q64, k64, v64 = (t.detach().to("cpu", torch.float64).requires_grad_() for t in (q, k, v))
    mask_ref = None if mask is None else mask.to("cpu")
    ref_out, ref_lse = reference_attention(q64, k64, v64, mask_ref, causal_offset, scale)
    _assert_close(out, ref_out, dtype, "out", "out")
    # -inf rows must match exactly; compare the finite part numerically.
    ref_inf = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse.cpu()), ref_inf), "lse: -inf rows differ"
    assert (lse.cpu()[ref_inf] < 0).all()
    _assert_close(lse.cpu().masked_fill(ref_inf, 0), ref_lse.masked_fill(ref_inf, 0), dtype, "lse", "lse")
    if not backward:
        return out, lse, None

    if grad_out is None:
        grad_out = torch.randn(out.shape, device=DEVICE).to(dtype)
    ref_out.backward(grad_out.detach().to("cpu", torch.float64))
    dq, dk, dv = tf.flash_attention_backward(grad_out, q, k, v, out, lse, mask=mask,
                                             causal_offset=causal_offset, scale=scale)
    for name, got, ref_t, like in (("dq", dq, q64, q), ("dk", dk, k64, k), ("dv", dv, v64, v)):
        assert got.shape == like.shape and got.dtype == dtype and got.is_contiguous(), name
        _assert_close(got, ref_t.grad, dtype, "grad", name)
    return out, lse, (dq, dk, dv)


# ----------------------------------------------------------------------------- core shapes

# (id, B, Hq, Hkv, Lq, Lk, D, causal_offset). Interpreter blocks are 32x16 (forward, dQ)
# and 16x32 (dK/dV), so 1/7/17/33/65/70 exercise ragged edges and multi-block loops.
CORE = [
    ("decode-mha", 1, 4, 4, 1, 33, 64, None),
    ("decode-gqa-br", 2, 4, 2, 1, 65, 64, "bottom_right"),
    ("decode-mqa-br", 1, 6, 1, 1, 7, 128, "bottom_right"),
    ("chunk-mqa-br", 1, 6, 1, 7, 70, 80, "bottom_right"),
    ("chunk-gqa-br-int", 2, 4, 2, 33, 65, 96, 32),
    ("square-mha-causal", 2, 4, 4, 33, 33, 40, 0),
    ("square-gqa-causal", 1, 4, 2, 65, 65, 96, 0),
    ("square-mqa-none", 1, 6, 1, 65, 65, 16, None),
    ("lq>lk-none", 1, 4, 2, 65, 7, 64, None),
    ("lq>lk-topleft", 1, 4, 4, 65, 33, 72, 0),
    ("lq<lk-topleft", 2, 4, 2, 33, 65, 128, 0),
    ("offset+5", 1, 4, 2, 33, 33, 64, 5),
    ("offset-3-empty-rows", 1, 4, 4, 33, 40, 40, -3),
    ("br-lq>lk-empty-rows", 1, 4, 2, 40, 20, 64, "bottom_right"),
    ("offset-huge", 1, 2, 1, 17, 20, 16, 10**9),
    ("block-multiples", 1, 2, 2, 64, 64, 32, 0),
    ("single-token", 1, 4, 4, 1, 1, 16, 0),
    ("d256", 1, 2, 1, 17, 50, 256, 0),
]
CORE_LOWP = {"decode-gqa-br", "chunk-mqa-br", "square-gqa-causal", "lq<lk-topleft",
             "offset-3-empty-rows", "square-mqa-none", "lq>lk-none", "d256"}


def _core_params():
    params = []
    for case in CORE:
        for dtype in DTYPES:
            if dtype != F32 and case[0] not in CORE_LOWP:
                continue
            params.append(pytest.param(case[1:], dtype, id=f"{case[0]}-{str(dtype)[6:]}"))
    return params


@pytest.mark.parametrize("shape, dtype", _core_params())
def test_core(shape, dtype):
    b, hq, hkv, lq, lk, d, causal = shape
    q, k, v = _make_qkv(b, hq, hkv, lq, lk, d, dtype)
    _check_against_reference(q, k, v, causal_offset=causal)


def test_causal_offset_sweep():
    """Every residue of the causal offset modulo the block sizes (phase split of the loops)."""
    q, k, v = _make_qkv(1, 2, 1, 33, 40, 16, F32)
    for c in range(-17, 34, 3):
        _check_against_reference(q, k, v, causal_offset=c)


def test_custom_scale_and_top_left_string():
    q, k, v = _make_qkv(1, 4, 2, 17, 33, 48, F32)
    _check_against_reference(q, k, v, causal_offset="top_left", scale=0.3)


# ----------------------------------------------------------------------------- masks

B_M, LQ_M, LK_M = 2, 17, 37


def _bool_mask(shape, p_keep=0.7):
    return torch.rand(shape, device=DEVICE) < p_keep


MASKS = {
    # id: (builder() -> mask, heads (hq, hkv), causal_offset, q/k/v dtype); B=2, Lq=17, Lk=37.
    "bool-2d-causal": (lambda: _bool_mask((LQ_M, LK_M)), (4, 2), 0, F32),
    "bool-11LqLk": (lambda: _bool_mask((1, 1, LQ_M, LK_M)), (4, 4), None, F16),
    "bool-keypad-B11Lk-br": (lambda: _bool_mask((B_M, 1, 1, LK_M), 0.6), (6, 1), "bottom_right", F32),
    "bool-full-BHLqLk": (lambda: _bool_mask((B_M, 4, LQ_M, LK_M)), (4, 2), None, F16),
    "float-BHLqLk-with-inf": (
        lambda: torch.randn(B_M, 4, LQ_M, LK_M, device=DEVICE).masked_fill(
            torch.rand(B_M, 4, LQ_M, LK_M, device=DEVICE) < 0.3, float("-inf")), (4, 2), None, F32),
    "float-1H1Lk-causal": (lambda: torch.randn(1, 4, 1, LK_M, device=DEVICE), (4, 2), 0, F32),
    "float16-B1LqLk-fp16q": (lambda: torch.randn(B_M, 1, LQ_M, LK_M, device=DEVICE).half(), (4, 4), 3, F16),
    "float32-mask-fp16q-br": (lambda: 2 * torch.randn(LQ_M, LK_M, device=DEVICE), (6, 1), "bottom_right", F16),
    "float-noncontig-1d": (lambda: torch.randn(LK_M, 3, device=DEVICE)[:, 1], (4, 2), None, F32),
}


@pytest.mark.parametrize("name", list(MASKS))
def test_masks(name):
    builder, (hq, hkv), causal, dtype = MASKS[name]
    mask = builder()
    q, k, v = _make_qkv(B_M, hq, hkv, LQ_M, LK_M, 40, dtype)
    _check_against_reference(q, k, v, mask=mask, causal_offset=causal)


@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows(kind, dtype):
    """Rows that see no key: out = 0, lse = -inf, zero gradients, never NaN."""
    b, hq, hkv, lq, lk, d = 2, 6, 1, 33, 21, 64
    q, k, v = _make_qkv(b, hq, hkv, lq, lk, d, dtype)
    keep = torch.rand(b, 1, lq, lk, device=DEVICE) < 0.5
    dead_rows = [0, 5, 31, 32]  # first / interior / ragged last block rows
    keep[:, :, dead_rows, :] = False
    keep[1, :, 7, :] = False  # a row dead in one batch only
    if kind == "bool":
        mask = keep
    else:
        mask = torch.zeros(keep.shape, device=DEVICE).masked_fill(~keep, float("-inf"))
    out, lse, grads = _check_against_reference(q, k, v, mask=mask)
    dq = grads[0]
    for row_sel in (
        (slice(None), slice(None), dead_rows),
        (1, slice(None), 7),
    ):
        assert torch.all(out[row_sel] == 0)
        assert torch.all(torch.isneginf(lse[row_sel]))
        assert torch.all(dq[row_sel] == 0)
    for t in (out, *grads):
        assert torch.isfinite(t).all()


def test_causal_only_empty_rows_have_zero_grads():
    # c = -5: rows 0..4 see nothing; with causal only (no mask tensor)
    q, k, v = _make_qkv(1, 4, 2, 20, 20, 32, F32)
    out, lse, (dq, dk, dv) = _check_against_reference(q, k, v, causal_offset=-5)
    assert torch.all(out[:, :, :5] == 0) and torch.all(torch.isneginf(lse[:, :, :5]))
    assert torch.all(dq[:, :, :5] == 0)
    # keys 15..19 are seen by nobody (need i >= j + 5 with i <= 19)
    assert torch.all(dk[:, :, 15:] == 0) and torch.all(dv[:, :, 15:] == 0)


def test_everything_masked():
    q, k, v = _make_qkv(1, 2, 1, 9, 11, 16, F32)
    mask = torch.zeros(9, 11, dtype=torch.bool, device=DEVICE)
    out, lse = tf.flash_attention_forward(q, k, v, mask=mask)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    g = torch.randn_like(out)
    for t in tf.flash_attention_backward(g, q, k, v, out, lse, mask=mask):
        assert torch.all(t == 0)


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("dtype", [F32, F16])
def test_non_contiguous_inputs(dtype):
    b, hq, hkv, lq, lk, d = 2, 4, 2, 33, 40, 80
    # (B, L, H, D) storage viewed as (B, H, L, D), as produced by a QKV projection.
    q = torch.randn(b, lq, hq, d, device=DEVICE).to(dtype).transpose(1, 2)
    k = torch.randn(b, lk, hkv, d, device=DEVICE).to(dtype).transpose(1, 2)
    # v with a non-unit head-dim stride
    v = torch.randn(b, hkv, d, lk, device=DEVICE).to(dtype).transpose(2, 3)
    assert not q.is_contiguous() and not k.is_contiguous() and v.stride(-1) != 1
    grad_out = torch.randn(b, lq, hq, d, device=DEVICE).to(dtype).transpose(1, 2)
    _check_against_reference(q, k, v, causal_offset="bottom_right", grad_out=grad_out)


def test_broadcast_grad_out_and_noncontig_lse():
    """grad of out.sum() is an expanded (all-stride-0) tensor; lse may arrive as a view."""
    q, k, v = _make_qkv(1, 4, 4, 17, 17, 32, F32)
    out, lse = tf.flash_attention_forward(q, k, v, causal_offset=0)
    grad_out = torch.ones((), device=DEVICE).expand(out.shape)
    lse_view = lse.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    dq, dk, dv = tf.flash_attention_backward(grad_out, q, k, v, out, lse_view, causal_offset=0)
    q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    ref_out, _ = reference_attention(q64, k64, v64, causal_offset=0)
    ref_out.sum().backward()
    for name, got, ref_t in (("dq", dq, q64), ("dk", dk, k64), ("dv", dv, v64)):
        _assert_close(got, ref_t.grad, F32, "grad", name)


@pytest.mark.skipif(not INTERPRET, reason="block sizes are autotuned on GPU")
@pytest.mark.parametrize("blocks", [(16, 16), (64, 32)], ids=["16x16", "64x32"])
def test_other_block_sizes(blocks, monkeypatch):
    bm, bn = blocks
    monkeypatch.setitem(tf.INTERPRET_BLOCKS, "fwd", (bm, bn))
    monkeypatch.setitem(tf.INTERPRET_BLOCKS, "bwd_dq", (bm, bn))
    monkeypatch.setitem(tf.INTERPRET_BLOCKS, "bwd_dkdv", (bn, bm))
    monkeypatch.setitem(tf.INTERPRET_BLOCKS, "bwd_pre", (bn, 0))
    q, k, v = _make_qkv(1, 4, 2, 45, 70, 24, F32)
    _check_against_reference(q, k, v, causal_offset="bottom_right")
    q, k, v = _make_qkv(1, 2, 2, 70, 45, 24, F32)
    _check_against_reference(q, k, v, causal_offset=0)


def test_empty_keys_and_queries():
    q, k, v = _make_qkv(1, 2, 1, 5, 0, 16, F32)
    out, lse = tf.flash_attention_forward(q, k, v)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    dq, dk, dv = tf.flash_attention_backward(torch.ones_like(out), q, k, v, out, lse)
    assert torch.all(dq == 0) and dk.shape == k.shape
    q, k, v = _make_qkv(1, 2, 1, 0, 5, 16, F32)
    out, lse = tf.flash_attention_forward(q, k, v)
    assert out.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0)
    dq, dk, dv = tf.flash_attention_backward(out, q, k, v, out, lse)
    assert torch.all(dk == 0) and torch.all(dv == 0)


# ----------------------------------------------------------------------------- varlen


def _varlen_reference(q, k, v, cu_q, cu_k, causal_offset, scale=None):
    """Per-sequence dense fp64 reference; returns (out (Tq,Hq,D), lse (Hq,Tq))."""
    outs, lses = [], []
    for i in range(len(cu_q) - 1):
        qs, qe, ks, ke = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        o, l = reference_attention(
            q[qs:qe].transpose(0, 1)[None], k[ks:ke].transpose(0, 1)[None], v[ks:ke].transpose(0, 1)[None],
            causal_offset=causal_offset, scale=scale,
        )
        outs.append(o[0].transpose(0, 1))
        lses.append(l[0])
    return torch.cat(outs, 0), torch.cat(lses, 1)


VARLEN = [
    # (id, q lens, k lens, (Hq, Hkv), D, causal_offset, dtype)
    ("none", (5, 33, 17), (9, 33, 40), (4, 2), 64, None, F32),
    ("topleft", (17, 33, 1), (17, 40, 7), (4, 4), 40, 0, F32),
    ("bottomright-mqa", (1, 20, 33), (30, 20, 65), (6, 1), 96, "bottom_right", F32),
    ("offset-neg", (21, 9, 33), (21, 9, 33), (4, 2), 32, -2, F32),
    ("bottomright-gqa-fp16", (7, 33, 16), (40, 33, 20), (4, 2), 80, "bottom_right", F16),
]


@pytest.mark.parametrize("case", [pytest.param(c[1:], id=c[0]) for c in VARLEN])
def test_varlen(case):
    lens_q, lens_k, (hq, hkv), d, causal, dtype = case
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    tq, tk = int(cu_q[-1]), int(cu_k[-1])
    # packed tensors taken as views of a wider buffer: non-contiguous token stride
    q = torch.randn(tq, hq, d + 8, device=DEVICE).to(dtype)[..., :d]
    k = torch.randn(tk, hkv, d, device=DEVICE).to(dtype)
    v = torch.randn(tk, hkv, d, device=DEVICE).to(dtype)
    out, lse = tf.flash_attention_varlen_forward(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal_offset=causal)
    assert out.shape == (tq, hq, d) and lse.shape == (hq, tq) and lse.dtype == torch.float32

    q64, k64, v64 = (t.detach().to("cpu", torch.float64).requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = _varlen_reference(q64, k64, v64, cu_q.cpu(), cu_k.cpu(), causal)
    _assert_close(out, ref_out, dtype, "out", "out")
    ref_inf = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse.cpu()), ref_inf)
    _assert_close(lse.cpu().masked_fill(ref_inf, 0), ref_lse.masked_fill(ref_inf, 0), dtype, "lse", "lse")

    grad_out = torch.randn(out.shape, device=DEVICE).to(dtype)
    ref_out.backward(grad_out.to("cpu", torch.float64))
    dq, dk, dv = tf.flash_attention_varlen_backward(grad_out, q, k, v, out, lse, cu_q, cu_k,
                                                    max(lens_q), max(lens_k), causal_offset=causal)
    for name, got, ref_t in (("dq", dq, q64), ("dk", dk, k64), ("dv", dv, v64)):
        _assert_close(got, ref_t.grad, dtype, "grad", name)


# ----------------------------------------------------------------------------- validation


def _t(*shape, dtype=F32):
    return torch.zeros(*shape, dtype=dtype, device=DEVICE)


BAD_CALLS = {
    "q-rank": (lambda: tf.flash_attention_forward(_t(2, 16, 16), _t(1, 2, 16, 16), _t(1, 2, 16, 16)), "4-D"),
    "heads-not-divisible": (lambda: tf.flash_attention_forward(_t(1, 6, 4, 16), _t(1, 4, 4, 16), _t(1, 4, 4, 16)),
                            "multiple"),
    "head-dim-small": (lambda: tf.flash_attention_forward(_t(1, 2, 4, 8), _t(1, 2, 4, 8), _t(1, 2, 4, 8)),
                       "head dim"),
    "head-dim-large": (lambda: tf.flash_attention_forward(_t(1, 1, 4, 300), _t(1, 1, 4, 300), _t(1, 1, 4, 300)),
                       "head dim"),
    "dtype-mismatch": (lambda: tf.flash_attention_forward(_t(1, 2, 4, 16), _t(1, 2, 4, 16, dtype=F16),
                                                          _t(1, 2, 4, 16)), "dtype"),
    "dtype-unsupported": (lambda: tf.flash_attention_forward(*(_t(1, 2, 4, 16, dtype=torch.float64),) * 3), "dtype"),
    "kv-shape": (lambda: tf.flash_attention_forward(_t(1, 2, 4, 16), _t(1, 2, 4, 16), _t(1, 2, 5, 16)), "same shape"),
    "mask-not-broadcastable": (lambda: tf.flash_attention_forward(_t(1, 2, 4, 16), _t(1, 2, 6, 16), _t(1, 2, 6, 16),
                                                                  mask=_t(4, 5)), "broadcastable"),
    "mask-int": (lambda: tf.flash_attention_forward(_t(1, 2, 4, 16), _t(1, 2, 6, 16), _t(1, 2, 6, 16),
                                                    mask=_t(4, 6, dtype=torch.int32)), "bool"),
    "causal-bad-string": (lambda: tf.flash_attention_forward(_t(1, 2, 4, 16), _t(1, 2, 6, 16), _t(1, 2, 6, 16),
                                                             causal_offset="diagonal"), "causal_offset"),
    "causal-bool": (lambda: tf.flash_attention_forward(_t(1, 2, 4, 16), _t(1, 2, 6, 16), _t(1, 2, 6, 16),
                                                       causal_offset=True), "causal_offset"),
    "bwd-lse-shape": (lambda: tf.flash_attention_backward(_t(1, 2, 4, 16), _t(1, 2, 4, 16), _t(1, 2, 6, 16),
                                                          _t(1, 2, 6, 16), _t(1, 2, 4, 16), _t(1, 2, 5)), "lse"),
    "varlen-cu-mismatch": (lambda: tf.flash_attention_varlen_forward(
        _t(4, 2, 16), _t(4, 2, 16), _t(4, 2, 16), torch.tensor([0, 4], dtype=torch.int32, device=DEVICE),
        torch.tensor([0, 2, 4], dtype=torch.int32, device=DEVICE), 4, 2), "same length"),
    "varlen-rank": (lambda: tf.flash_attention_varlen_forward(
        _t(1, 4, 2, 16), _t(4, 2, 16), _t(4, 2, 16), torch.tensor([0, 4], dtype=torch.int32, device=DEVICE),
        torch.tensor([0, 4], dtype=torch.int32, device=DEVICE), 4, 4), "3-D"),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_validation_errors(name):
    call, match = BAD_CALLS[name]
    with pytest.raises(ValueError, match=match):
        call()
