"""Quantized linear ops (llmopt.kernels.quantized_linear) and their Triton kernels
(llmopt.kernels.triton_quant) against a dequantize-then-matmul reference in fp64.

The reference multiplies the *same* (already rounded) inputs by the dequantized
weight in float64, so only each kernel's own rounding is measured. Weights are
``N(0, 1/K)``, so outputs are O(1) and absolute tolerances mean the same
thing across shapes.

On a CPU-only machine the Triton kernels run under the interpreter
(TRITON_INTERPRET=1, set in tests/conftest.py) through the ops, with
``LLMOPT_QUANT_IMPL=triton``; on a CUDA machine they run on the GPU.
"""

import os

import pytest
import torch

import llmopt.kernels.quantized_linear as ql
from llmopt.quantization import quantize_weight

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CUDA = torch.cuda.is_available()

# Tolerances (atol, rtol) on O(1) outputs, |got - ref| <= atol + rtol * |ref|.
# "Observed" is the worst |got - ref| / (1 + |ref|) over this file's cases.
TOL = {
    # fp32: the dequantized weight is exact or one rounding off (int4's (q - 8) * s + z),
    # sums of <= 300 products in fp32 (2^-24 relative each). Observed <= 5e-7; 2e-5 leaves
    # headroom and still catches an indexing bug (O(0.1) errors).
    F32: (2e-5, 2e-5),
    # fp16 (Triton): int4 weights are rounded to fp16 for tl.dot (2^-11 relative) and the
    # output is rounded to fp16 (2^-11 of |out| <= ~4). Observed <= 7e-4.
    F16: (2e-3, 2e-3),
    # bf16 (CPU kernels): the output is rounded to bf16 (2^-8 relative) and PyTorch's
    # kernels round partial products too. Observed <= 7e-3.
    BF16: (2e-2, 2e-2),
}


def _weight(n, k, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) / k**0.5


def _x(m, k, dtype, seed=1):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _op_call(q, x, bias=None, layout="nibble"):
    """Call the op for QuantizedLinear ``q`` as the pass does: PyTorch's CPU kernels get
    their scales in x's dtype."""
    t = _as_installed(q, x.dtype).tensors
    if q.mode == "int8":
        qweight = ql.pad_int8_for_cpu(t["qweight"]) if layout == "cpu_tiled" else t["qweight"]
        return ql.linear_int8(x, qweight, t["scales"], bias)
    if q.mode == "int4":
        qweight = ql.to_cpu_int4_layout(t["qweight"]) if layout == "cpu_tiled" else t["qweight"]
        return ql.linear_int4(x, qweight, t["scales_zeros"], q.group_size, layout, bias)
    if q.mode == "fp8":
        return ql.linear_fp8(x, t["qweight"], t["scales"], bias)
    return ql.linear_w8a8(x, t["qweight"], t["scales"], t.get("smooth"), bias)


def _as_installed(q, dtype):
    t = dict(q.tensors)
    if q.mode in ("int8", "int4") and not ql.use_triton(t["qweight"].device):
        if "scales" in t:
            t["scales"] = t["scales"].to(dtype)
        if "scales_zeros" in t:
            t["scales_zeros"] = t["scales_zeros"].to(ql.cpu_compute_dtype(dtype))
    return type(q)(q.mode, q.in_features, q.out_features, t, q.group_size)


def _reference(q, x, bias=None):
    """fp64 dequantize-then-matmul, with the scales the op was given."""
    weight = _as_installed(q, x.dtype).dequantize(torch.float64)
    out = x.double() @ weight.t()
    return out if bias is None else out + bias.double()


def _assert_close(got, ref, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.double(), ref, atol=atol, rtol=rtol)


# ---------------------------------------------------------------- formats


def test_int4_pack_roundtrip_and_nibble_order():
    q = torch.randint(0, 16, (5, 12), generator=torch.Generator().manual_seed(0))
    packed = ql.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 6)
    assert torch.equal(ql.unpack_int4(packed), q.to(torch.uint8))
    assert int(packed[0, 0]) == int(q[0, 0]) | int(q[0, 1]) << 4  # low nibble = even k


@pytest.mark.parametrize("mode", ["int8", "int4", "fp8"])
def test_quantization_error_is_within_one_half_step(mode):
    weight = _weight(48, 200).float()
    q = quantize_weight(weight, mode, group_size=64)
    err = (q.dequantize() - weight).abs()
    if mode == "int8":
        step = q.tensors["scales"][:, None]
    elif mode == "int4":  # K = 200 is padded to 256: four groups of 64
        assert q.tensors["qweight"].shape == (48, 128) and q.tensors["scales_zeros"].shape == (4, 48, 2)
        step = q.tensors["scales_zeros"][..., 0].t().repeat_interleave(64, dim=1)[:, :200]
    else:  # e4m3 has 3 mantissa bits: half a step is 2^-4 of the value (normal range)
        step = weight.abs() * 2**-3 + 2**-9 * q.tensors["scales"][:, None]
    assert (err <= step / 2 + 1e-6).all()


def test_all_zero_rows_quantize_to_zero():
    weight = torch.zeros(16, 64)
    for mode in ("int8", "int4", "fp8", "w8a8"):
        assert torch.equal(quantize_weight(weight, mode, 32).dequantize(), weight), mode


# ---------------------------------------------------------------- CPU ops


CPU_CASES = [
    # (mode, N, K, group_size, layout): N = 33 / K = 70 are odd sizes; int4 K = 70 pads to a group multiple.
    ("int8", 33, 70, None, None),  # bf16: the reference path (K % 16 != 0)
    ("int8", 33, 70, None, "cpu_tiled"),  # as the pass installs it: padded to K = 80
    ("fp8", 33, 70, None, None),
    ("w8a8", 33, 70, None, None),
    ("int4", 48, 70, 32, "cpu_tiled"),
    ("int4", 48, 200, 128, "cpu_tiled"),
    ("int4", 33, 70, 64, "nibble"),  # N % 16 != 0: the reference path
]


@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("mode, n, k, group_size, layout", CPU_CASES)
def test_cpu_op_matches_dequantized_reference(mode, n, k, group_size, layout, dtype, m, monkeypatch):
    monkeypatch.delenv("LLMOPT_QUANT_IMPL", raising=False)
    if mode == "fp8" and dtype == BF16:
        pytest.skip("covered by fp32: the emulated fp8 path is the same code")
    q = quantize_weight(_weight(n, k).float(), mode, group_size or 128)
    x = _x(m, k, dtype)
    got = _op_call(q, x, layout=layout)
    assert got.shape == (m, n) and got.dtype == dtype
    if mode == "w8a8":
        _assert_close(got, _w8a8_reference(q, x), dtype)
    elif dtype == F32 and layout == "cpu_tiled":  # (int8 without padding: K % 16 != 0 stays fp32)
        # PyTorch's packed kernels run fp32 inputs in bf16 (ql.cpu_compute_dtype): the
        # reference rounds x (and int4's scales) as they do; the output is bf16-rounded.
        _assert_close(got, _reference(q, x.to(BF16)), BF16)
    else:
        _assert_close(got, _reference(q, x), dtype)


@pytest.mark.parametrize("mode, n, k, group_size, layout", [c for c in CPU_CASES if c[4] == "cpu_tiled"])
def test_cpu_packed_kernels_in_fp32_on_request(mode, n, k, group_size, layout, monkeypatch):
    """LLMOPT_QUANT_CPU_DTYPE=float32 keeps fp32 activations: fp32 accuracy again."""
    monkeypatch.delenv("LLMOPT_QUANT_IMPL", raising=False)
    monkeypatch.setenv("LLMOPT_QUANT_CPU_DTYPE", "float32")
    q = quantize_weight(_weight(n, k).float(), mode, group_size or 128)
    x = _x(5, k, F32)
    _assert_close(_op_call(q, x, layout=layout), _reference(q, x), F32)


def _w8a8_reference(q, x):
    """fp64 replay of w8a8: per-token int8 activations times int8 weights, then both scales."""
    xq, x_scale = ql.quantize_per_token(x)
    return (xq.double() @ q.tensors["qweight"].double().t()) * x_scale.double() * q.tensors["scales"].double()


def test_w8a8_approximates_float_and_smoothing_is_exact_in_exact_arithmetic():
    weight, x = _weight(32, 64).float(), _x(5, 64, F32)
    x[:, 7] *= 30.0  # an outlier channel, as in LLM activations
    smooth = torch.rand(64, generator=torch.Generator().manual_seed(3)) + 0.5
    q = quantize_weight(weight, "w8a8", smooth=smooth)
    torch.testing.assert_close(q.dequantize(), weight, atol=0.02, rtol=0)  # W * s / s, int8-rounded
    got = ql.linear_w8a8(x, q.tensors["qweight"], q.tensors["scales"], q.tensors["smooth"])
    want = x @ weight.t()
    # Per-token int8 activations: error ~ max|x_row| / 127 / 2 per element, times sum |w| ~ O(1).
    assert (got - want).abs().max() < 0.1 * want.abs().max()


def test_bias_and_leading_dims():
    q = quantize_weight(_weight(48, 64).float(), "int4", 32)
    x = _x(6, 64, F32).reshape(2, 3, 64)
    bias = torch.randn(48)
    got = _op_call(q, x, bias, layout="cpu_tiled")
    assert got.shape == (2, 3, 48) and got.dtype == F32
    # The packed kernel runs fp32 inputs in bf16 (see test_cpu_op_matches_dequantized_reference).
    _assert_close(got.reshape(6, 48), _reference(q, x.reshape(6, 64).to(BF16), bias), BF16)


@pytest.mark.parametrize("mode", ["int8", "int4", "fp8", "w8a8"])
def test_fake_impl_agrees_with_kernel(mode):
    q = quantize_weight(_weight(48, 64).float(), mode, 32)
    x = _x(3, 64, F32).reshape(1, 3, 64)
    args = _op_args(q, x)
    op = getattr(torch.ops.llmopt, f"linear_{mode}").default
    # test_schema perturbs the inputs arithmetically, which fp8 tensors do not support on CPU.
    utils = ("test_faketensor",) if mode == "fp8" else ("test_schema", "test_faketensor")
    torch.library.opcheck(op, args, test_utils=utils)


def _op_args(q, x):
    t = q.tensors
    if q.mode == "int4":
        return (x, ql.to_cpu_int4_layout(t["qweight"]), t["scales_zeros"], q.group_size, "cpu_tiled", None)
    if q.mode == "w8a8":
        return (x, t["qweight"], t["scales"], None, None)
    return (x, t["qweight"], t["scales"], None)


# ---------------------------------------------------------------- Triton kernels


triton = pytest.importorskip("triton")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if CUDA and not INTERPRET else "cpu"
TRITON_DTYPES = [F32, F16] if DEVICE == "cpu" else [F32, F16, BF16]  # the interpreter has no bf16 tl.dot


@pytest.fixture
def triton_impl(monkeypatch):
    """Route the ops to the Triton kernels; fails the test if they were not used."""
    if DEVICE == "cpu" and not INTERPRET:
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1")
    from llmopt.kernels import triton_quant

    monkeypatch.setenv("LLMOPT_QUANT_IMPL", "triton")
    launches = []
    launch = triton_quant._launch
    monkeypatch.setattr(triton_quant, "_launch", lambda *a, **k: launches.append(1) or launch(*a, **k))
    yield
    assert launches, "the Triton kernels were not called"


@pytest.mark.parametrize("m", [1, 3, 17])  # 1, 3: the GEMV schedule; 17: GEMM, a partial row tile
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("mode", ["int8", "int4", "fp8"])
def test_triton_kernel_matches_dequantized_reference(mode, dtype, m, triton_impl):
    # N = 33 (odd, a partial column tile), K = 70 (not a multiple of BLOCK_K = 32; int4: not a
    # multiple of the group, so the last group is partly padding).
    q = _on_device(quantize_weight(_weight(33, 70).float(), mode, 32))
    x = _x(m, 70, dtype).to(DEVICE)
    got = _op_call(q, x)
    assert got.dtype == dtype
    _assert_close(got.cpu(), _reference(q, x).cpu(), dtype)


@pytest.mark.parametrize("group_size", [64, 256])
def test_triton_int4_other_group_sizes(group_size, triton_impl):
    q = _on_device(quantize_weight(_weight(20, 300).float(), "int4", group_size))
    for m in (2, 18):  # one GEMV, one GEMM
        x = _x(m, 300, F32).to(DEVICE)
        _assert_close(_op_call(q, x).cpu(), _reference(q, x).cpu(), F32)


def _on_device(q):
    return type(q)(q.mode, q.in_features, q.out_features, {k: v.to(DEVICE) for k, v in q.tensors.items()},
                   q.group_size)
