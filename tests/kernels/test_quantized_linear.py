"""Quantized linear ops (llmopt.kernels.quantized_linear) and their Triton kernels
(llmopt.kernels.triton_quant) against a dequantize-then-matmul reference in fp64.

The reference multiplies the *same* (already rounded) inputs by the dequantized
weight in float64, so only each kernel's own rounding is measured. Weights are
``N(0, 1/K)``, so outputs are O(1) and absolute tolerances mean the same
thing across shapes.

On a CPU-only machine the Triton kernels run under the interpreter
(TRITON_INTERPRET=1, set in tests/conftest.py) through the ops, with
``impl="triton"``; on a CUDA machine they run on the GPU.
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


def _op_call(q, x, bias=None, layout="nibble", impl="auto", compute_dtype=None):
    """Call the op for QuantizedLinear ``q`` as the pass does: PyTorch's CPU kernels get
    their scales in x's dtype (int4: the dtype they compute in)."""
    t = _as_installed(q, x.dtype, impl, compute_dtype).tensors
    if q.mode == "int8":
        qweight = ql.pad_int8_for_cpu(t["qweight"]) if layout == "cpu_tiled" else t["qweight"]
        return ql.linear_int8(x, qweight, t["scales"], bias, impl=impl, compute_dtype=compute_dtype)
    if q.mode == "int4":
        qweight = ql.to_cpu_int4_layout(t["qweight"]) if layout == "cpu_tiled" else t["qweight"]
        return ql.linear_int4(x, qweight, t["scales_zeros"], q.group_size, layout, bias, impl=impl,
                              compute_dtype=compute_dtype)
    if q.mode == "fp8":
        return ql.linear_fp8(x, t["qweight"], t["scales"], bias, impl=impl)
    return ql.linear_w8a8(x, t["qweight"], t["scales"], t.get("smooth"), bias)


def _as_installed(q, dtype, impl="auto", compute_dtype=None):
    t = dict(q.tensors)
    if q.mode in ("int8", "int4") and not ql.use_triton(t["qweight"].device, impl):
        if "scales" in t:
            t["scales"] = t["scales"].to(dtype)
        if "scales_zeros" in t:
            t["scales_zeros"] = t["scales_zeros"].to(ql.cpu_compute_dtype(dtype, compute_dtype))
    return type(q)(q.mode, q.in_features, q.out_features, t, q.group_size)


def _reference(q, x, bias=None, impl="auto"):
    """fp64 dequantize-then-matmul, with the scales the op was given."""
    weight = _as_installed(q, x.dtype, impl).dequantize(torch.float64)
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
def test_cpu_op_matches_dequantized_reference(mode, n, k, group_size, layout, dtype, m):
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
def test_cpu_packed_kernels_in_fp32_on_request(mode, n, k, group_size, layout):
    """compute_dtype=float32 (kernels.quant_cpu_dtype="float32") keeps fp32 activations:
    fp32 accuracy again."""
    q = quantize_weight(_weight(n, k).float(), mode, group_size or 128)
    x = _x(5, k, F32)
    got = _op_call(q, x, layout=layout, compute_dtype=F32)
    q_fp32 = _as_installed(q, F32, compute_dtype=F32)
    _assert_close(got, x.double() @ q_fp32.dequantize(torch.float64).t(), F32)


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
def triton_impl():
    """Route the ops to the Triton kernels; fails the test if they were not used."""
    if DEVICE == "cpu" and not INTERPRET:
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1")
    from llmopt.kernels import triton_quant

    before = triton_quant.launch_count()
    yield "triton"
    assert triton_quant.launch_count() > before, "the Triton kernels were not called"


@pytest.mark.parametrize("m", [1, 3, 17])  # 1, 3: the GEMV schedule; 17: GEMM, a partial row tile
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("mode", ["int8", "int4", "fp8"])
def test_triton_kernel_matches_dequantized_reference(mode, dtype, m, triton_impl):
    # N = 33 (odd, a partial column tile), K = 70 (not a multiple of BLOCK_K = 32; int4: not a
    # multiple of the group, so the last group is partly padding).
    q = _on_device(quantize_weight(_weight(33, 70).float(), mode, 32))
    x = _x(m, 70, dtype).to(DEVICE)
    got = _op_call(q, x, impl=triton_impl)
    assert got.dtype == dtype
    _assert_close(got.cpu(), _reference(q, x, impl=triton_impl).cpu(), dtype)


@pytest.mark.parametrize("group_size", [64, 256])
def test_triton_int4_other_group_sizes(group_size, triton_impl):
    q = _on_device(quantize_weight(_weight(20, 300).float(), "int4", group_size))
    for m in (2, 18):  # one GEMV, one GEMM
        x = _x(m, 300, F32).to(DEVICE)
        _assert_close(_op_call(q, x, impl=triton_impl).cpu(), _reference(q, x, impl=triton_impl).cpu(), F32)


def _on_device(q):
    return type(q)(q.mode, q.in_features, q.out_features, {k: v.to(DEVICE) for k, v in q.tensors.items()},
                   q.group_size)


# ---------------------------------------------------------------- the native int4 kernel ("cpu_native")

NATIVE = ql._native_int4_fn() is not None
needs_native = pytest.mark.skipif(not NATIVE, reason="the C int4 kernel could not be built here")
NATIVE_CASES = [
    # (N, K, group_size): N not a multiple of 16 (a partial row tile), K not a multiple of 64
    # (padded to the group), every group size; 64 x 96: whole tiles only.
    (33, 70, 32),
    (48, 200, 64),
    (20, 300, 128),
    (7, 600, 256),
    (64, 96, 32),
]


def _native_args(q):
    qweight, scales = ql.to_cpu_native_int4_layout(q.tensors["qweight"], q.tensors["scales_zeros"])
    return qweight, scales, q.group_size, "cpu_native"


def _bf16_scales(q):
    """``q`` with the scales the native layout holds (bf16; the int4 grids are bf16-exact)."""
    t = dict(q.tensors, scales_zeros=q.tensors["scales_zeros"].to(BF16).float())
    return type(q)(q.mode, q.in_features, q.out_features, t, q.group_size)


def _quantized_activations(x, kp):
    """fp64 copy of what the kernel multiplies: x zero-padded to ``kp`` columns and rounded
    to int8 per block of 32 (scale max|x| / 127, round half to even), computed in fp32 as
    the kernel does, so the int8 values are identical."""
    m = x.shape[0]
    blocks = torch.nn.functional.pad(x.float(), (0, kp - x.shape[1])).reshape(m, kp // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    scale = amax / 127
    inverse = torch.where(scale > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inverse).double() * scale.double()).reshape(m, kp)


def _native_reference(q, x, bias=None):
    kp = q.tensors["qweight"].shape[1] * 2
    weight = ql.dequantize_int4(q.tensors["qweight"], _bf16_scales(q).tensors["scales_zeros"], q.group_size,
                                torch.float64)
    out = _quantized_activations(x.reshape(-1, x.shape[-1]), kp) @ weight.t()
    out = out if bias is None else out + bias.double()
    return out.reshape(*x.shape[:-1], -1)


def _activation_error_bound(q, x):
    """|x @ W.T - xq @ W.T| <= sum over blocks of (half a step: max|x_block| / 254) times
    sum |W| over the block, per output (rounding to nearest moves each value at most half
    a step)."""
    kp = q.tensors["qweight"].shape[1] * 2
    weight = ql.dequantize_int4(q.tensors["qweight"], _bf16_scales(q).tensors["scales_zeros"], q.group_size,
                                torch.float64)
    blocks = torch.nn.functional.pad(x.double(), (0, kp - x.shape[1])).reshape(x.shape[0], kp // 32, 32)
    half_step = blocks.abs().amax(-1) / 254  # (M, blocks)
    weight_mass = weight.abs().reshape(weight.shape[0], kp // 32, 32).sum(-1)  # (N, blocks)
    return half_step @ weight_mass.t()


@needs_native
@pytest.mark.parametrize("m", [1, 2, 3, 9, 70])  # 9: three passes of 4 rows; 70: prefill-sized
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("n, k, group_size", NATIVE_CASES)
def test_native_int4_matches_int8_activation_reference(n, k, group_size, dtype, m):
    """Against fp64 with the kernel's own activation rounding: only fp32 summation order
    differs (fp32 observed <= 7e-7 relative to 1 + |ref|), plus bf16 output rounding."""
    q = quantize_weight(_weight(n, k).float(), "int4", group_size)
    x = _x(m, k, dtype)
    got = ql.linear_int4(x, *_native_args(q))
    assert got.shape == (m, n) and got.dtype == dtype
    ref = _native_reference(q, x)
    if dtype == F32:
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    else:
        _assert_close(got, ref, BF16)


@needs_native
@pytest.mark.parametrize("m", [1, 3, 70])
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("n, k, group_size", NATIVE_CASES)
def test_native_int4_within_activation_rounding_of_float_reference(n, k, group_size, dtype, m):
    """Against plain dequantize-then-matmul in fp64 (float activations): the difference
    stays within the int8 activation rounding bound, per output, plus the fp32 / bf16
    rounding of the result."""
    q = quantize_weight(_weight(n, k).float(), "int4", group_size)
    x = _x(m, k, dtype)
    got = ql.linear_int4(x, *_native_args(q)).double()
    ref = _reference(_bf16_scales(q), x)
    bound = _activation_error_bound(q, x)
    atol, rtol = (1e-5, 1e-5) if dtype == F32 else TOL[BF16]
    err = (got - ref).abs()
    assert (err <= bound + atol + rtol * ref.abs()).all()
    # The bound adds every rounding error with the same sign, 0.05-0.2 on these O(1) outputs;
    # the errors are independent, so their sum is ~sqrt(K) times smaller in practice.
    assert bound.max() < 0.3 and err.max() < 0.03


@needs_native
def test_native_int4_zero_row_bias_leading_dims_and_fp16():
    q = quantize_weight(_weight(40, 100).float(), "int4", 32)
    x = _x(6, 100, F32)
    x[2] = 0.0
    bias = torch.randn(40)
    args = _native_args(q)
    got = ql.linear_int4(x.reshape(2, 3, 100), *args, bias)
    assert got.shape == (2, 3, 40) and got.dtype == F32
    got = got.reshape(6, 40)
    assert torch.equal(got[2], bias)  # a zero row quantizes to zeros (scale 0), not NaN
    torch.testing.assert_close(got.double(), _native_reference(q, x, bias), atol=1e-5, rtol=1e-5)
    # fp16 inputs run in fp32 and come back in fp16.
    got16 = ql.linear_int4(x.half(), *args, bias)
    assert got16.dtype == F16
    torch.testing.assert_close(got16.double(), _native_reference(q, x.half(), bias), atol=2e-3, rtol=2e-3)


@needs_native
def test_native_int4_same_result_with_two_threads():
    q = quantize_weight(_weight(100, 200).float(), "int4", 64)
    x = _x(5, 200, F32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ql.linear_int4(x, *_native_args(q))
        torch.set_num_threads(2)
        two = ql.linear_int4(x, *_native_args(q))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # rows are split between threads, sums are not


@pytest.mark.parametrize("n, k, group_size", NATIVE_CASES)
def test_native_layout_roundtrip(n, k, group_size):
    q = quantize_weight(_weight(n, k).float(), "int4", group_size)
    qweight, scales = ql.to_cpu_native_int4_layout(q.tensors["qweight"], q.tensors["scales_zeros"])
    assert qweight.shape == q.tensors["qweight"].shape and scales.shape == q.tensors["scales_zeros"].shape
    assert scales.dtype == BF16
    nibbles, scales_zeros = ql.from_cpu_native_int4_layout(qweight, scales)
    assert torch.equal(nibbles, q.tensors["qweight"])
    assert torch.equal(scales_zeros, q.tensors["scales_zeros"].to(BF16))


def _installed_layout(q, weight, **kernels):
    """The int4 layout the quantize pass installs for ``weight`` under ``kernels`` options."""
    from llmopt import LLMOptConfig
    from llmopt.passes import quantize_linear

    choice = quantize_linear.kernel_choice(LLMOptConfig(kernels=kernels), "int4", weight)
    return quantize_linear._kernel_inputs(q, weight, choice)[2]


# Run in a fresh interpreter with no C compiler: $CC names no program and the kernel
# cache is empty, so kernels/native builds nothing (the real condition, no patching).
_WITHOUT_COMPILER = """
import sys, torch
sys.path[:0] = [{here!r}, {tests!r}]
import test_quantized_linear as t
from llmopt.kernels import native
assert native.load("int4_gemv") is None and not t.ql.native_int4_available()
q = t.quantize_weight(t._weight(33, 70).float(), "int4", 32)
x = t._x(3, 70, t.F32)
t._assert_close(t.ql.linear_int4(x, *t._native_args(q)), t._reference(t._bf16_scales(q), x), t.F32)
print(t._installed_layout(q, torch.empty(33, 70)))
q48 = t.quantize_weight(t._weight(48, 70).float(), "int4", 32)
print(t._installed_layout(q48, torch.empty(48, 70)))
"""


def test_native_layout_without_the_library_falls_back(tmp_path):
    """No compiler: the op dequantizes (exact fp32), the pass installs PyTorch's layout.
    kernels={"native": False} installs PyTorch's layout too (next test)."""
    import pathlib
    import subprocess
    import sys

    here = pathlib.Path(__file__).resolve().parent
    code = _WITHOUT_COMPILER.format(here=str(here), tests=str(here.parent))
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"), LLMOPT_CACHE_DIR=str(tmp_path / "cache"),
               TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # N % 16 != 0: not PyTorch's tiled kernel; N = 48: PyTorch's tiled int4 kernel
    assert out.stdout.split() == ["nibble", "cpu_tiled"]


def test_native_option_off_installs_pytorchs_layout():
    q48 = quantize_weight(_weight(48, 70).float(), "int4", 32)
    assert _installed_layout(q48, torch.empty(48, 70), native=False) == "cpu_tiled"


@needs_native
def test_pass_chooses_native_layout_unless_switched_off():
    q = quantize_weight(_weight(33, 70).float(), "int4", 32)
    assert _installed_layout(q, torch.empty(33, 70)) == "cpu_native"  # any N
    assert _installed_layout(q, torch.empty(33, 70, dtype=BF16)) == "cpu_native"
    q48 = quantize_weight(_weight(48, 70).float(), "int4", 32)
    assert _installed_layout(q48, torch.empty(48, 70), int4_cpu_kernel="torch") == "cpu_tiled"
    # exactness mode keeps fp32 scales and PyTorch's kernel
    assert _installed_layout(q48, torch.empty(48, 70), quant_cpu_dtype="float32") == "cpu_tiled"


@needs_native
def test_native_layout_in_exactness_mode_is_exact():
    """A native-layout weight called with compute_dtype=float32: no activation
    rounding, fp32 accuracy against the (bf16) scales it holds."""
    q = quantize_weight(_weight(33, 70).float(), "int4", 64)
    x = _x(2, 70, F32)
    got = ql.linear_int4(x, *_native_args(q), compute_dtype=F32)
    _assert_close(got, _reference(_bf16_scales(q), x), F32)


@needs_native
def test_native_layout_fake_impl_agrees_with_kernel():
    q = quantize_weight(_weight(33, 70).float(), "int4", 32)
    x = _x(3, 70, F32).reshape(1, 3, 70)
    torch.library.opcheck(torch.ops.llmopt.linear_int4.default, (x, *_native_args(q), None),
                          test_utils=("test_schema", "test_faketensor"))


def test_onnx_conversion_reads_the_native_layout():
    from llmopt.onnx.matmul_nbits import from_llmopt_int4

    q = quantize_weight(_weight(33, 70).float(), "int4", 32)
    nibble = from_llmopt_int4(q.tensors["qweight"], q.tensors["scales_zeros"].to(BF16), 32, "nibble", 70, F32)
    qweight, scales, _, _ = _native_args(q)
    native = from_llmopt_int4(qweight, scales, 32, "cpu_native", 70, F32)
    for name in ("b", "scales", "offsets"):
        assert torch.equal(getattr(native, name), getattr(nibble, name)), name


def test_cpu_compute_dtype_follows_the_op_argument():
    # No process-wide switch: fp32 inputs compute in bf16 unless the call says fp32
    # (the quantize pass passes kernels.quant_cpu_dtype), other dtypes in their own.
    assert ql.cpu_compute_dtype(torch.float32) == torch.bfloat16
    assert ql.cpu_compute_dtype(torch.float32, torch.float32) == torch.float32
    assert ql.cpu_compute_dtype(torch.bfloat16) == torch.bfloat16
    assert ql.cpu_compute_dtype(torch.bfloat16, torch.float32) == torch.bfloat16