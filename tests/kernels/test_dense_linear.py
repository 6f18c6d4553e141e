"""llmopt::dense_linear (the fp32 few-row CPU kernel) and the route_dense_linear pass.

The kernel is checked against an fp64 reference with the worst-case bound of
fp32 summation: for a dot product of k terms, |fl(s) - s| <= gamma_k * sum_i |x_i w_i|
with gamma_k = k u / (1 - k u), u = 2**-24 (Higham, Accuracy and Stability of
Numerical Algorithms, 3.1), whatever the order of the additions; the products
are rounded too, which adds at most u to each term: (k + 1) u is used. The bound
holds for F.linear as well, which the test checks, so it is fair to both.
"""

import pytest
import torch
import torch.nn.functional as F

import llmopt
from llmopt.kernels import dense_linear as dl
from llmopt.models import random_llama

needs_native = pytest.mark.skipif(not dl.native_dense_available(), reason="the C kernel could not be built here")
U = 2.0 ** -24


def _bound(x, w, bias=None):
    k = x.shape[-1]
    terms = x.abs().double() @ w.abs().double().t()
    if bias is not None:
        terms = terms + bias.abs().double()
    return (k + 2) * U * terms + 1e-30


def _check(got, x, w, bias=None):
    ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    err = (got.double() - ref).abs()
    bound = _bound(x, w, bias)
    assert bool((err <= bound).all()), f"max excess {float((err - bound).max()):.3g}"


@needs_native
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("n, k", [(1, 1), (3, 7), (5, 15), (17, 16), (6, 33), (192, 576), (37, 1000)])
def test_kernel_within_fp32_summation_bound_of_fp64(m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n * 7 + k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    got = dl.dense_linear(x, w)
    assert got.shape == (m, n) and got.dtype == torch.float32
    _check(got, x, w)
    _check(F.linear(x, w), x, w)  # the bound is one F.linear meets too


@needs_native
@pytest.mark.parametrize("blocking", sorted(dl.BLOCKINGS))
@pytest.mark.parametrize("m", [1, 2, 3, 5, 9])
@pytest.mark.parametrize("n, k", [(1, 1), (5, 15), (17, 16), (13, 31), (33, 577)])
def test_each_blocking_within_fp32_summation_bound_of_fp64(blocking, m, n, k):
    # Both blockings run on every machine here, not only the one this CPU defaults to:
    # row counts that leave a partial block of weight rows (n % 16, n % 12, n % 4) and of
    # activation rows (m % 2, m % 4), and k with a vector tail.
    g = torch.Generator().manual_seed(m * 100 + n * 3 + k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    got = dl.native_dense_linear(x, w, blocking)
    assert got.shape == (m, n)
    _check(got, x, w)


def test_native_dense_linear_rejects_what_it_cannot_take():
    with pytest.raises(ValueError, match="unknown blocking"):
        dl.native_dense_linear(torch.randn(1, 4), torch.randn(2, 4), "diagonal")
    if dl.native_dense_available():
        with pytest.raises(ValueError, match="contiguous fp32"):
            dl.native_dense_linear(torch.randn(1, 4).double(), torch.randn(2, 4).double())


@needs_native
def test_decode_sized_calls_reach_the_kernel():
    x, w = torch.randn(dl.DEFAULT_NATIVE_ROWS, 20), torch.randn(12, 20)
    calls = []
    for args in [(x[:1], w), (x, w), (torch.randn(dl.DEFAULT_NATIVE_ROWS + 1, 20), w),
                 (x[:2], w, None, 3), (x[:3], w, None, 3)]:  # the fourth is below min_rows: F.linear
        before = dl.native_dense_calls()
        dl.dense_linear(*args)
        calls.append(dl.native_dense_calls() - before)
    assert calls == [1, 1, 0, 0, 1]


@pytest.mark.parametrize("vendor, rows", [("GenuineIntel", 3), ("AuthenticAMD", 1)])
def test_default_rows_and_blocking_follow_the_cpu_vendor(monkeypatch, tmp_path, vendor, rows):
    import builtins

    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(info if path == "/proc/cpuinfo" else path,
                                                                            *a, **k))
    assert dl.default_min_rows() == rows
    assert dl.default_blocking() == ("narrow" if vendor == "GenuineIntel" else "wide")
    assert dl.default_max_rows() == (8 if vendor == "GenuineIntel" else 16)


@needs_native
def test_bias_leading_dims_and_strided_input():
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    x = torch.randn(2, 3, 80, generator=g)[..., ::2]  # (2, 3, 40), not contiguous: 6 rows
    got = dl.dense_linear(x, w, b)
    assert got.shape == (2, 3, 24)
    _check(got.reshape(6, 24), x.reshape(6, 40), w, b)


@pytest.mark.parametrize("case", ["many rows", "bf16", "strided weight", "no rows"])
def test_other_calls_are_exactly_f_linear(case):
    g = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(4, 32, generator=g), torch.randn(16, 32, generator=g), torch.randn(16, generator=g)
    if case == "many rows":
        x = torch.randn(dl.DEFAULT_NATIVE_ROWS + 1, 32, generator=g)
    elif case == "bf16":
        x, w, b = x.bfloat16(), w.bfloat16(), b.bfloat16()
    elif case == "strided weight":
        w = torch.randn(32, 16, generator=g).t()
    else:
        x = x[:0]
    assert torch.equal(dl.dense_linear(x, w, b), F.linear(x, w, b))


def _dense_rewrites(report):
    return [r for g in report.graphs for p in g.passes if p.name == "route_dense_linear" for r in p.rewrites]


@needs_native
@pytest.mark.parametrize("lower", ["eager", "inductor"])
def test_pass_routes_inference_linears_and_keeps_outputs(lower):
    torch._dynamo.reset()
    model = random_llama(heads="gqa", num_layers=2)
    ids = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(0))  # 4 rows: native on any CPU
    with torch.no_grad():
        want = model(ids).logits
        before = dl.native_dense_calls()
        got = torch.compile(model, backend="llmopt", options={"lower": lower, "strict": True})(ids).logits
        native_calls = dl.native_dense_calls() - before
    rewrites = _dense_rewrites(llmopt.last_report())
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert len(rewrites) == linears and all(r.impl == "native" for r in rewrites)
    assert native_calls >= linears  # the compiled step ran them through the kernel
    # the kernel's summation order against PyTorch's; logits are O(1) over K <= 128
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("why", ["training", "native off"])
def test_pass_leaves_training_graphs_and_native_off_alone(why):
    torch._dynamo.reset()
    model = random_llama(heads="gqa", num_layers=1)
    ids = torch.randint(0, 256, (1, 3), generator=torch.Generator().manual_seed(1))
    options = {"lower": "eager", "strict": True}
    if why == "native off":
        options["kernels"] = {"native": False}
        with torch.no_grad():
            torch.compile(model, backend="llmopt", options=options)(ids)
    else:
        torch.compile(model, backend="llmopt", options=options)(ids).logits.sum().backward()
        assert model.lm_head.weight.grad is not None
    assert _dense_rewrites(llmopt.last_report()) == []


def test_pass_is_off_for_tensorrt_and_native_off():
    import dataclasses

    from llmopt.passes.route_dense_linear import RouteDenseLinear

    config = llmopt.LLMOptConfig.from_options({})
    assert RouteDenseLinear().enabled(config)
    assert not RouteDenseLinear().enabled(dataclasses.replace(config, lower="tensorrt"))
    assert not RouteDenseLinear().enabled(config.replace(disable_passes=("route_dense_linear",)))
