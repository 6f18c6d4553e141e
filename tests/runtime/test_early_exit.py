"""Early-exit decoding against references computed from the full Hugging Face model.

References: HF ``generate`` (greedy) for the never-exit case; HF's
``output_hidden_states`` for what an exit at layer l must predict (the layers
before the first check are exact for every token, so HF's hidden state after
``l`` layers is the exit state), for the exit decision (the criterion computed
by hand from those states) and for the K/V the skipped layers must hold
(CALM's copy: the skipped layer's own projections of the exit state).
"""

import math

import pytest
import torch

from llmopt.errors import LLMOptConfigError
from llmopt.models import random_hf_model, random_llama
from llmopt.runtime import early_exit as ee
from llmopt.runtime.early_exit import EarlyExitDecodeConfig

PROMPT = [5, 17, 33, 2, 9, 41, 7]
NEW = 12


@pytest.fixture(scope="module")
def model():
    return random_llama(heads="gqa", num_layers=4)


def _hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@torch.no_grad()
def _hidden(model, ids):
    out = model(torch.tensor([ids]), output_hidden_states=True, use_cache=True)
    return out.hidden_states, out.logits[0], out.past_key_values


def _exit_logits(model, hidden):
    return model.lm_head(model.model.norm(hidden)).float()


def _kv(cache, layer):
    entry = cache.layers[layer]
    return entry.keys, entry.values


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@torch.no_grad()
def _copied_kv(model, layer, hidden, positions):
    """By hand: layer ``layer``'s K (with RoPE) and V of ``hidden`` (1, T, H) at ``positions``."""
    block = model.model.layers[layer]
    attn = block.self_attn
    x = block.input_layernorm(hidden)
    k = attn.k_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
    cos, sin = model.model.rotary_emb(hidden, position_ids=torch.tensor([positions]))
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return k * cos + _rotate_half(k) * sin, v


@pytest.mark.parametrize("criterion", ["max_prob", "margin"])
def test_threshold_above_one_is_plain_greedy(model, criterion):
    expected = _hf_greedy(model, PROMPT, NEW)
    tokens, stats = ee.generate(model, PROMPT, NEW, {"threshold": 1.01, "min_layer": 1, "criterion": criterion})
    assert tokens == expected
    assert stats.layers_used == [4] * NEW and stats.exit_fraction == 0
    assert stats.num_checks == (NEW - 1) * 3  # checks after 1, 2 and 3 layers, every decoded token
    plain, _ = ee.generate(model, PROMPT, NEW)
    assert plain == expected


@torch.no_grad()
def test_always_exiting_predicts_from_the_exit_layer_and_copies_its_state_into_the_kv(model):
    min_layer = 2
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    tokens, stats = ee.generate(model, PROMPT, NEW, {"threshold": 0.0, "min_layer": min_layer}, cache=cache)
    assert stats.layers_used == [4] + [min_layer] * (NEW - 1)
    ids = PROMPT + tokens[:-1]
    hidden, logits, _ = _hidden(model, ids)
    # The first token: the prompt's full forward. Every later one: argmax at the exit layer.
    assert tokens[0] == int(logits[len(PROMPT) - 1].argmax())
    exit_argmax = _exit_logits(model, hidden[min_layer][0]).argmax(-1)
    assert tokens[1:] == exit_argmax[len(PROMPT):].tolist()
    # Layers before the exit hold the full model's K/V at every position.
    _, _, full_cache = _hidden(model, ids)
    for layer in range(min_layer):
        for got, want in zip(_kv(cache, layer), _kv(full_cache, layer)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Skipped layers: the prompt's K/V as the full model computed it, the decoded
    # tokens' K/V from the exit state copied forward.
    decoded = list(range(len(PROMPT), len(ids)))
    for layer in range(min_layer, 4):
        k_full, v_full = _kv(full_cache, layer)
        k, v = _kv(cache, layer)
        torch.testing.assert_close(k[:, :, :len(PROMPT)], k_full[:, :, :len(PROMPT)], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v[:, :, :len(PROMPT)], v_full[:, :, :len(PROMPT)], rtol=1e-5, atol=1e-5)
        k_copy, v_copy = _copied_kv(model, layer, hidden[min_layer][:, len(PROMPT):], decoded)
        torch.testing.assert_close(k[:, :, len(PROMPT):], k_copy, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v[:, :, len(PROMPT):], v_copy, rtol=1e-5, atol=1e-5)
        # The first skipped layer's input is the exit state itself (exact); deeper ones
        # differ from what the full model stores (the approximation).
        if layer > min_layer:
            assert not torch.allclose(k[:, :, len(PROMPT):], k_full[:, :, len(PROMPT):], atol=1e-3)


@torch.no_grad()
def test_kv_fill_full_keeps_the_exact_cache(model):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    tokens, stats = ee.generate(model, PROMPT, NEW, {"threshold": 0.0, "min_layer": 1, "kv_fill": "full"},
                                cache=cache)
    assert stats.layers_used == [4] + [1] * (NEW - 1)
    ids = PROMPT + tokens[:-1]
    hidden, _, full_cache = _hidden(model, ids)
    assert tokens[1:] == _exit_logits(model, hidden[1][0]).argmax(-1)[len(PROMPT):].tolist()
    for layer in range(4):
        for got, want in zip(_kv(cache, layer), _kv(full_cache, layer)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("criterion", ["max_prob", "margin"])
@torch.no_grad()
def test_exit_decision_against_the_hand_computed_confidence(model, criterion):
    first = _hf_greedy(model, PROMPT, 1)[0]
    hidden, _, _ = _hidden(model, PROMPT + [first])
    probs = torch.softmax(_exit_logits(model, hidden[1][0, -1]), -1)
    top = probs.topk(2).values
    conf = float(top[0] if criterion == "max_prob" else top[0] - top[1])
    assert 1e-3 < conf < 0.99  # not degenerate: both thresholds below are in (0, 1)
    # One check only (after layer 1): check_every past the depth.
    base = {"min_layer": 1, "criterion": criterion, "check_every": 10}
    _, below = ee.generate(model, PROMPT, 2, {**base, "threshold": conf - 1e-5})
    _, above = ee.generate(model, PROMPT, 2, {**base, "threshold": conf + 1e-5})
    assert below.layers_used == [4, 1]
    assert above.layers_used == [4, 4]


@torch.no_grad()
def test_identity_tail_makes_exit_exact():
    """Layers from min_layer on add nothing (zero o_proj and down_proj): exiting anywhere
    is the full model, tokens and cache, at any threshold."""
    model = random_llama(heads="mha", num_layers=4, seed=3)
    for layer in model.model.layers[2:]:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    tokens, stats = ee.generate(model, PROMPT, NEW, {"threshold": 0.0, "min_layer": 2}, cache=cache)
    assert tokens == _hf_greedy(model, PROMPT, NEW)
    assert stats.mean_layers == (4 + 2 * (NEW - 1)) / NEW
    _, _, full_cache = _hidden(model, PROMPT + tokens[:-1])
    for layer in range(4):
        for got, want in zip(_kv(cache, layer), _kv(full_cache, layer)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    text = list(range(3, 20))
    calibration = ee.calibrate_threshold(model, text, target_agreement=1.0, min_layer=2,
                                         candidates=[0.9, 0.5, 0.0], context=4)
    assert calibration.threshold == 0.0 and calibration.agreement == 1.0


@torch.no_grad()
def test_score_is_the_teacher_forced_exit_nll(model):
    text = [(7 * i + 3) % 200 for i in range(40)]
    context = 6
    _, logits, _ = _hidden(model, text)
    full = ee.score(model, text, None, context=context)
    logp = torch.log_softmax(logits.float(), -1)
    want = [-float(logp[p, text[p + 1]]) for p in range(context - 1, len(text) - 1)]
    assert full.nll == pytest.approx(want, rel=1e-5, abs=1e-5)
    never = ee.score(model, text, {"threshold": 2.0, "min_layer": 1}, context=context)
    assert never.nll == pytest.approx(full.nll, rel=1e-4, abs=1e-4)
    assert never.agreement(full) == 1.0
    assert never.perplexity == pytest.approx(math.exp(sum(want) / len(want)), rel=1e-4)
    # Always exiting after layer 1: layer 1 is exact for every token, so its exit logits are HF's.
    hidden, _, _ = _hidden(model, text)
    early = ee.score(model, text, {"threshold": 0.0, "min_layer": 1}, context=context)
    exit_logp = torch.log_softmax(_exit_logits(model, hidden[1][0]), -1)
    want_early = [-float(exit_logp[context - 1, text[context]])]  # from the full prefill
    want_early[0] = -float(logp[context - 1, text[context]])
    want_early += [-float(exit_logp[p, text[p + 1]]) for p in range(context, len(text) - 1)]
    assert early.nll == pytest.approx(want_early, rel=1e-4, abs=1e-4)
    assert early.stats.mean_layers < 1.2
    assert early.agreement(full) < 1.0


def test_calibration_stops_at_the_first_threshold_that_misses(model):
    text = [(7 * i + 3) % 200 for i in range(24)]
    calibration = ee.calibrate_threshold(model, text, target_agreement=1.0, min_layer=1,
                                         candidates=[0.0, 1.5], context=6)
    assert calibration.threshold == 1.5 and calibration.agreement == 1.0
    assert [t["threshold"] for t in calibration.tried] == [1.5, 0.0]
    assert calibration.tried[1]["agreement"] < 1.0


@pytest.mark.parametrize("options, message", [
    ({"threshold": -0.1, "min_layer": 1}, "threshold"),
    ({"threshold": float("nan"), "min_layer": 1}, "threshold"),
    ({"threshold": True, "min_layer": 1}, "threshold"),
    ({"threshold": "0.9", "min_layer": 1}, "threshold"),
    ({"threshold": 0.9, "min_layer": 0}, "min_layer"),
    ({"threshold": 0.9, "min_layer": 1.5}, "min_layer"),
    ({"threshold": 0.9, "min_layer": 1, "check_every": 0}, "check_every"),
    ({"threshold": 0.9, "min_layer": 1, "criterion": "entropy"}, "criterion"),
    ({"threshold": 0.9, "min_layer": 1, "kv_fill": "skip"}, "kv_fill"),
    ({"threshold": 0.9, "min_layer": 1, "thresold": 1}, "thresold"),
    ({"min_layer": 1}, "threshold"),
    ({"threshold": 0.9}, "min_layer"),
])
def test_config_errors(options, message):
    with pytest.raises(LLMOptConfigError, match=message):
        EarlyExitDecodeConfig.from_options(options)


def test_errors_that_need_the_model(model):
    with pytest.raises(LLMOptConfigError, match="min_layer.*4 decoder layers"):
        ee.generate(model, PROMPT, 2, {"threshold": 0.5, "min_layer": 4})
    with pytest.raises(LLMOptConfigError, match="Llama-family"):
        ee.generate(random_hf_model("gpt2"), PROMPT, 2, {"threshold": 0.5, "min_layer": 1})
    with pytest.raises(LLMOptConfigError, match="dict"):
        ee.generate(model, PROMPT, 2, 0.9)
    with pytest.raises(ValueError, match="max_tokens"):
        ee.generate(model, PROMPT, 0)
    with pytest.raises(LLMOptConfigError, match="target_agreement"):
        ee.calibrate_threshold(model, PROMPT, target_agreement=1.5, min_layer=1)


@pytest.mark.parametrize("criterion", ["max_prob", "margin"])
def test_parallel_score_is_the_token_loop_when_kv_is_exact(model, criterion):
    """kv_fill="full" (and no exits) keep every hidden state exact, so the one-forward
    scoring must give the token loop's exit layers, argmaxes and NLLs."""
    text = [(11 * i + 5) % 230 for i in range(30)]
    options = {"threshold": 0.02 if criterion == "margin" else 0.05, "min_layer": 1,
               "criterion": criterion, "kv_fill": "full"}
    fast = ee.score(model, text, options, context=5)
    slow = ee.score(model, text, options, context=5, sequential=True)
    assert fast.stats.layers_used == slow.stats.layers_used
    assert 1 < len(set(fast.stats.layers_used))  # some exit, some do not: the decision is exercised
    assert fast.argmax == slow.argmax
    assert fast.nll == pytest.approx(slow.nll, rel=1e-4, abs=1e-4)
    assert fast.stats.num_checks == slow.stats.num_checks


def test_score_thresholds_is_score_at_each_threshold(model):
    text = [(11 * i + 5) % 230 for i in range(30)]
    thresholds = [0.9, 0.05, 0.0]
    full, results = ee.score_thresholds(model, text, thresholds, min_layer=1, check_every=2, context=5)
    assert full.nll == pytest.approx(ee.score(model, text, None, context=5).nll, rel=1e-5, abs=1e-5)
    for threshold in thresholds:
        one = ee.score(model, text, {"threshold": threshold, "min_layer": 1, "check_every": 2,
                                     "kv_fill": "full"}, context=5, sequential=True)
        assert results[threshold].stats.layers_used == one.stats.layers_used
        assert results[threshold].argmax == one.argmax
        assert results[threshold].nll == pytest.approx(one.nll, rel=1e-4, abs=1e-4)
        assert results[threshold].stats.num_checks == one.stats.num_checks
