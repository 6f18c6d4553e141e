"""The distillation divergences: closed forms, chunking, gradients, bounded memory, options."""

import math

import pytest
import torch

from llmopt.errors import LLMOptConfigError
from llmopt.training.distill import DistillConfig, divergence_sum, token_divergence


def _closed_form(student, teacher, loss, temperature):
    """The divergences written out from probabilities in fp64, whole (no chunks)."""
    p_s = torch.softmax(student.double() / temperature, -1)
    p_t = torch.softmax(teacher.double() / temperature, -1)

    def kl(p, q):
        return (p * (p.log() - q.log())).sum(-1)

    if loss == "forward_kl":
        return kl(p_t, p_s)
    if loss == "reverse_kl":
        return kl(p_s, p_t)
    m = (p_t + p_s) / 2
    return 0.5 * kl(p_t, m) + 0.5 * kl(p_s, m)


def test_hand_computed_two_token_vocabulary():
    # teacher p = (1/2, 1/2), student p = (3/4, 1/4)
    teacher = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    student = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    forward = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    reverse = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    m = (0.625, 0.375)
    jsd = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + \
        0.5 * (0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1]))
    for loss, expected in (("forward_kl", forward), ("reverse_kl", reverse), ("jsd", jsd)):
        assert token_divergence(student, teacher, loss).item() == pytest.approx(expected, abs=1e-14)
    # identical distributions: every divergence is 0; JSD never exceeds log 2
    assert token_divergence(teacher, teacher, "jsd").item() == pytest.approx(0.0, abs=1e-15)
    far = torch.tensor([[60.0, -60.0]], dtype=torch.float64)
    assert 0 < token_divergence(far, -far, "jsd").item() <= math.log(2) + 1e-12


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_chunked_sum_equals_whole_fp64_closed_form(loss, chunk_size):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(3, 7, 11, dtype=torch.float64, generator=g) * 3
    teacher = torch.randn(3, 7, 11, dtype=torch.float64, generator=g) * 3
    mask = torch.rand(3, 7, generator=g) > 0.3
    temperature = 2.0
    expected = _closed_form(student, teacher, loss, temperature)[mask].sum()
    got = divergence_sum(student, teacher, mask, loss, temperature, chunk_size)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_chunked_gradient_equals_whole_gradient(loss):
    g = torch.Generator().manual_seed(1)
    student = (torch.randn(2, 9, 13, dtype=torch.float64, generator=g) * 2).requires_grad_()
    teacher = torch.randn(2, 9, 13, dtype=torch.float64, generator=g) * 2
    mask = torch.rand(2, 9, generator=g) > 0.25
    (expected,) = torch.autograd.grad(_closed_form(student, teacher, loss, 1.5)[mask].sum(), student)
    (got,) = torch.autograd.grad(divergence_sum(student, teacher, mask, loss, 1.5, chunk_size=4), student)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert got[~mask].abs().max() == 0  # masked positions get no gradient
    if loss == "forward_kl":
        # d KL(p_t || p_s) / d z_s = (p_s - p_t) / T
        closed = (torch.softmax(student / 1.5, -1) - torch.softmax(teacher / 1.5, -1)) / 1.5
        torch.testing.assert_close(got[mask], closed[mask].detach(), rtol=1e-10, atol=1e-12)


def _saved_bytes(fn, *inputs):
    """Bytes of the distinct storages saved for the backward, beyond the inputs' own."""
    inputs_storage = {t.untyped_storage().data_ptr() for t in inputs}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in inputs_storage:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(saved.values()), out


def test_chunks_keep_only_their_inputs_for_the_backward():
    """Unchunked, the loss saves several tokens x vocabulary fp32 tensors for its backward;
    chunked (checkpointed), it saves no intermediate at all beyond views of the inputs."""
    g = torch.Generator().manual_seed(2)
    student = torch.randn(4, 64, 500, generator=g).requires_grad_()
    teacher = torch.randn(4, 64, 500, generator=g)
    mask = torch.ones(4, 64, dtype=torch.bool)
    logits_bytes = student.numel() * 4
    whole, _ = _saved_bytes(lambda: _whole_jsd(student, teacher), student, teacher)
    chunked, out = _saved_bytes(lambda: divergence_sum(student, teacher, mask, "jsd", 1.0, chunk_size=32),
                                student, teacher)
    assert whole >= 3 * logits_bytes
    assert chunked < 0.01 * logits_bytes
    out.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()


def _whole_jsd(student, teacher):
    return token_divergence(student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1]), "jsd").sum()


def test_vocabulary_mismatch_is_refused():
    with pytest.raises(LLMOptConfigError, match="vocabulary"):
        divergence_sum(torch.zeros(1, 2, 5), torch.zeros(1, 2, 6), torch.ones(1, 2, dtype=torch.bool))


def test_options_are_validated():
    with pytest.raises(LLMOptConfigError, match="'forward_kl', 'reverse_kl', 'jsd'"):
        DistillConfig(loss="kl")
    for bad in ({"temperature": 0}, {"temperature": True}, {"ce_weight": 1.5}, {"chunk_size": 0},
                {"chunk_size": 2.0}):
        with pytest.raises(LLMOptConfigError):
            DistillConfig(**bad)
    with pytest.raises(LLMOptConfigError, match="unknown distill option 'temp'"):
        DistillConfig.from_options({"temp": 2.0})
    assert DistillConfig.from_options({"loss": "jsd", "temperature": 2}).temperature == 2.0
