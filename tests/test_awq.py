"""Activation-aware equivalent scaling (llmopt/quantization/awq.py) on a random tiny Llama.

The transform must leave the float model's function alone (only fp32
rounding: each weight is multiplied or divided once by a positive scale, a
relative change of at most one rounding, ~6e-8, per weight; two blocks of
matmuls, softmax and norms turn that into ~1e-6 of the logits' scale, so the
bound below, 2e-5, has margin without hiding a wrong fold, which moves the
logits by order 1), put each scale where its inverse is folded, and refuse
models and arguments it cannot handle with a message.
"""

import pytest
import torch
from torch import nn

from llmopt.config import LLMOptConfigError
from llmopt.models import random_llama
from llmopt.quantization import apply_activation_scaling, quantize_weights, QuantConfig, token_batches
from llmopt.quantization.awq import _scales

TOLERANCE = 2e-5  # max |logit change| / max |logit|; see the module docstring


def _model():
    model = random_llama(heads="gqa", num_layers=2).eval()  # 4 query heads, 2 kv heads, head_dim 16
    with torch.no_grad():  # outlier input channels, as trained models have: scaling pays off there
        for layer in model.model.layers:
            layer.input_layernorm.weight[::9] *= 8.0
            layer.post_attention_layernorm.weight[3::11] *= 6.0
    return model


def _batches(n=256, length=64, seed=0):
    ids = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))
    return token_batches(ids, length)


def _weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("search,scale_o_proj", [("rtn", False), ("gptq", True)])
def test_float_logits_unchanged(search, scale_o_proj):
    model = _model()
    ids = _batches(seed=1)[0]
    with torch.no_grad():
        before = model(ids).logits
    report = apply_activation_scaling(model, _batches(), group_size=32, search=search, scale_o_proj=scale_o_proj)
    with torch.no_grad():
        after = model(ids).logits
    assert (after - before).abs().max() / before.abs().max() < TOLERANCE
    kinds = {"qkv", "gate_up", "down"} | ({"o"} if scale_o_proj else set())
    assert set(report.groups) == {f"model.layers.{i}.{k}" for i in range(2) for k in kinds}
    assert any(g.alpha > 0 for g in report.groups.values())  # something was scaled
    # The search judged alpha 0 (no scaling) too, so it never chose a worse error.
    assert all(g.error <= g.unscaled_error for g in report.groups.values())


def test_scales_are_folded_where_expected():
    model = _model()
    old = _weights(model)
    block0_input = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: block0_input.append(a[0]))
    with torch.no_grad():
        for batch in _batches():
            model(batch)
    hook.remove()
    report = apply_activation_scaling(model, _batches(), group_size=32, search="rtn", scale_o_proj=True)
    new = _weights(model)
    heads, kv_heads, head_dim = 4, 2, 16
    for i in range(2):
        p = f"model.layers.{i}."
        # q/k/v: one s, the inverse folded into input_layernorm.
        s = old[p + "input_layernorm.weight"] / new[p + "input_layernorm.weight"]
        for name in ("q_proj", "k_proj", "v_proj"):
            w = f"{p}self_attn.{name}.weight"
            v_rows = 1.0
            if name == "v_proj":  # o's scales divide v's rows (checked below)
                v_rows = (new[w] / (old[w] * s[None, :]))[:, :1]
            torch.testing.assert_close(new[w], old[w] * s[None, :] * v_rows, rtol=1e-5, atol=0)
        # o: s per (kv head, dim), shared by the query heads of that kv head.
        s_o = new[p + "self_attn.o_proj.weight"][0] / old[p + "self_attn.o_proj.weight"][0]
        per_head = s_o.reshape(kv_heads, heads // kv_heads, head_dim)
        torch.testing.assert_close(per_head, per_head[:, :1].expand_as(per_head), rtol=1e-5, atol=0)
        torch.testing.assert_close(new[p + "self_attn.o_proj.weight"],
                                   old[p + "self_attn.o_proj.weight"] * s_o[None, :], rtol=1e-5, atol=0)
        s_kv = per_head[:, 0].reshape(-1)
        torch.testing.assert_close(new[p + "self_attn.v_proj.weight"],
                                   old[p + "self_attn.v_proj.weight"] * s[None, :] / s_kv[:, None], rtol=1e-5, atol=0)
        # gate/up: one s, the inverse folded into post_attention_layernorm; down: its s divides up's rows.
        s = old[p + "post_attention_layernorm.weight"] / new[p + "post_attention_layernorm.weight"]
        s_down = new[p + "mlp.down_proj.weight"][0] / old[p + "mlp.down_proj.weight"][0]
        torch.testing.assert_close(new[p + "mlp.down_proj.weight"],
                                   old[p + "mlp.down_proj.weight"] * s_down[None, :], rtol=1e-5, atol=0)
        torch.testing.assert_close(new[p + "mlp.gate_proj.weight"], old[p + "mlp.gate_proj.weight"] * s[None, :],
                                   rtol=1e-5, atol=0)
        torch.testing.assert_close(new[p + "mlp.up_proj.weight"],
                                   old[p + "mlp.up_proj.weight"] * s[None, :] / s_down[:, None], rtol=1e-5, atol=0)
    # Block 0's q/k/v scales are mean|x|^alpha of its input (normalised), alpha the one reported.
    magnitude = torch.cat([x.reshape(-1, x.shape[-1]) for x in block0_input]).abs().mean(0)
    s = old["model.layers.0.input_layernorm.weight"] / new["model.layers.0.input_layernorm.weight"]
    alpha = report.groups["model.layers.0.qkv"].alpha
    assert alpha > 0  # the outlier channels make scaling worth it
    torch.testing.assert_close(s, _scales(magnitude, alpha), rtol=1e-5, atol=0)
    # Embeddings, the final norm and the lm_head are not touched.
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(new[name], old[name])


def test_quantizing_the_scaled_model():
    """The pipeline runs on the transformed model, and scaling lowers the int4 error on outlier inputs."""
    batches = _batches(n=512)
    ids = _batches(seed=2)[0]

    def kl_of_int4(model):
        weights = quantize_weights(model, QuantConfig("int4", group_size=32, skip=("lm_head",)), calibration=batches)
        with torch.no_grad():
            ref = torch.log_softmax(model(ids).logits, -1)
            for name, layer in weights.layers.items():
                model.get_submodule(name).weight.data = layer.dequantize()
            out = torch.log_softmax(model(ids).logits, -1)
        return torch.nn.functional.kl_div(out, ref, log_target=True, reduction="batchmean").item()

    plain = kl_of_int4(_model())
    scaled_model = _model()
    apply_activation_scaling(scaled_model, batches, group_size=32)
    assert kl_of_int4(scaled_model) < plain


class _NotLlama(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8)) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_bad_input_is_refused_with_a_reason():
    model = _model()
    before = _weights(model)
    with pytest.raises(ValueError, match="no calibration batches"):
        apply_activation_scaling(model, [])
    with pytest.raises(ValueError, match="alphas"):
        apply_activation_scaling(model, _batches(), alphas=(0.5, 1.5))
    with pytest.raises(ValueError, match="search quantizer 'awq'"):
        apply_activation_scaling(model, _batches(), search="awq")
    with pytest.raises(LLMOptConfigError, match="group_size"):
        apply_activation_scaling(model, _batches(), group_size=100)
    with pytest.raises(ValueError, match="not a Llama-like decoder layer; missing input_layernorm"):
        apply_activation_scaling(_NotLlama(), [torch.randn(1, 8)])
    with pytest.raises(ValueError, match="found no decoder blocks"):
        apply_activation_scaling(nn.Sequential(nn.Linear(4, 4)), [torch.randn(1, 4)])
    after = _weights(model)
    assert all(torch.equal(before[n], after[n]) for n in before)  # refused before touching anything
