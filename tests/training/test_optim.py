"""Lion against the update rule of Chen et al. 2023, in fp64, both code paths."""

import pytest
import torch

from llmopt.training import Lion


def _reference(params, grads_per_step, lr, betas, wd):
    b1, b2 = betas
    params = [p.clone() for p in params]
    moms = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            c = b1 * moms[i] + (1 - b1) * g
            params[i] = params[i] - lr * (torch.sign(c) + wd * params[i])
            moms[i] = b2 * moms[i] + (1 - b2) * g
    return params, moms


@pytest.mark.parametrize("foreach", [False, True])
def test_lion_follows_the_update_rule_in_fp64(foreach):
    generator = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (7,), (2, 2, 2)]
    start = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    steps = [[torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes] for _ in range(5)]
    params = [torch.nn.Parameter(p.clone()) for p in start]
    optimizer = Lion(params, lr=0.01, betas=(0.9, 0.99), weight_decay=0.1, foreach=foreach)
    for grads in steps:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
    expected, moms = _reference(start, steps, 0.01, (0.9, 0.99), 0.1)
    for p, e, m in zip(params, expected, moms):
        torch.testing.assert_close(p.detach(), e, atol=1e-12, rtol=0)
        torch.testing.assert_close(optimizer.state[p]["exp_avg"], m, atol=1e-12, rtol=0)


def test_lion_state_round_trips_and_skips_params_without_grad():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    optimizer = Lion([a, b], lr=0.1)
    a.grad = torch.tensor([1.0, -2.0, 0.0])
    optimizer.step()
    assert torch.equal(b.detach(), torch.ones(2)) and b not in optimizer.state
    torch.testing.assert_close(a.detach(), torch.tensor([0.9, 1.1, 1.0]))
    clone = Lion([torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))], lr=0.1)
    clone.load_state_dict(optimizer.state_dict())
    assert torch.equal(next(iter(clone.state.values()))["exp_avg"], optimizer.state[a]["exp_avg"])
