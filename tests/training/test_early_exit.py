"""LayerSkip pieces: dropout curve, skipped layers, early-exit loss, the per-layer exit probe."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from llmopt.errors import LLMOptConfigError
from llmopt.models import random_llama
from llmopt.training import TrainConfig, Trainer
from llmopt.training.early_exit import (
    _LayerDropout,
    EarlyExitConfig,
    EarlyExitTrainer,
    add_layer_dropout,
    early_exit_loss_sum,
    exit_agreement,
    exit_weights,
    layer_dropout_probabilities,
    train_early_exit,
)


def test_dropout_curves_closed_form():
    assert layer_dropout_probabilities(5, 0.2, "linear") == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    expo = layer_dropout_probabilities(5, 0.2, "exponential")
    assert expo == pytest.approx([0.2 * (math.exp(l * math.log(2) / 4) - 1) for l in range(5)])
    assert expo[0] == 0 and expo[-1] == pytest.approx(0.2)
    assert all(e <= lin + 1e-15 for e, lin in zip(expo, layer_dropout_probabilities(5, 0.2, "linear")))
    assert exit_weights([0, 1, 3], "linear") == pytest.approx([1 / 7, 2 / 7, 4 / 7])
    assert exit_weights([0, 1, 3], "uniform") == pytest.approx([1 / 3] * 3)


def _without_layers(model, skipped):
    pruned = copy.deepcopy(model)
    kept = [layer for i, layer in enumerate(pruned.model.layers) if i not in skipped]
    pruned.model.layers = torch.nn.ModuleList(kept)
    pruned.config.num_hidden_layers = len(kept)
    return pruned


def test_layer_dropout_skips_whole_layers_per_sequence():
    model = random_llama(num_layers=3)
    reference = copy.deepcopy(model)
    handles = add_layer_dropout(model, 0.9, "linear")  # p = 0, 0.45, 0.9
    assert len(handles) == 2
    ids = torch.randint(0, 256, (6, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)  # no dropout in eval
        model.train()
        torch.manual_seed(3)
        got = model(ids).logits
    torch.manual_seed(3)  # the hooks draw one uniform per sequence, layer 1 then layer 2
    draws = [torch.rand(6, 1, 1), torch.rand(6, 1, 1)]
    by_skips = {}
    for b in range(6):
        skipped = frozenset(layer for layer, r, p in zip((1, 2), draws, (0.45, 0.9)) if r[b].item() < p)
        by_skips.setdefault(skipped, []).append(b)
    assert len(by_skips) > 1  # some sequences skip, others do not
    for skipped, rows in by_skips.items():
        with torch.no_grad():
            expected = _without_layers(reference, skipped)(ids[rows]).logits
        torch.testing.assert_close(got[rows], expected, rtol=1e-5, atol=1e-5)
    for h in handles:
        h.remove()


def test_early_exit_loss_equals_the_per_layer_cross_entropies():
    model = random_llama(num_layers=4)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[1, 6:] = -100
    config = EarlyExitConfig(layer_dropout=0.0, exit_scale=0.5, exit_layers=(0, 2))
    out = model(ids, output_hidden_states=True)
    got = early_exit_loss_sum(model, out.hidden_states, labels, config)

    captured = []
    hooks = [layer.register_forward_hook(lambda m, a, o: captured.append(o[0] if isinstance(o, tuple) else o))
             for layer in model.model.layers]
    model(ids)
    for h in hooks:
        h.remove()
    expected = 0.0
    for layer, weight in ((0, 1 / 4), (2, 3 / 4)):
        logits = model.lm_head(model.model.norm(captured[layer]))
        expected = expected + weight * F.cross_entropy(logits[:, :-1].reshape(-1, 256), labels[:, 1:].reshape(-1),
                                                       ignore_index=-100, reduction="sum")
    expected = 0.5 * expected
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the checkpointed exits give the same gradients as the plain computation
    (g_got,) = torch.autograd.grad(got, model.lm_head.weight, retain_graph=True)
    (g_exp,) = torch.autograd.grad(expected, model.lm_head.weight)
    torch.testing.assert_close(g_got, g_exp, rtol=1e-4, atol=1e-6)


def test_exit_agreement_matches_a_hand_count_and_an_identity_last_layer():
    model = random_llama(num_layers=3)
    with torch.no_grad():  # the last layer adds nothing: its input already gives the final tokens
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    ids = torch.randint(0, 256, (3, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    agreement = exit_agreement(model, ids, mask, batch_size=2)
    assert agreement[1] == 1.0 and agreement[2] == 1.0

    captured = []
    hook = model.model.layers[0].register_forward_hook(lambda m, a, o: captured.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        final = model(ids, attention_mask=mask).logits.argmax(-1)
        guess = model.lm_head(model.model.norm(captured[0])).argmax(-1)
    hook.remove()
    valid = mask.bool()
    assert agreement[0] == pytest.approx(((guess == final) & valid).sum().item() / valid.sum().item())
    assert agreement[0] < 1.0


def test_options_are_validated():
    with pytest.raises(LLMOptConfigError, match="'exponential', 'linear'"):
        EarlyExitConfig(curve="cubic")
    for bad in ({"layer_dropout": 1.0}, {"exit_scale": -1}, {"exit_layers": (0, -1)}, {"exit_weights": "x"}):
        with pytest.raises(LLMOptConfigError):
            EarlyExitConfig(**bad)
    with pytest.raises(LLMOptConfigError, match="out of range"):
        EarlyExitConfig(exit_layers=(3,)).layers(4)
    with pytest.raises(LLMOptConfigError, match="unknown early_exit option"):
        EarlyExitConfig.from_options({"dropout": 0.1})


def _pattern_data(count=16, length=16, seed=0):
    """Sequences with an easy rule (each token is the previous + 1 mod 256): quick to learn."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, 256, (count,), generator=g)
    return [(start + torch.arange(length)) % 256 for start in starts]


def _train_config(**overrides):
    return TrainConfig(**{"max_steps": 12, "micro_batch_size": 8, "lr": 1e-2, "compile": False, "seed": 0,
                          "shuffle": False, **overrides})


def _exit_ce(model, ids, layer):
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[layer + 1]
        logits = model.lm_head(model.model.norm(hidden))[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


def test_early_exit_training_makes_the_first_layer_predict_the_final_tokens():
    """Against plain training from the same weights for the same steps: the first layer's
    exit predicts the text better and agrees more often with the final layer."""
    probe = torch.stack(_pattern_data(8, seed=1))
    plain = random_llama(num_layers=3, seed=4)
    early = copy.deepcopy(plain)
    Trainer(plain, _train_config(), _pattern_data()).train()
    result = train_early_exit(early, _pattern_data(), EarlyExitConfig(layer_dropout=0.2, exit_layers=(0,)),
                              train_config=_train_config())
    assert len(result.steps) == 12
    assert not any(isinstance(hook, _LayerDropout) for layer in early.model.layers
                   for hook in layer._forward_hooks.values())  # the dropout hooks are removed
    assert exit_agreement(early, probe)[0] > exit_agreement(plain, probe)[0] + 0.15
    assert _exit_ce(early, probe, 0) < _exit_ce(plain, probe, 0) - 0.25


@pytest.mark.slow
def test_compiled_early_exit_training_equals_eager():
    """Through torch.compile(backend="llmopt") the exit loss reaches the step: the second
    step's loss (after one update) equals eager's, and differs from a run without exits."""
    config = EarlyExitConfig(layer_dropout=0.0, exit_scale=0.5)
    losses = {}
    for name, compiled, exits in (("eager", False, config), ("compiled", True, config),
                                  ("no exits", False, EarlyExitConfig(layer_dropout=0.0, exit_scale=0.0))):
        model = random_llama(num_layers=3, seed=5)
        options = {"compile": compiled, "compile_options": {"lower": "eager"}} if compiled else {}
        losses[name] = train_early_exit(model, _pattern_data(), exits,
                                        train_config=_train_config(max_steps=2, **options)).losses
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)
    assert abs(losses["no exits"][1] - losses["eager"][1]) > 100 * abs(losses["compiled"][1] - losses["eager"][1])


def test_layer_dropout_counts_as_random_ops_for_the_recompute_budget():
    model = random_llama(num_layers=3)
    with pytest.raises(LLMOptConfigError, match="190758"):
        EarlyExitTrainer(model, _train_config(recompute=0.5, compile=True), _pattern_data(),
                         early_exit=EarlyExitConfig(layer_dropout=0.1))
