"""Pruning: masks, scores, the prune_linear pass, and structured pruning of Llama models."""

import copy

import pytest
import torch
from torch import nn

import llmopt
from llmopt import quality
from llmopt.models import random_llama
from llmopt.pruning import (
    PruneConfig,
    collect_activation_norms,
    prune_model,
    two_four_mask,
    unstructured_mask,
    wanda_scores,
    weight_mask,
)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _tokens(batch=2, length=11, seed=0):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------- masks and scores


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_unstructured_mask_has_exact_sparsity(sparsity):
    scores = _randn(64, 48).abs()
    assert int((~unstructured_mask(scores, sparsity)).sum()) == round(sparsity * 64 * 48)
    per_row = unstructured_mask(scores, sparsity, per_row=True)
    assert ((~per_row).sum(dim=1) == round(sparsity * 48)).all()


def test_magnitude_pruning_removes_the_smallest_weights():
    weight = _randn(32, 40)
    mask = weight_mask(weight, PruneConfig(method="magnitude", sparsity=0.4))
    assert weight[mask].abs().min() >= weight[~mask].abs().max()
    # Ties (here: many equal magnitudes) still give the exact count.
    tied = torch.ones(8, 8)
    assert int((~weight_mask(tied, PruneConfig(sparsity=0.25))).sum()) == 16


def test_two_four_mask_keeps_the_two_largest_of_every_four():
    weight = _randn(16, 32)
    mask = two_four_mask(weight.abs())
    groups, kept = weight.abs().reshape(16, 8, 4), mask.reshape(16, 8, 4)
    assert (kept.sum(dim=-1) == 2).all()  # every group of 4 has exactly 2 zeros
    top2 = groups.topk(2, dim=-1).indices
    assert kept.gather(-1, top2).all()
    with pytest.raises(ValueError, match="divisible by 4"):
        two_four_mask(torch.ones(2, 6))


def test_wanda_scores_match_a_hand_computation():
    weight = torch.tensor([[1.0, -2.0, 3.0, -4.0], [0.5, 0.5, -0.5, 0.5]])
    x = torch.tensor([[3.0, 0.0, 1.0, 0.1], [4.0, 1.0, 1.0, 0.0]])  # two tokens, four input channels
    norms = torch.tensor([5.0, 1.0, 2 ** 0.5, 0.1])  # ||X_j||_2 by hand
    assert torch.allclose(x.norm(dim=0), norms)
    expected = torch.tensor([[5.0, 2.0, 3 * 2 ** 0.5, 0.4], [2.5, 0.5, 0.5 * 2 ** 0.5, 0.05]])
    assert torch.allclose(wanda_scores(weight, norms), expected)
    # Wanda compares within each output row: row 0 drops channels 3 and 1, row 1 channels 3 and 1.
    mask = weight_mask(weight, PruneConfig(method="wanda", sparsity=0.5), norms)
    assert mask.tolist() == [[True, False, True, False], [True, False, True, False]]


def test_activation_norms_are_input_channel_norms_over_all_tokens():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))
    ids = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 0])
    norms = collect_activation_norms(model, ids, context_length=4)  # windows 4 + 4 + 2
    with torch.no_grad():
        expected = model[0](ids).norm(dim=0)
    assert torch.allclose(norms["1"], expected)


@pytest.mark.parametrize("options,message", [
    ({"method": "random"}, "prune option 'method' got 'random'; valid choices are 'magnitude', 'wanda'"),
    ({"pattern": "1:4"}, "prune option 'pattern' got '1:4'; valid choices are 'unstructured', '2:4'"),
    ({"sparsity": 1.5}, "'sparsity' must be a number in \\(0, 1\\)"),
    ({"pattern": "2:4", "sparsity": 0.6}, "'2:4' has sparsity 0.5 by definition"),
    ({"sparsty": 0.5}, "unknown prune option 'sparsty'"),
    ({"pattern": "heads"}, "apply llmopt.pruning.prune_model"),
    ({"pattern": "channels"}, "apply llmopt.pruning.prune_model"),
    ({"method": "wanda"}, "method 'wanda' needs 'calibration'"),
])
def test_bad_prune_options(options, message):
    with pytest.raises(llmopt.LLMOptConfigError, match=message):
        llmopt.LLMOptConfig.from_options({"prune": options})


# ---------------------------------------------------------------- the backend pass


def _pruned_by_hand(model, config, norms=None):
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in reference.named_modules():
            if isinstance(module, nn.Linear) and name != "lm_head":
                module.weight.mul_(weight_mask(module.weight, config, norms[name] if norms else None))
    return reference


@pytest.mark.parametrize("method,pattern", [("magnitude", "unstructured"), ("magnitude", "2:4"),
                                            ("wanda", "unstructured"), ("wanda", "2:4")])
def test_pass_equals_eager_with_pruned_weights(method, pattern):
    model = random_llama(heads="gqa")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _tokens()
    norms = collect_activation_norms(model, _tokens(1, 64, seed=5)) if method == "wanda" else None
    options = {"method": method, "pattern": pattern, "sparsity": 0.5, "calibration": norms}
    compiled = torch.compile(model, backend="llmopt", options={"lower": "eager", "strict": True, "prune": options})
    expected = _logits(_pruned_by_hand(model, PruneConfig(**options), norms), ids)
    assert torch.equal(_logits(compiled, ids), expected)
    # The user's module keeps its weights.
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    assert not torch.equal(_logits(model, ids), expected)
    report = llmopt.last_report()
    assert report.count("prune") == 14  # 7 linear layers x 2; the output head is skipped
    assert any("lm_head" in s.location for s in report.unmatched("prune"))
    notes = [n for g in report.graphs for p in g.passes for n in p.notes]
    assert any("stored dense" in n for n in notes)


def test_pass_under_inductor():
    model = random_llama(heads="gqa")
    ids = _tokens()
    options = {"method": "magnitude", "pattern": "2:4"}
    compiled = torch.compile(model, backend="llmopt", options={"lower": "inductor", "strict": True, "prune": options})
    expected = _logits(_pruned_by_hand(model, PruneConfig(**options)), ids)
    assert torch.allclose(_logits(compiled, ids), expected, atol=2e-4, rtol=1e-4)


# ---------------------------------------------------------------- structured pruning


def _zero_kv_group(model, group):
    """Make KV-head group ``group`` contribute nothing: zero its o_proj columns in every layer."""
    config = model.config
    head_dim = config.head_dim
    width = config.num_attention_heads // config.num_key_value_heads * head_dim
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, group * width:(group + 1) * width] = 0


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_pruning_zero_importance_heads_keeps_outputs(method):
    model = random_llama(heads="gqa")  # 4 query heads, 2 KV heads, head_dim 16
    _zero_kv_group(model, 1)
    ids = _tokens()
    before = _logits(model, ids)
    count = sum(p.numel() for p in model.parameters())
    kept_q = model.model.layers[0].self_attn.q_proj.weight[:32].clone()
    prune_model(model, PruneConfig(method=method, pattern="heads", sparsity=0.5), calibration_text=_tokens(1, 64))
    assert torch.allclose(_logits(model, ids), before, atol=1e-6, rtol=1e-5)
    attention = model.model.layers[0].self_attn
    assert (attention.q_proj.out_features, attention.k_proj.out_features, attention.o_proj.in_features) == (32, 16, 32)
    assert torch.equal(attention.q_proj.weight, kept_q)  # group 0 (query heads 0, 1) stayed
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (2, 1, 16)
    # Per layer, q and o lose 32 x 64 weights each, k and v 16 x 64 each.
    assert sum(p.numel() for p in model.parameters()) == count - 2 * (2 * 2048 + 2 * 1024)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_pruning_zero_importance_channels_keeps_outputs(method):
    model = random_llama(heads="gqa")  # intermediate_size 128
    dead = torch.randperm(128, generator=torch.Generator().manual_seed(3))[:64]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, dead] = 0
    ids = _tokens()
    before = _logits(model, ids)
    count = sum(p.numel() for p in model.parameters())
    prune_model(model, PruneConfig(method=method, pattern="channels", sparsity=0.5), calibration_text=_tokens(1, 64))
    assert torch.allclose(_logits(model, ids), before, atol=1e-6, rtol=1e-5)
    mlp = model.model.layers[0].mlp
    assert (mlp.gate_proj.out_features, mlp.up_proj.out_features, mlp.down_proj.in_features) == (64, 64, 64)
    assert model.config.intermediate_size == 64
    assert sum(p.numel() for p in model.parameters()) == count - 2 * 3 * 64 * 64


def test_shrunk_model_runs_under_llmopt():
    model = random_llama(heads="gqa")
    prune_model(model, PruneConfig(pattern="heads", sparsity=0.5))
    prune_model(model, PruneConfig(pattern="channels", sparsity=0.25))
    ids = _tokens()
    compiled = torch.compile(model, backend="llmopt", options={"lower": "eager", "strict": True})
    assert torch.allclose(_logits(compiled, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)
    assert llmopt.last_report().count("attention") == 2  # the GQA attention is still fused


def test_unstructured_prune_model_zeroes_in_place():
    model = random_llama(heads="gqa")
    prune_model(model, {"pattern": "2:4"})
    weight = model.model.layers[1].mlp.down_proj.weight
    assert ((weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1) == 2).all()
    assert (model.lm_head.weight != 0).all()


def test_structured_errors():
    model = random_llama(heads="gqa")
    with pytest.raises(ValueError, match="removes 0 of 2 KV-head groups"):
        prune_model(model, PruneConfig(pattern="heads", sparsity=0.2))
    with pytest.raises(ValueError, match="needs calibration_text"):
        prune_model(model, PruneConfig(method="wanda", pattern="channels"))


def test_evaluate_and_table():
    model = random_llama(heads="gqa")
    ids = _tokens(1, 48)[0]
    base = quality.evaluate(model, ids, quality.Setting(), context_length=16, stride=8)
    pruned = quality.evaluate(model, ids, quality.Setting(prune={"method": "magnitude", "pattern": "2:4"}),
                              context_length=16, stride=8)
    shrunk = quality.evaluate(model, ids, quality.Setting(prune={"pattern": "channels", "sparsity": 0.5}),
                              context_length=16, stride=8)
    assert base["tokens_scored"] == pruned["tokens_scored"] == 47
    assert pruned["compiled"] and not base["compiled"] and pruned["perplexity"] != base["perplexity"]
    # The compiled graph reads the pruned copies instead of the originals: the same bytes (dense).
    assert pruned["weight_bytes"] == base["weight_bytes"]
    assert shrunk["weight_bytes"] < base["weight_bytes"] and model.config.intermediate_size == 128
    table = quality.format_table([base, pruned])
    assert "| fp32 prune magnitude 2:4 50% |" in table and "| 47 | 16/8 |" in table
