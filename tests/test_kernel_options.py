"""The typed option groups, the ``kernels`` group and its one dispatch function,
the implementation each rewritten site runs (recorded in the Report), and the
PyTorch paths CUDA inputs default to, checked on CPU against the fp64 oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llmopt
from llmopt.config import LLMOptConfig, LLMOptConfigError
from llmopt.kernels import dispatch
from llmopt.kernels.options import KernelOptions
from llmopt.models import random_llama
from oracles import attention_reference


# ----------------------------------------------------------------------------- errors per group


@pytest.mark.parametrize("options, message", [
    ({"kernels": {"attn": "sdpa"}}, "unknown kernels option 'attn'; valid options are 'attention'"),
    ({"kernels": {"attention": "flash"}}, "kernels option 'attention' got 'flash'; valid choices are 'auto', 'native'"),
    ({"kernels": {"paged_attention": "sdpa"}}, "kernels option 'paged_attention' got 'sdpa'"),
    ({"kernels": {"native": "no"}}, "kernels option 'native' must be True or False"),
    ({"kernels": "sdpa"}, "option 'kernels' must be a dict of kernel options"),
    ({"prune": {"method": "random"}}, "prune option 'method' got 'random'"),
    ({"prune": {"sparsty": 0.5}}, "unknown prune option 'sparsty'"),
    ({"lower": "tensorrt", "tensorrt": {"precision": "int3"}}, "tensorrt option 'precision' got 'int3'"),
    ({"lower": "tensorrt", "tensorrt": {"min_blocks": 3}}, "unknown tensorrt option 'min_blocks'"),
    ({"quantize": "int5"}, "option 'quantize'"),
    ({"quantize": "int4", "group_size": 7}, "group_size"),
    ({"paging": {"enable": True}}, "unknown paging option 'enable'; valid options are 'enabled'"),
    ({"paging": {"enabled": "yes"}}, "paging option 'enabled' must be True or False, got 'yes'"),
    ({"paging": True}, "option 'paging' must be a dict of paging options, got bool"),
    ({"paged_kv": 1}, "option 'paged_kv' must be True or False, got 1"),
    ({"paged_kv": False, "paging": {"enabled": True}}, "option 'paged_kv'=False contradicts paging option"),
])
def test_each_group_rejects_unknown_keys_and_bad_values(options, message):
    with pytest.raises(LLMOptConfigError, match=message):
        LLMOptConfig.from_options(options)


def test_paging_group_and_its_flat_shorthand_are_one_setting():
    from llmopt.passes.paging_options import PagingOptions

    assert LLMOptConfig().paging == PagingOptions(enabled=False) and LLMOptConfig().paged_kv is False
    shorthand = LLMOptConfig.from_options({"paged_kv": True})
    group = LLMOptConfig.from_options({"paging": {"enabled": True}})
    assert shorthand == group == LLMOptConfig.from_options({"paging": PagingOptions(True), "paged_kv": True})
    assert group.paging.enabled and group.paged_kv is True  # paged_kv mirrors the group
    # changing either one re-derives the other
    assert group.replace(paged_kv=False).paging == PagingOptions(enabled=False)
    assert LLMOptConfig().replace(paging={"enabled": True}).paged_kv is True
    assert group.replace(strict=True).paging.enabled


def test_paging_group_pages_the_graph_and_matches_eager():
    """options={"paging": {"enabled": True}} drives the paging pass (no paged_kv key): the paged
    graph, run inside the runtime's step context, gives each packed sequence its eager logits."""
    from llmopt.runtime.paged_context import PagedKVCache, PagedStep, paged_step

    model = random_llama(heads="gqa", num_layers=2)

    def forward(input_ids, position_ids):
        return model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits

    compiled = torch.compile(forward, backend="llmopt", options={"paging": {"enabled": True}, "lower": "eager"})
    ids, pos = torch.tensor([[4, 5, 6, 7, 8]]), torch.tensor([[0, 1, 2, 0, 1]])
    step = PagedStep(torch.tensor([0, 1, 2, 16, 17]), torch.tensor([[0], [1]]), torch.tensor([3, 2]),
                     torch.tensor([0, 3, 5]), 3, 3)
    with torch.no_grad(), paged_step(PagedKVCache(num_blocks=4, block_size=16), step):
        logits = compiled(ids, pos)
    assert llmopt.last_report().count("paged_attention") == 2
    with torch.no_grad():
        for prompt, rows in (([4, 5, 6], slice(0, 3)), ([7, 8], slice(3, 5))):
            torch.testing.assert_close(logits[0, rows], model(torch.tensor([prompt])).logits[0],
                                       atol=1e-5, rtol=1e-5)


def test_errors_module_is_the_one_error_type():
    import llmopt.errors
    assert llmopt.LLMOptConfigError is llmopt.errors.LLMOptConfigError is LLMOptConfigError


# ----------------------------------------------------------------------------- environment, read once


def test_env_override_is_read_once_when_the_config_is_built(monkeypatch):
    monkeypatch.setenv("LLMOPT_ATTENTION_IMPL", "torch")
    monkeypatch.setenv("LLMOPT_NATIVE", "0")
    config = LLMOptConfig.from_options({})
    assert config.kernels == KernelOptions(attention="torch", paged_attention="torch", native=False)
    monkeypatch.setenv("LLMOPT_ATTENTION_IMPL", "sdpa")  # later changes do not reach a built config
    assert config.kernels.attention == "torch"
    # an explicit option wins over the variable
    assert LLMOptConfig.from_options({"kernels": {"attention": "native"}}).kernels.attention == "native"
    monkeypatch.delenv("LLMOPT_ATTENTION_IMPL")
    monkeypatch.delenv("LLMOPT_NATIVE")
    assert LLMOptConfig.from_options({}).kernels == KernelOptions()


def test_env_override_bad_value_is_a_clear_error():
    with pytest.raises(LLMOptConfigError, match="LLMOPT_ATTENTION_IMPL='fast'; valid values are 'auto'"):
        KernelOptions.from_options(None, environ={"LLMOPT_ATTENTION_IMPL": "fast"})
    # a paged-only name sets only the paged op
    assert KernelOptions.from_options(None, environ={"LLMOPT_ATTENTION_IMPL": "gather_sdpa"}) == \
        KernelOptions(paged_attention="gather_sdpa")


# ----------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("op, impl, device, kwargs, expected", [
    ("attention", "auto", "cpu", {}, "native"),
    ("attention", "auto", "cuda", {}, "sdpa"),  # no GPU record for triton_flash yet
    ("attention", "torch", "cuda", {}, "sdpa"),
    ("attention", "triton", "cuda", {}, "triton"),
    ("attention", "triton", "cpu", {"triton_interpret": True}, "triton"),
    ("attention", "native", "cpu", {"native": False}, "torch"),
    ("attention", "auto", "cpu", {"native": False}, "torch"),
    ("attention", "sdpa", "cpu", {}, "sdpa"),
    ("attention", "auto", "xpu", {}, "sdpa"),
    ("paged_attention", "auto", "cpu", {}, "native"),
    ("paged_attention", "auto", "cuda", {}, "gather_sdpa"),  # no GPU record for triton_paged yet
    ("paged_attention", "torch", "cuda", {}, "gather_sdpa"),
    ("paged_attention", "gather_sdpa", "cpu", {}, "gather_sdpa"),
    ("quantized_linear", "auto", "cpu", {}, "torch"),
    ("quantized_linear", "auto", "cuda", {}, "torch"),  # no GPU record for triton_quant yet
    ("quantized_linear", "triton", "cuda", {}, "triton"),
])
def test_dispatch_decisions(op, impl, device, kwargs, expected):
    assert dispatch.resolve(op, impl, device, **kwargs) == expected


@pytest.mark.parametrize("op, impl, device, message", [
    ("attention", "triton", "cpu", "runs on CUDA tensors"),
    ("attention", "native", "cuda", "'native' runs on CPU tensors, not cuda"),
    ("attention", "gather_sdpa", "cpu", "no implementation 'gather_sdpa'"),
    ("paged_attention", "native", "cuda", "runs on CPU tensors"),
])
def test_dispatch_refuses_what_cannot_run(op, impl, device, message):
    with pytest.raises(ValueError, match=message):
        dispatch.resolve(op, impl, device)


def test_every_cuda_default_is_a_pytorch_path_until_a_gpu_record():
    assert {impl for (_, device), impl in dispatch.DEFAULTS.items() if device == "cuda"} <= {
        "sdpa", "gather_sdpa", "torch"}


# ----------------------------------------------------------------------------- the Report names the impl


@pytest.mark.parametrize("kernels, expected", [(None, "native"), ({"attention": "sdpa"}, "sdpa"),
                                               ({"attention": "torch"}, "torch"),
                                               ({"native": False}, "torch")])
def test_report_names_the_implementation_of_each_site(kernels, expected):
    model = random_llama(heads="gqa", num_layers=2)
    tokens = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(0))
    options = {} if kernels is None else {"kernels": kernels}
    report = llmopt.explain(model, tokens, options=options)
    assert report.impls("attention") == {f"model.layers.{i}.self_attn": expected for i in range(2)}
    assert f"[impl {expected}]" in str(report)
    compiled = torch.compile(model, backend="llmopt", options={"lower": "eager", **options})
    with torch.no_grad():
        torch.testing.assert_close(compiled(tokens).logits, model(tokens).logits, atol=2e-5, rtol=1e-4)


def test_an_impl_that_cannot_run_leaves_the_site_with_the_reason():
    report = llmopt.explain(random_llama(num_layers=1), torch.zeros(1, 5, dtype=torch.long),
                            options={"kernels": {"attention": "triton"}})
    from llmopt.kernels.attention import _TRITON_INTERPRET
    if _TRITON_INTERPRET:  # the test suite's conftest turns Triton's interpreter on: it runs on CPU
        assert report.impls("attention") == {"model.layers.0.self_attn": "triton"}
    else:
        assert report.count("attention") == 0
        assert "runs on CUDA tensors" in report.unmatched("attention")[0].reason


# ----------------------------------------------------------------------------- the SDPA path on CPU


def _inputs(batch, q_heads, kv_heads, q_len, k_len, head_dim, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    def make(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()
    return (make(batch, q_heads, q_len, head_dim), make(batch, kv_heads, k_len, head_dim),
            make(batch, kv_heads, k_len, head_dim))


@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (4, 1)])
@pytest.mark.parametrize("mask, causal_offset, q_len, k_len", [
    (None, None, 5, 7), (None, 0, 6, 6), (None, 3, 4, 7), ("bool", None, 5, 7), ("float", 2, 5, 7),
    ("dead_row", None, 3, 5),
])
def test_sdpa_impl_matches_the_fp64_reference_forward_and_backward(heads, mask, causal_offset, q_len, k_len):
    q_heads, kv_heads = heads
    q, k, v = _inputs(2, q_heads, kv_heads, q_len, k_len, 16)
    attn_mask = None
    gen = torch.Generator().manual_seed(1)
    if mask == "bool":
        attn_mask = torch.rand(2, 1, q_len, k_len, generator=gen) > 0.3
        attn_mask[..., 0] = True
    elif mask == "float":
        attn_mask = torch.randn(1, q_heads, q_len, k_len, generator=gen, dtype=torch.float64)
    elif mask == "dead_row":
        attn_mask = torch.ones(1, 1, q_len, k_len, dtype=torch.bool)
        attn_mask[..., 1, :] = False  # row 1 sees no key: its output is 0
    out, lse = torch.ops.llmopt.attention(q, k, v, attn_mask, causal_offset, None, impl="sdpa")
    ref_out, ref_lse = attention_reference(q, k, v, attn_mask, causal_offset, None)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref_out, (q, k, v), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_sdpa_impl_fp32_gradients_match_the_cpu_kernel():
    q, k, v = _inputs(1, 6, 2, 9, 9, 32, dtype=torch.float32)
    grad = torch.randn(1, 6, 9, 32)
    results = []
    for impl in ("sdpa", "torch"):
        out, _ = torch.ops.llmopt.attention(q, k, v, None, 0, None, impl=impl)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_training_through_the_sdpa_impl_matches_eager():
    """A graph compiled with kernels.attention="sdpa" trains: the op's backward runs
    the forward's implementation (its ``impl`` is saved with the autograd context)."""
    torch._dynamo.reset()
    model = random_llama(num_layers=1)
    tokens = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    options = {"lower": "eager", "kernels": {"attention": "sdpa"}}
    compiled = torch.compile(model, backend="llmopt", options=options)
    compiled(tokens).logits.sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert llmopt.last_report().impls("attention") == {"model.layers.0.self_attn": "sdpa"}
    model.zero_grad()
    model(tokens).logits.sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(got[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)
    torch._dynamo.reset()


def test_sdpa_call_without_gqa_flag_is_plain_sdpa():
    q, k, v = (t.detach() for t in _inputs(1, 2, 2, 4, 4, 8, dtype=torch.float32))
    out, _ = torch.ops.llmopt.attention(q, k, v, None, 0, None, impl="sdpa")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


# ----------------------------------------------------------------------------- quantized linears


def test_quantized_linear_env_overrides_are_read_once(monkeypatch):
    monkeypatch.setenv("LLMOPT_QUANT_IMPL", "torch")
    monkeypatch.setenv("LLMOPT_INT4_CPU_KERNEL", "torch")
    monkeypatch.setenv("LLMOPT_QUANT_CPU_DTYPE", "float32")
    config = LLMOptConfig.from_options({})
    assert config.kernels == KernelOptions(quantized_linear="torch", int4_cpu_kernel="torch",
                                           quant_cpu_dtype="float32")
    monkeypatch.setenv("LLMOPT_QUANT_CPU_DTYPE", "bfloat16")  # later changes do not reach a built config
    assert config.kernels.quant_cpu_dtype == "float32"
    # an explicit option wins over the variable
    assert LLMOptConfig.from_options({"kernels": {"int4_cpu_kernel": "native"}}).kernels.int4_cpu_kernel == "native"
    for name in ("LLMOPT_QUANT_IMPL", "LLMOPT_INT4_CPU_KERNEL", "LLMOPT_QUANT_CPU_DTYPE"):
        monkeypatch.delenv(name)
    assert LLMOptConfig.from_options({}).kernels == KernelOptions()


@pytest.mark.parametrize("environ, message", [
    ({"LLMOPT_QUANT_IMPL": "cuda"}, "LLMOPT_QUANT_IMPL='cuda'; valid values are 'auto', 'torch', 'triton'"),
    ({"LLMOPT_INT4_CPU_KERNEL": "c"}, "LLMOPT_INT4_CPU_KERNEL='c'; valid values are 'native', 'torch'"),
    ({"LLMOPT_QUANT_CPU_DTYPE": "fp32"}, "LLMOPT_QUANT_CPU_DTYPE='fp32'; valid values are 'bfloat16', 'float32'"),
])
def test_quantized_linear_env_bad_value_is_a_clear_error(environ, message):
    with pytest.raises(LLMOptConfigError, match=message):
        KernelOptions.from_options(None, environ=environ)


@pytest.mark.parametrize("kernels, message", [
    ({"quantized_linear": "native"}, "kernels option 'quantized_linear' got 'native'; valid choices are 'auto'"),
    ({"int4_cpu_kernel": "auto"}, "kernels option 'int4_cpu_kernel' got 'auto'"),
    ({"quant_cpu_dtype": "float16"}, "kernels option 'quant_cpu_dtype' got 'float16'"),
    ({"merge_siblings": 1}, "kernels option 'merge_siblings' must be True or False"),
])
def test_quantized_linear_bad_option_is_a_clear_error(kernels, message):
    with pytest.raises(LLMOptConfigError, match=message):
        LLMOptConfig.from_options({"kernels": kernels})
