"""LayerSkip pieces: dropout curve, skipped layers, early-exit loss, the per-layer exit probe."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from llmopt.errors import LLMOptConfigError
from llmopt.models import random_llama
from llmopt.training.early_exit import (
    EarlyExitConfig,
    add_layer_dropout,
    early_exit_loss_sum,
    exit_agreement,
    exit_weights,
    layer_dropout_probabilities,
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
