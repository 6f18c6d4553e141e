"""Sampler: greedy is argmax, top-k/top-p keep the right tokens, the draws follow
the right distribution, and seeded rows do not depend on the rest of the batch.

Distribution checks draw DRAWS tokens (one batch of identical rows) and run
Pearson's chi-square test against the reference probabilities. With an even
number of degrees of freedom the chi-square tail has a closed form, so the
threshold is exact: a correct sampler fails with probability ALPHA = 1e-6
whatever the seed (the seeds are fixed, so the tests are deterministic). A
wrong distribution fails by far: e.g. ignoring the temperature (T = 2) gives a
statistic in the thousands at DRAWS = 20000, against a threshold near 35.
"""

import math

import pytest
import torch

from llmopt.runtime.sampler import new_generator, sample
from llmopt.runtime.sampling_params import SamplingParams

DRAWS = 20_000
ALPHA = 1e-6
GREEDY = SamplingParams(temperature=0.0)


def chi_square_tail(statistic: float, df: int) -> float:
    """P(X >= statistic) for X ~ chi-square(df), df even: exp(-x/2) * sum_{i<df/2} (x/2)^i / i!."""
    assert df % 2 == 0
    half = statistic / 2
    return math.exp(-half) * sum(half**i / math.factorial(i) for i in range(df // 2))


def draw_many(logits_row: torch.Tensor, params: SamplingParams, n: int = DRAWS, seed: int = 0) -> torch.Tensor:
    """Token ids of n draws from one row (a batch of n copies, global RNG, seeded)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tokens = sample(logits_row.expand(n, -1), [params] * n, [None] * n)
    return torch.tensor(tokens)


def assert_follows(tokens: torch.Tensor, probs: torch.Tensor) -> None:
    """Chi-square test of the drawn tokens against ``probs``, over the tokens with p > 0.

    Tokens with p == 0 must never be drawn. Padded to an even number of
    degrees of freedom by dropping one category's term at most (which only
    makes the test less strict, never stricter).
    """
    probs = probs.double() / probs.sum()
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    support = probs > 0
    assert counts[~support].sum() == 0, f"drew tokens outside the support: {counts[~support].nonzero().flatten()}"
    expected = probs[support] * tokens.numel()
    assert expected.min() >= 50, "too few draws per category for the chi-square approximation"
    terms = (counts[support] - expected) ** 2 / expected
    df = support.sum().item() - 1
    if df % 2:
        terms, df = terms.sort().values[1:], df - 1  # drop the smallest term
    statistic = terms.sum().item()
    assert chi_square_tail(statistic, df) > ALPHA, (statistic, df, counts[support], expected)


def test_greedy_is_argmax_first_index_on_ties():
    torch.manual_seed(0)
    logits = torch.randn(6, 500)
    logits[2, [10, 20, 30]] = 100.0  # a three-way tie: argmax takes the first
    assert sample(logits, [GREEDY] * 6, [None] * 6) == logits.argmax(-1).tolist()
    assert sample(logits, [GREEDY] * 6, [None] * 6)[2] == 10


def test_greedy_first_index_on_ties_at_vocab_width():
    # A real vocabulary's width takes the vectorised reduction: ties inside one
    # SIMD lane group, across groups and at both ends must still give the first.
    torch.manual_seed(0)
    logits = torch.randint(0, 4, (16, 49152)).float()
    logits[0, [7, 8, 40000]] = 9.0
    logits[1, [49151, 3]] = 9.0
    assert sample(logits, [GREEDY] * 16, [None] * 16) == logits.argmax(-1).tolist()
    assert sample(logits, [GREEDY] * 16, [None] * 16)[:2] == [7, 3]


def test_greedy_bf16_equals_argmax_of_fp32():
    torch.manual_seed(1)
    logits = torch.randn(8, 1000).to(torch.bfloat16)
    assert sample(logits, [GREEDY] * 8, [None] * 8) == logits.float().argmax(-1).tolist()


def test_greedy_batch_is_one_argmax_without_a_sort(monkeypatch):
    def no_sort(*args, **kwargs):
        raise AssertionError("a greedy batch must not sort")

    monkeypatch.setattr(torch.Tensor, "sort", no_sort)
    monkeypatch.setattr(torch, "sort", no_sort)
    logits = torch.randn(4, 100)
    assert sample(logits, [GREEDY] * 4, [None] * 4) == logits.argmax(-1).tolist()


def test_top_k_1_is_greedy():
    torch.manual_seed(2)
    logits = torch.randn(64, 300)
    params = [SamplingParams(temperature=t, top_k=1) for t in (0.3, 1.0, 5.0, 100.0)] * 16
    assert sample(logits, params, [None] * 64) == logits.argmax(-1).tolist()


def test_mixed_batch_greedy_rows_stay_argmax():
    torch.manual_seed(3)
    logits = torch.randn(10, 200)
    params = [GREEDY if i % 2 else SamplingParams(temperature=1.0, top_p=0.9) for i in range(10)]
    tokens = sample(logits, params, [None] * 10)
    assert tokens[1::2] == logits[1::2].argmax(-1).tolist()
    assert all(0 <= t < 200 for t in tokens)


def test_top_k_keeps_only_the_k_largest():
    torch.manual_seed(4)
    logits = torch.randn(1, 50)
    k = 5
    tokens = draw_many(logits, SamplingParams(top_k=k))
    allowed = set(logits[0].topk(k).indices.tolist())
    assert set(tokens.tolist()) == allowed  # never outside, and every one of them drawn
    probs = torch.zeros(50)
    probs[list(allowed)] = logits[0, list(allowed)].softmax(-1)
    assert_follows(tokens, probs)


def hand_made(probs: list[float], positions: list[int], vocab: int = 8) -> torch.Tensor:
    """Logits (1, vocab) with token positions[i] at probability probs[i], the rest impossible."""
    logits = torch.full((1, vocab), float("-inf"))
    logits[0, positions] = torch.tensor(probs).log()
    return logits


def test_top_p_keeps_exactly_the_nucleus():
    # Cumulative 0.40, 0.70, 0.85, ...: the smallest set reaching 0.8 is the top three.
    probs, positions = [0.40, 0.30, 0.15, 0.10, 0.05], [6, 1, 4, 0, 3]
    tokens = draw_many(hand_made(probs, positions), SamplingParams(top_p=0.8))
    assert set(tokens.tolist()) == {6, 1, 4}
    reference = torch.zeros(8)
    reference[[6, 1, 4]] = torch.tensor([0.40, 0.30, 0.15]) / 0.85
    assert_follows(tokens, reference)


def test_top_p_tiny_keeps_the_top_token():
    logits = hand_made([0.40, 0.30, 0.30], [5, 2, 7])
    assert set(draw_many(logits, SamplingParams(top_p=1e-6), n=500).tolist()) == {5}


def test_top_p_is_applied_after_top_k():
    # Full distribution: cumulative 0.40, 0.70, 0.85, so top_p = 0.72 keeps three.
    # After top-3 the probabilities are renormalised to 0.47, 0.35, 0.18
    # (cumulative 0.47, 0.82): the same top_p keeps two.
    logits = hand_made([0.40, 0.30, 0.15, 0.10, 0.05], [0, 1, 2, 3, 4])
    assert set(draw_many(logits, SamplingParams(top_p=0.72), n=2000).tolist()) == {0, 1, 2}
    assert set(draw_many(logits, SamplingParams(top_k=3, top_p=0.72), n=2000).tolist()) == {0, 1}


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_scales_the_distribution(temperature):
    logits = torch.tensor([[0.50, 0.25, 0.15, 0.07, 0.03]]).log()
    tokens = draw_many(logits, SamplingParams(temperature=temperature), seed=5)
    assert_follows(tokens, (logits[0] / temperature).softmax(-1))


def test_wrong_temperature_is_detected():
    """The chi-square check has teeth: T = 2 draws fail against the T = 1 distribution."""
    logits = torch.tensor([[0.50, 0.25, 0.15, 0.07, 0.03]]).log()
    tokens = draw_many(logits, SamplingParams(temperature=2.0), seed=5)
    with pytest.raises(AssertionError):
        assert_follows(tokens, logits[0].softmax(-1))


def test_new_generator():
    assert new_generator(SamplingParams(), "cpu") is None
    a, b = new_generator(SamplingParams(seed=7), "cpu"), new_generator(SamplingParams(seed=7), "cpu")
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))


def run_steps(seeded_row_of_batch, batch_builder, steps=30):
    """Tokens of the seeded request over several steps, the batch around it made by batch_builder."""
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=1234)
    generator = new_generator(params, "cpu")
    tokens = []
    for step in range(steps):
        row = torch.randn(1, 100, generator=torch.Generator().manual_seed(step))  # same for every run
        others, other_params, other_generators = batch_builder(step)
        i = seeded_row_of_batch
        logits = torch.cat([others[:i], row, others[i:]])
        batch_params = other_params[:i] + [params] + other_params[i:]
        batch_generators = other_generators[:i] + [generator] + other_generators[i:]
        tokens.append(sample(logits, batch_params, batch_generators)[i])
    return tokens


def test_seeded_request_is_reproducible_and_batch_independent():
    alone = run_steps(0, lambda step: (torch.empty(0, 100), [], []))
    assert alone == run_steps(0, lambda step: (torch.empty(0, 100), [], []))
    assert len(set(alone)) > 3  # it really samples

    def crowded(step):
        others = [GREEDY, SamplingParams(), SamplingParams(top_p=0.5, seed=99), SamplingParams(top_k=3)]
        generators = [None, None, new_generator(others[2], "cpu"), None]
        return torch.randn(4, 100) * (step + 1), others, generators

    torch.manual_seed(6)
    assert run_steps(2, crowded) == alone
    assert run_steps(4, crowded) == alone


def test_row_with_a_single_finite_logit():
    logits = torch.full((1, 64), float("-inf"))
    logits[0, 17] = -3.0
    for params in (GREEDY, SamplingParams(), SamplingParams(temperature=0.1, top_k=5),
                   SamplingParams(temperature=3.0, top_p=0.5), SamplingParams(seed=3)):
        tokens = draw_many(logits, params, n=200)
        assert set(tokens.tolist()) == {17}, params
    seeded = SamplingParams(temperature=2.0, seed=3)
    assert sample(logits, [seeded], [new_generator(seeded, "cpu")]) == [17]


def test_shape_and_length_errors():
    with pytest.raises(ValueError, match="2-D"):
        sample(torch.zeros(5), [GREEDY], [None])
    with pytest.raises(ValueError, match="one SamplingParams and one generator per row"):
        sample(torch.zeros(2, 5), [GREEDY], [None])
    with pytest.raises(ValueError, match="one SamplingParams and one generator per row"):
        sample(torch.zeros(2, 5), [GREEDY, GREEDY], [None])
