"""Speculative decoding in the engine: lossless against the engine without it.

Greedy: every method must give exactly the tokens of the same engine with
speculation off (which test_engine.py checks against Hugging Face
``generate``), through batching, chunked prefill, preemption, prefix-cache
hits, stop tokens / strings, max_tokens, streaming and abort, handing every
KV block back. Sampled: the emitted tokens must follow the target's own
distribution, computed exactly from the model (test_sampled_distribution).
"""

import math

import pytest
import torch

from llmopt.errors import LLMOptConfigError
from llmopt.models import random_llama
from llmopt.runtime.llm import LLM
from llmopt.runtime.sampling_params import SamplingParams
from llmopt.runtime.speculative.proposers import ngram_lookup
from llmopt.runtime.speculative.rejection import verify_greedy, verify_sampled

K = 3


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2.tokenizer


@pytest.fixture(scope="module")
def target():
    return random_llama(heads="gqa", num_layers=2)


def _spec(method, k=K, **extra):
    if method == "draft_model":
        extra.setdefault("model", random_llama(heads="gqa", num_layers=1, seed=1))
    if method == "layer_skip":
        extra.setdefault("num_layers", 1)
    return dict(method=method, num_speculative_tokens=k, adaptive=False,
                disable_by_batch_size=None, **extra)


def _prompts(n, seed=0):
    """Repetitive prompts (a random model's greedy output repeats too): n-gram lookup finds drafts."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for length in torch.randint(2, 14, (n,), generator=g).tolist():
        piece = torch.randint(3, 60, (length,), generator=g).tolist()
        out.append(piece * 3)
    return out


METHODS = ["ngram", "draft_model", "layer_skip"]


@pytest.mark.parametrize("method", METHODS)
def test_greedy_is_token_identical_with_preemption_and_chunked_prefill(tokenizer, target, method):
    prompts = _prompts(8)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    options = dict(lower="eager", block_size=16, num_kv_blocks=14, max_num_batched_tokens=32)
    plain = LLM(target, tokenizer, **options).generate(prompts, params)
    llm = LLM(target, tokenizer, speculative_config=_spec(method), **options)
    spec = llm.generate(prompts, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert sum(o.metrics.num_preemptions for o in spec) > 0  # the tiny pool preempts
    stats = llm.engine.speculator.stats
    assert stats.num_drafted > 0 and stats.num_verify_steps > 0
    if method == "ngram":
        assert stats.num_accepted > 0
        assert sum(o.metrics.num_accepted_tokens for o in spec) == stats.num_accepted
    assert llm.engine.num_free_blocks == 14  # nothing leaked
    llm.engine.scheduler.block_manager.check_invariants()


def test_prefix_cache_and_stop_conditions_are_identical(tokenizer, target):
    options = dict(lower="eager", block_size=16, num_kv_blocks=64)
    plain = LLM(target, tokenizer, **options)
    llm = LLM(target, tokenizer, speculative_config=_spec("ngram", k=5), **options)
    shared = list(range(3, 43)) * 2
    prompts = [shared + tail for tail in ([60, 61], [70], [80, 81, 82])]
    free = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    reference = plain.generate(prompts, free)
    llm.generate([shared + [50]], free)
    outputs = llm.generate(prompts, free)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in reference]
    assert all(o.metrics.num_prefix_hit_tokens > 0 for o in outputs)
    # Stops inside an accepted run of drafts cut there, token by token.
    for ref in reference:
        tokens = ref.token_ids
        stop_token = tokens[len(tokens) // 2]
        stop_string = plain.tokenizer.decode(tokens[5:7])
        for params in (SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                      stop_token_ids=[stop_token]),
                       SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop_string]),
                       SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, logprobs=2)):
            want = plain.generate([ref.prompt_token_ids], params)[0]
            got = llm.generate([ref.prompt_token_ids], params)[0]
            assert (got.token_ids, got.text, got.finish_reason, got.outputs[0].stop_reason) == \
                (want.token_ids, want.text, want.finish_reason, want.outputs[0].stop_reason)
            if params.logprobs:
                assert [t for t, _, _ in got.outputs[0].logprobs] == got.token_ids
                for (_, a, _), (_, b, _) in zip(got.outputs[0].logprobs, want.outputs[0].logprobs):
                    assert a == pytest.approx(b, abs=1e-4)
    assert llm.engine.speculator.stats.num_accepted > 0
    llm.engine.scheduler.block_manager.check_invariants()


def test_stream_and_abort_with_speculation(tokenizer, target):
    llm = LLM(target, tokenizer, lower="eager", num_kv_blocks=32,
              speculative_config=_spec("ngram", k=4))
    prompt = _prompts(1, seed=3)[0]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    seen = [o.token_ids for o in llm.stream([prompt], params)]
    assert seen[-1] == llm.generate([prompt], params)[0].token_ids
    assert all(a == b[:len(a)] for a, b in zip(seen, seen[1:]))  # each output extends the last
    assert len(seen) < 20  # some steps emitted several tokens
    stream = llm.stream([prompt, prompt[:5]], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    next(stream)
    next(stream)
    stream.close()
    assert not llm.engine.has_unfinished() and llm.engine.num_free_blocks == 32
    llm.engine.scheduler.block_manager.check_invariants()
    # The engine's totals reach the server's /metrics.
    from types import SimpleNamespace

    from llmopt.runtime.engine_loop import LoopStats
    from llmopt.runtime.server_metrics import ServerMetrics

    stats = llm.engine.speculator.stats
    text = ServerMetrics(SimpleNamespace(engine=llm.engine, stats=LoopStats()), "m").render().decode()
    assert f'llmopt_spec_decode_num_draft_tokens{{model_name="m"}} {float(stats.num_drafted)}' in text
    assert f'llmopt_spec_decode_num_accepted_tokens{{model_name="m"}} {float(stats.num_accepted)}' in text
    assert 0 < stats.num_accepted <= stats.num_drafted


def test_speculation_metrics_per_request_and_per_engine(tokenizer, target):
    """Each request's counts add up to the engine's; rates follow from the counts; /metrics shows them."""
    from types import SimpleNamespace

    from llmopt.runtime.engine_loop import LoopStats
    from llmopt.runtime.server_metrics import ServerMetrics

    llm = LLM(target, tokenizer, lower="eager", num_kv_blocks=64, speculative_config=_spec("ngram", k=4))
    max_tokens = 24
    outs = llm.generate(_prompts(4, seed=5), SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    stats = llm.engine.speculator.stats
    metrics = [o.metrics for o in outs]
    assert sum(m.num_drafted_tokens for m in metrics) == stats.num_drafted > 0
    assert sum(m.num_accepted_tokens for m in metrics) == stats.num_accepted > 0
    assert sum(m.num_spec_steps for m in metrics) == stats.num_verify_steps
    for o, m in zip(outs, metrics):
        assert 0 <= m.num_accepted_tokens <= m.num_drafted_tokens
        if m.num_drafted_tokens:
            assert m.acceptance_rate == m.num_accepted_tokens / m.num_drafted_tokens
            assert m.mean_accepted_length == 1 + m.num_accepted_tokens / m.num_spec_steps
        # One token from prefill, then per step: one, or (verifying) the kept drafts and one.
        plain_steps = len(o.token_ids) - 1 - m.num_spec_steps - m.num_accepted_tokens
        assert plain_steps >= 0 and len(o.token_ids) == max_tokens
    # Without stops every verification emits its kept drafts and one token of the target.
    assert stats.num_emitted == stats.num_verify_steps + stats.num_accepted
    text = ServerMetrics(SimpleNamespace(engine=llm.engine, stats=LoopStats()), "m").render().decode()
    for name, value in (("num_draft_tokens", stats.num_drafted), ("num_accepted_tokens", stats.num_accepted),
                        ("acceptance_rate", stats.num_accepted / stats.num_drafted),
                        ("mean_accepted_length", 1 + stats.num_accepted / stats.num_verify_steps)):
        line = next(x for x in text.splitlines() if x.startswith(f"llmopt_spec_decode_{name}{{"))
        assert float(line.split()[-1]) == pytest.approx(value), line


def test_draft_model_options_quantize_the_drafts_head_too(tokenizer, target):
    """``model_options={"quantize": ...}`` act on the draft as ``compile_options`` do on a served
    model, ``lm_head`` included (the runner compiles its head with them; test_engine.py checks
    that head against the fully quantized reference): the draft's logits are those of the draft
    served alone with those options, so no whole-model wrapper is needed for a quantized head."""
    draft = random_llama(heads="gqa", num_layers=1, seed=1)
    options = {"quantize": "int8"}
    llm = LLM(target, tokenizer, lower="eager", num_kv_blocks=16,
              speculative_config=_spec("draft_model", model=draft, model_options=options))
    served = LLM(draft, tokenizer, lower="eager", num_kv_blocks=16, compile_options=options)
    prompt = _prompts(1)[0]
    bs = served.engine.runner.options.block_size
    item = [(prompt, 0, list(range(-(-len(prompt) // bs))))]
    logits = llm.engine.speculator.proposer.runner.execute_packed(item, bs)[0]
    want = served.engine.runner.execute_packed(item, bs)[0]
    with torch.no_grad():
        float_model = draft(torch.tensor([prompt])).logits[0, -1]
    assert (logits - want).abs().max().item() < 1e-6
    assert (float_model - want).abs().max().item() > 1e-3  # the check above can tell


def test_bad_speculative_configs_are_clear_errors(tokenizer, target):
    for config, match in (
            (dict(method="ngram", num_speculative_tokens=0), "num_speculative_tokens must be an int >= 1"),
            (dict(method="medusa"), "valid choices are 'ngram', 'draft_model', 'layer_skip'"),
            (dict(method="ngram", k=2), "unknown speculative_config option 'k'"),
            (dict(method="draft_model"), "needs model"),
            (dict(method="layer_skip"), "needs num_layers")):
        with pytest.raises(LLMOptConfigError, match=match):
            LLM(target, tokenizer, lower="eager", num_kv_blocks=8, speculative_config=config)
    with pytest.raises(LLMOptConfigError, match="out of range: the target has 2 decoder layers"):
        LLM(target, tokenizer, lower="eager", num_kv_blocks=8,
            speculative_config=dict(method="layer_skip", num_layers=2))
    other_vocab = random_llama(heads="gqa", num_layers=1, vocab_size=300)
    with pytest.raises(LLMOptConfigError, match="vocabulary has 300 tokens but the target's has 256"):
        LLM(target, tokenizer, lower="eager", num_kv_blocks=8,
            speculative_config=dict(method="draft_model", model=other_vocab))


def test_ngram_lookup_takes_the_latest_match_of_the_longest_suffix():
    assert ngram_lookup([1, 2, 3, 4, 1, 2], 3, 1, 3) == [3, 4, 1]
    assert ngram_lookup([5, 1, 2, 3, 9, 1, 2, 3], 2, 1, 3) == [9, 1]
    assert ngram_lookup([2, 9, 1, 2, 8, 1, 2], 1, 1, 2) == [8]  # latest of two matches
    assert ngram_lookup([1, 2, 3], 2, 1, 3) == []
    assert ngram_lookup([7, 7, 7, 7], 3, 1, 3) == [7]
    assert ngram_lookup([256, 1, 256, 2, 256], 2, 1, 2) == [2, 256]  # ids past one byte
    assert ngram_lookup([4, 5, 6, 4, 5], 2, 3, 3) == []  # only 2 tokens match: below min


def test_verification_rules_closed_form():
    assert verify_greedy([4, 5, 9, 7], [4, 5, 6]) == [4, 5, 9]
    assert verify_greedy([4, 5, 6, 7], [4, 5, 6]) == [4, 5, 6, 7]
    # p puts no mass on the draft: always rejected, replaced from p without it.
    p = torch.tensor([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])
    for seed in range(20):
        out = verify_sampled(p, [0], None, torch.Generator().manual_seed(seed))
        assert len(out) == 1 and out[0] in (1, 2)
    # p == q: always accepted, then the bonus from the next row.
    q = torch.tensor([[0.0, 0.5, 0.5]])
    assert verify_sampled(p, [1], q, torch.Generator().manual_seed(0)) == [1, 0]


def test_adaptive_k_follows_acceptance_and_switches_off():
    from llmopt.runtime.speculative.adaptive import AdaptiveK

    adaptive = AdaptiveK(4, window=2, cooldown=3)
    assert adaptive.k("a") == 4
    adaptive.observe("a", 4, 1)  # a rejection: kept + 1
    assert adaptive.k("a") == 2
    adaptive.observe("a", 2, 2)  # all kept: one more
    assert adaptive.k("a") == 3
    adaptive.observe("a", 3, 0)
    adaptive.observe("a", 1, 0)  # two verifications in a row kept nothing: off
    assert [adaptive.k("a") for _ in range(4)] == [0, 0, 0, 1]
    assert AdaptiveK(4, enabled=False).k("b") == 4


# ---- the emitted distribution equals the target's -------------------------------

VOCAB, TEMPERATURE, NUM_SAMPLES, MAX_TOKENS = 8, 0.8, 20_000, 4
# 17 tokens: the first block (16) is computed once and then found in the prefix cache,
# so every later prefill computes one token.
PROMPT = [1, 2, 3] * 5 + [1, 2]
# Seeds are fixed, so the test is deterministic; the threshold is what a
# correct implementation would fail by chance (0.1% per statistic under the
# null), while the broken variants this guards against (bonus from q, no
# residual renormalisation, accepting every draft) move tens of thousands of
# samples and give p-values below 1e-30 at this sample size.
P_VALUE_THRESHOLD = 1e-3


def _small_vocab(seed, num_layers):
    # Its logits spread over a few units: p is neither uniform nor one-hot.
    return random_llama(heads="gqa", num_layers=num_layers, vocab_size=VOCAB, seed=seed)


def _exact_joint(model) -> torch.Tensor:
    """P(t1..t4 | PROMPT) at TEMPERATURE, shape (V,) * 4, by enumerating every prefix in fp64."""
    prefixes = torch.cartesian_prod(*[torch.arange(VOCAB)] * (MAX_TOKENS - 1))
    ids = torch.cat([torch.tensor(PROMPT).expand(len(prefixes), -1), prefixes], dim=1)
    with torch.no_grad():
        logits = model(ids).logits.double()[:, len(PROMPT) - 1:] / TEMPERATURE
    probs = logits.softmax(-1)  # (N, 4, V): row j predicts token j+1 given prefix[:j]
    joint = torch.ones((VOCAB,) * MAX_TOKENS, dtype=torch.float64)
    for j in range(MAX_TOKENS):
        # p(t_{j+1} | t_1..t_j): depends only on the first j prefix tokens.
        cond = probs[:, j].reshape((VOCAB,) * (MAX_TOKENS - 1) + (VOCAB,))
        index = [slice(None)] * j + [0] * (MAX_TOKENS - 1 - j)
        cond = cond[tuple(index)]  # (V,)*j + (V,)
        joint = joint * cond.reshape((VOCAB,) * (j + 1) + (1,) * (MAX_TOKENS - 1 - j))
    return joint


def _chi_square_p(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson's test, cells with an expected count under 5 pooled into one."""
    n = counts.sum().item()
    expected = expected_probs.flatten() * n
    counts = counts.flatten().double()
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    stat = (((obs - exp) ** 2)[keep] / exp[keep]).sum().item()
    dof = int(keep.sum()) - 1
    # The chi-square survival function: the regularised upper incomplete gamma Q(dof/2, stat/2).
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.fixture
def one_thread():
    # Thousands of tiny per-sequence ops: extra threads only add contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("method", METHODS)
def test_sampled_distribution_equals_the_targets(tokenizer, method, one_thread):
    target = _small_vocab(0, 2)
    spec = _spec(method, k=2)
    if method == "draft_model":
        spec["model"] = _small_vocab(1, 1)  # another model: q differs from p, drafts get rejected
    llm = LLM(target, tokenizer, lower="eager", block_size=16, num_kv_blocks=1100,
              max_num_seqs=1024, max_num_batched_tokens=16384, speculative_config=spec)
    params = [SamplingParams(temperature=TEMPERATURE, max_tokens=MAX_TOKENS, ignore_eos=True, seed=i)
              for i in range(NUM_SAMPLES)]
    outputs = []
    for start in range(0, NUM_SAMPLES, 1000):
        outputs += llm.generate([PROMPT] * 1000, params[start:start + 1000])
    tokens = torch.tensor([o.token_ids for o in outputs])
    stats = llm.engine.speculator.stats
    assert stats.num_drafted > NUM_SAMPLES // 2  # speculation really ran
    assert 0 < stats.num_accepted < stats.num_drafted  # with rejections
    joint = _exact_joint(target)
    counts = torch.zeros((VOCAB,) * MAX_TOKENS, dtype=torch.long)
    counts.index_put_(tuple(tokens.T), torch.ones(len(tokens), dtype=torch.long), accumulate=True)
    # Tokens 2-3 (the first verification: accept / residual) and 3-4 (chains and bonus).
    p_23 = _chi_square_p(counts.sum((0, 3)), joint.sum((0, 3)))
    p_34 = _chi_square_p(counts.sum((0, 1)), joint.sum((0, 1)))
    assert p_23 > P_VALUE_THRESHOLD and p_34 > P_VALUE_THRESHOLD, (p_23, p_34, stats)
    # Seeds reproduce: the same seeded requests again, in another batch.
    again = llm.generate([PROMPT] * 3, [params[7], params[3], params[11]])
    assert [o.token_ids for o in again] == [outputs[7].token_ids, outputs[3].token_ids, outputs[11].token_ids]
    assert math.isfinite(outputs[0].metrics.mean_accepted_length)
