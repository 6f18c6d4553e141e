"""The one calibration collector (llmopt/calibration.py), shared by pruning and quantization."""

import torch
from torch import nn

from llmopt.calibration import collect_statistics, token_batches
from llmopt.pruning import collect_activation_norms
from llmopt.quantization import collect_statistics as quantization_collect_statistics


class Tiny(nn.Module):
    """Embedding, two projections fed the same tensor, a nonlinearity, an output layer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.a = nn.Linear(8, 6)
        self.b = nn.Linear(8, 6)
        self.out = nn.Linear(6, 50)

    def forward(self, ids):
        x = self.embed(ids)
        return self.out(torch.relu(self.a(x)) * self.b(x))


def _inputs_by_hand(model, batches):
    """Every linear layer's inputs, stacked as (tokens, K), from a plain re-implementation of forward."""
    seen = {"a": [], "b": [], "out": []}
    with torch.no_grad():
        for ids in batches:
            x = model.embed(ids).reshape(-1, 8)
            seen["a"].append(x)
            seen["b"].append(x)
            seen["out"].append(torch.relu(model.a(x)) * model.b(x))
    return {name: torch.cat(rows) for name, rows in seen.items()}


def test_statistics_match_the_inputs_computed_by_hand():
    torch.manual_seed(0)
    model = Tiny()
    ids = torch.randint(0, 50, (23,))
    batches = token_batches(ids, context_length=8)
    assert [b.shape for b in batches] == [(1, 8), (1, 8), (1, 7)]
    stats = collect_statistics(model, batches, hessians=True, absmax=True, squares=True)
    want = _inputs_by_hand(model, batches)
    assert stats.tokens == 23
    for name, x in want.items():
        x = x.double()
        torch.testing.assert_close(stats.squares[name].double(), (x * x).sum(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(stats.absmax[name].double(), x.abs().amax(0), rtol=0, atol=0)
        torch.testing.assert_close(stats.hessian(name).double(), x.T @ x, rtol=1e-5, atol=1e-5)
        # the diagonal of the Hessian is the sum of squares
        torch.testing.assert_close(stats.hessian(name).diagonal(), stats.squares[name], rtol=1e-5, atol=1e-6)
    # a and b are fed the very same tensor: one Hessian, owned by the first
    assert stats.hessian_owner["b"] == "a" and set(stats.hessians) == {"a", "out"}


def test_pruning_and_quantization_read_the_same_collector():
    torch.manual_seed(1)
    model = Tiny()
    ids = torch.randint(0, 50, (20,))
    norms = collect_activation_norms(model, ids, context_length=6, max_tokens=None)
    want = _inputs_by_hand(model, token_batches(ids, 6))
    assert set(norms) == {"a", "b", "out"}
    for name, x in want.items():
        torch.testing.assert_close(norms[name].double(), x.double().pow(2).sum(0).sqrt(), rtol=1e-6, atol=1e-6)
    assert quantization_collect_statistics is collect_statistics
    stats = quantization_collect_statistics(model, token_batches(ids, 6), hessians=False, absmax=False, squares=True)
    for name in norms:
        torch.testing.assert_close(norms[name], stats.squares[name].sqrt(), rtol=0, atol=0)
    # max_tokens cuts the text before windowing, as before
    short = collect_activation_norms(model, ids, context_length=6, max_tokens=9)
    x = _inputs_by_hand(model, token_batches(ids[:9], 6))["a"].double()
    torch.testing.assert_close(short["a"].double(), x.pow(2).sum(0).sqrt(), rtol=1e-6, atol=1e-6)
