"""Every attention site of real architectures is rewritten; outputs and gradients match eager.

Architectures: Hugging Face Llama (sdpa and eager attention), GPT-2 (eager),
Qwen2 and Mistral configs (GQA), an MQA Llama, the hand-written GPT-2-style
model (plain matmul/softmax code) and SmolLM2 (the real pretrained model).
"""

import pytest
import torch
import torch.nn.functional as F

import llmopt
from llmopt.models import random_handwritten_gpt, random_hf_model, random_llama

LAYERS = 2

MODELS = {
    "llama-sdpa-gqa": lambda: random_llama(heads="gqa", num_layers=LAYERS, attn_implementation="sdpa"),
    "llama-eager-gqa": lambda: random_llama(heads="gqa", num_layers=LAYERS, attn_implementation="eager"),
    "llama-sdpa-mqa": lambda: random_llama(heads="mqa", num_layers=LAYERS, attn_implementation="sdpa"),
    "gpt2-eager": lambda: random_hf_model("gpt2", attn_implementation="eager", n_layer=LAYERS),
    "qwen2-sdpa-gqa": lambda: random_hf_model("qwen2", attn_implementation="sdpa", num_key_value_heads=2),
    "mistral-eager-gqa": lambda: random_hf_model("mistral", attn_implementation="eager", num_key_value_heads=2),
    "handwritten-gpt": lambda: random_handwritten_gpt(),
}

# fp32 throughout. eager lowering: only attention changes (fused CPU flash
# kernel vs. SDPA/matmul-softmax), a few ulps on O(1)-O(10) values. Inductor
# also reorders the reductions of every norm and matmul; 2 layers stay ~1e-5.
TOL = {"eager": dict(atol=2e-5, rtol=2e-5), "inductor": dict(atol=2e-4, rtol=1e-4)}


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _ids(length=13):
    return torch.randint(0, 256, (2, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("lower", ["eager", "inductor"])
@pytest.mark.parametrize("name", list(MODELS))
def test_inference_every_site_rewritten_and_matches_eager(name, lower):
    model = MODELS[name]()
    ids = _ids()
    with torch.no_grad():
        want = _logits(model(ids))
        got = _logits(torch.compile(model, backend="llmopt", options={"lower": lower, "strict": True})(ids))
    report = llmopt.last_report()
    assert report.count("attention") == LAYERS, str(report)
    assert report.unmatched("attention") == []
    torch.testing.assert_close(got, want, **TOL[lower])


@pytest.mark.parametrize("lower", ["eager", "inductor"])
@pytest.mark.parametrize("name", list(MODELS))
def test_training_gradients_match_eager(name, lower):
    model = MODELS[name]().train()
    ids = _ids()

    def step(fn):
        model.zero_grad(set_to_none=True)
        logits = _logits(fn(ids))
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want_loss, want = step(model)
    got_loss, got = step(torch.compile(model, backend="llmopt", options={"lower": lower, "strict": True}))
    assert llmopt.last_report().count("attention") == LAYERS
    torch.testing.assert_close(got_loss, want_loss, **TOL[lower])
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], **TOL[lower], msg=key)


# ---------------------------------------------------------------- SmolLM2, the real model


@pytest.mark.slow
@pytest.mark.parametrize("lower", ["eager", "inductor"])
def test_smollm2_training_gradients_match_eager(smollm2, lower):
    model, tokenizer = smollm2
    ids = tokenizer("To be, or not to be, that is the question:", return_tensors="pt")["input_ids"]
    params = dict(model.named_parameters())
    # A few tensors across the depth keep the comparison cheap and still
    # exercise every layer's backward (gradients flow through all of them).
    watched = ["model.layers.0.self_attn.q_proj.weight", "model.layers.15.self_attn.k_proj.weight",
               "model.layers.29.self_attn.v_proj.weight", "model.layers.29.mlp.down_proj.weight"]

    def step(fn):
        model.zero_grad(set_to_none=True)
        logits = fn(ids).logits
        loss = F.cross_entropy(logits[0, :-1], ids[0, 1:])
        loss.backward()
        grads = {n: params[n].grad.clone() for n in watched}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    try:
        want_loss, want = step(model)
        got_loss, got = step(torch.compile(model, backend="llmopt", options={"lower": lower, "strict": True}))
    finally:
        model.zero_grad(set_to_none=True)
    assert llmopt.last_report().count("attention") == 30
    # 30 layers of fp32: the loss agrees to ~1e-5 relative, gradients to ~1e-4
    # of their largest entries.
    torch.testing.assert_close(got_loss, want_loss, atol=1e-4, rtol=1e-4)
    for name in watched:
        scale = want[name].abs().max()
        torch.testing.assert_close(got[name] / scale, want[name] / scale, atol=5e-4, rtol=0, msg=name)
