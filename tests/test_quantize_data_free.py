"""Data-free quantization: HQQ int4 grids, the int8 clipping search, their defaults and options.

References: RTN's error on the same weights (the method HQQ replaces), an
exhaustive per-row search for int8, PyTorch's own int4 CPU kernel
(``aten._weight_int4pack_mm_for_cpu``, fp32) against the dequantized weight in
fp64, and the options' documented choices.
"""

import pytest
import torch

import llmopt
from llmopt.kernels.quantized_linear import to_cpu_int4_layout, unpack_int4
from llmopt.models import random_llama
from llmopt.quantization import QuantConfig, quantize_weight, quantize_weights
from llmopt.quantization import int4
from llmopt.quantization.config import DEFAULT_DATA_FREE_METHOD, DEFAULT_INT8_METHOD


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _weight_with_outliers(n=64, k=256, seed=0):
    """Gaussian weights plus a few large ones, as trained layers have."""
    g = _generator(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    rows = torch.randint(0, n, (n // 2,), generator=g)
    cols = torch.randint(0, k, (n // 2,), generator=g)
    w[rows, cols] = torch.randn(n // 2, generator=g).sign() * 0.2  # one outlier in ~half the rows
    return w


def _errors(w, layer):
    d = layer.dequantize() - w
    return d.abs().mean().item(), d.square().mean().item()


# ---------------------------------------------------------------- int4 HQQ


@pytest.mark.parametrize("group_size", [32, 128])
def test_hqq_rounds_better_than_rtn_on_weights_with_outliers(group_size):
    w = _weight_with_outliers()
    rtn_abs, rtn_sq = _errors(w, quantize_weight(w, "int4", group_size, method="rtn"))
    hqq_abs, hqq_sq = _errors(w, quantize_weight(w, "int4", group_size, method="hqq"))
    # HQQ optimises an lp (p < 1) error: its mean absolute error drops clearly, and the
    # squared error too. Measured: 0.88 of RTN's absolute error, 0.82-0.95 of its squared one.
    assert hqq_abs < 0.92 * rtn_abs
    assert hqq_sq < 0.98 * rtn_sq


@pytest.mark.parametrize("init", ["mse", "minmax"])
def test_hqq_never_loses_to_its_starting_grid_per_group(init):
    w = _weight_with_outliers(seed=1)
    g = 64
    groups = w.reshape(w.shape[0], -1, g)

    def group_abs_error(scales, lows):
        q = int4.round_to_grid(groups, scales[..., None], lows[..., None])
        return (q * scales[..., None] + lows[..., None] - groups).abs().mean(-1)

    hqq = group_abs_error(*int4.hqq_grid(groups, init=init))
    start = group_abs_error(*(int4.search_grid(groups) if init == "mse" else int4.minmax_grid(groups)))
    assert (hqq <= start * (1 + 1e-6)).all()
    assert hqq.sum() < 0.99 * start.sum()  # and it does move


def test_hqq_ignores_padding_columns():
    # 200 columns in groups of 64: the last group has 8 real columns and 56 copies of
    # the last one. The grid fitted there must be the grid of the 8 real columns alone.
    w = _weight_with_outliers(n=32, k=200, seed=2)
    layer = quantize_weight(w, "int4", 64, method="hqq")
    padded = int4.pad_to_groups(w, 64).reshape(32, -1, 64)
    mask = torch.zeros(4, 64)
    mask[:3] = 1
    mask[3, :8] = 1
    scales, lows = int4.hqq_grid(padded, mask)
    stored = layer.tensors["scales_zeros"]
    torch.testing.assert_close(stored[..., 0].t(), scales, rtol=0, atol=0)
    torch.testing.assert_close(stored[..., 1].t(), int4.zero_points(scales, lows), rtol=0, atol=0)
    real_only = int4.hqq_grid(w[:, 192:200].reshape(32, 1, 8))
    # Sums over 8 columns or over 64 with 56 zero weights: equal up to the order of additions.
    torch.testing.assert_close(scales[:, 3], real_only[0][:, 0], rtol=1e-2, atol=0)


def test_hqq_grid_is_bf16_exact_and_matches_pytorchs_int4_kernel():
    w = _weight_with_outliers(n=48, k=256, seed=3)
    layer = quantize_weight(w, "int4", 128, method="hqq")
    sz = layer.tensors["scales_zeros"]
    assert torch.equal(sz, sz.bfloat16().float())
    levels = unpack_int4(layer.tensors["qweight"]).float()
    assert levels.min() >= 0 and levels.max() <= 15
    x = torch.randn(5, 256, generator=_generator(4))
    want = (x.double() @ layer.dequantize().double().t())
    # PyTorch's packed CPU kernel with fp32 activations and the grid in fp32.
    packed = to_cpu_int4_layout(layer.tensors["qweight"])
    got = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 128, sz)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # And through the op the quantize pass installs (the same tensors, nibble layout).
    out = torch.ops.llmopt.linear_int4(x, layer.tensors["qweight"], sz, 128)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- int8 clipping search


def test_int8_mse_picks_each_rows_best_clip_and_never_loses_to_max():
    from llmopt.quantization.quantize import INT8_CLIP

    torch.manual_seed(5)
    # With 255 levels clipping rarely pays (measured: 0.999 of RTN's error on Gaussian
    # rows of 4096): the check is that each row gets the best of the candidates.
    w = torch.randn(16, 4096) * 0.01
    rtn = quantize_weight(w, "int8", method="rtn")
    mse = quantize_weight(w, "int8", method="mse")
    err_rtn = (rtn.dequantize() - w).square().sum(1)
    err_mse = (mse.dequantize() - w).square().sum(1)
    assert (err_mse <= err_rtn).all() and err_mse.sum() < err_rtn.sum()
    # Reference: every row tries every clipping fraction on its own.
    absmax = w.abs().amax(1)
    for row in range(16):
        errors = []
        for fraction in INT8_CLIP:
            s = absmax[row] * fraction / 127
            errors.append(((torch.round(w[row] / s).clamp(-127, 127) * s - w[row]) ** 2).sum())
        best = int(torch.stack(errors).argmin())
        assert mse.tensors["scales"][row] == pytest.approx(float(absmax[row] * INT8_CLIP[best] / 127), rel=1e-6)


# ---------------------------------------------------------------- defaults and options


def test_defaults_without_calibration_are_the_documented_methods():
    assert QuantConfig("int4").resolved_method(calibrated=False) == DEFAULT_DATA_FREE_METHOD == "rtn"
    assert QuantConfig("int4").resolved_method(calibrated=True) == "gptq"
    assert QuantConfig("int8").resolved_method(calibrated=False) == DEFAULT_INT8_METHOD == "mse"
    assert QuantConfig("int4", method="hqq").resolved_method(calibrated=False) == "hqq"


def test_compiling_with_quantize_int4_installs_the_default_method():
    model = random_llama(heads="gqa", num_layers=1)
    ids = torch.randint(0, 256, (1, 12), generator=_generator(6))
    want = quantize_weights(model, QuantConfig("int4", group_size=32, method=DEFAULT_DATA_FREE_METHOD))
    other = quantize_weights(model, QuantConfig("int4", group_size=32, method="hqq"))
    swapped = {f"{name}.weight": layer.dequantize() for name, layer in want.layers.items()}
    with torch.no_grad():
        reference = torch.func.functional_call(model, swapped, (ids,), tie_weights=False).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="llmopt", options={
            "lower": "eager", "quantize": "int4", "group_size": 32,
            "kernels": {"quant_cpu_dtype": "float32"}})
        got = compiled(ids).logits
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)
    assert any(not torch.equal(want.layers[n].tensors["scales_zeros"], other.layers[n].tensors["scales_zeros"])
               for n in want.layers)


def test_compiling_with_quantize_int8_installs_the_clip_search():
    """``quantize="int8"`` rounds each row with its least-squares clip (the default), not its max |w|."""
    # down_proj's rows of 4096: long enough that a clip below max |w| pays in most of them
    model = random_llama(heads="gqa", num_layers=1, intermediate_size=4096)
    ids = torch.randint(0, 256, (1, 12), generator=_generator(7))
    want = quantize_weights(model, QuantConfig("int8", method="mse"))
    rtn = quantize_weights(model, QuantConfig("int8", method="rtn"))
    name = "model.layers.0.mlp.down_proj"  # rows that clip: the check can tell the two apart
    assert not torch.equal(want.layers[name].tensors["scales"], rtn.layers[name].tensors["scales"])
    swapped = {f"{n}.weight": layer.dequantize() for n, layer in want.layers.items()}
    with torch.no_grad():
        reference = torch.func.functional_call(model, swapped, (ids,), tie_weights=False).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="llmopt", options={
            "lower": "eager", "quantize": "int8", "kernels": {"quant_cpu_dtype": "float32"}})
        got = compiled(ids).logits
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode, method, message", [
    ("int4", "awq", "valid choices are None, 'rtn', 'mse', 'hqq', 'gptq'"),
    ("int8", "hqq", "int8 takes 'rtn', 'mse'"),
    ("int8", "gptq", "int8 takes 'rtn', 'mse'"),
    ("fp8", "mse", "fp8 rounds to nearest"),
    ("w8a8", "hqq", "w8a8 rounds to nearest"),
])
def test_bad_methods_are_refused_with_the_choices(mode, method, message):
    with pytest.raises(llmopt.LLMOptConfigError, match=message):
        QuantConfig(mode, method=method)
