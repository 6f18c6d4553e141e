"""Lookahead decoding: token trees on the paged cache, and greedy identity with plain decoding.

The kernel tests check the append mask (who sees whom among a sequence's new
tokens) against attention written out densely; the engine tests check that
lookahead decoding emits exactly the tokens of the same engine without it
(which test_engine.py checks against Hugging Face ``generate``), with
batching, chunked prefill and preemption, handing every KV block back.
"""

import math

import pytest
import torch

from llmopt.errors import LLMOptConfigError
from llmopt.kernels.paged_attention import (_paged_attention_gather_sdpa, paged_attention_cpu_planned,
                                            plan_cpu_step)
from llmopt.models import random_llama
from llmopt.runtime import token_tree
from llmopt.runtime.llm import LLM
from llmopt.runtime.sampling_params import SamplingParams
from llmopt.runtime.speculative.config import SpeculativeConfig
from llmopt.runtime.speculative.lookahead import LookaheadSpeculator
from llmopt.runtime.speculative.speculator import SpecStats


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2.tokenizer


# ---- the token tree and the append mask ---------------------------------------------


def test_tree_depths_and_ancestors():
    parents = [0, 1, 0, 3, 1]  # fed: last, a(0), b(a), c(0), d(c), e(a)
    assert token_tree.depths(parents) == [0, 1, 2, 1, 2, 2]
    mask = token_tree.ancestor_mask(parents)
    assert mask[4].tolist() == [True, False, False, True, True, False]  # d sees last, c, itself
    assert mask[5].tolist() == [True, True, False, False, False, True]  # e sees last, a, itself
    assert token_tree.is_chain([0, 1, 2]) and not token_tree.is_chain(parents)
    with pytest.raises(ValueError, match="parent"):
        token_tree.check_parents([0, 2])


def _dense_reference(q, keys, values, visible, scale):
    """q (Tq, H, D) against keys/values (S, Hkv, D) with a (Tq, S) bool mask, in fp64."""
    group = q.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,shd->hts", q.double(), k) * scale
    scores = scores.masked_fill(~visible[None], float("-inf"))
    return torch.einsum("hts,shd->thd", scores.softmax(-1), v).to(q.dtype)


@pytest.mark.parametrize("path", ["native", "torch", "gather_sdpa"])
def test_append_mask_attends_the_prefix_and_own_branch(path):
    g = torch.Generator().manual_seed(0)
    block_size, kv_heads, heads, dim = 4, 2, 4, 16
    num_blocks = 8
    prefix = [5, 3]  # two sequences' cached lengths
    parents = [[0, 1, 0, 3, 1], None]  # the first feeds a tree, the second one decode token
    new = [1 + len(parents[0]), 1]
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g)
    tables = torch.tensor([[0, 1, 2, 3], [4, 5, 0, 0]], dtype=torch.int32)
    seq_lens = [p + n for p, n in zip(prefix, new)]
    slots = []
    for i, (p, n) in enumerate(zip(prefix, new)):
        slots += [int(tables[i, pos // block_size]) * block_size + pos % block_size for pos in range(p, p + n)]
    total = sum(new)
    q = torch.randn(total, heads, dim, generator=g)
    k = torch.randn(total, kv_heads, dim, generator=g)
    v = torch.randn(total, kv_heads, dim, generator=g)
    starts = torch.tensor([0, new[0], total], dtype=torch.int32)
    masks = {0: token_tree.ancestor_mask(parents[0])}
    scale = dim ** -0.5
    kc, vc = k_cache.clone(), v_cache.clone()
    slot_t = torch.tensor(slots, dtype=torch.int32)
    lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    if path == "gather_sdpa":
        out = _paged_attention_gather_sdpa(q, k, v, kc, vc, slot_t, tables, lens_t, starts, scale, masks)
    else:
        plan = plan_cpu_step(tables, lens_t, starts, block_size, num_blocks, total, q.dtype, masks)
        out = paged_attention_cpu_planned(q, k, v, kc, vc, slot_t, plan, scale, native=path == "native")
    row = 0
    for i, (p, n) in enumerate(zip(prefix, new)):
        blocks = tables[i, :math.ceil((p + n) / block_size)].long()
        keys = kc[blocks].reshape(-1, kv_heads, dim)[:p + n]
        values = vc[blocks].reshape(-1, kv_heads, dim)[:p + n]
        visible = torch.ones(n, p + n, dtype=torch.bool)
        visible[:, p:] = masks[0] if i in masks else torch.ones(n, n, dtype=torch.bool).tril()
        expected = _dense_reference(q[row:row + n], keys, values, visible, scale)
        torch.testing.assert_close(out[row:row + n], expected, atol=1e-5, rtol=1e-4)
        row += n


def test_a_chain_mask_is_the_causal_path():
    g = torch.Generator().manual_seed(1)
    k_cache = torch.randn(4, 4, 2, 16, generator=g)
    v_cache = torch.randn(4, 4, 2, 16, generator=g)
    q, k, v = (torch.randn(3, h, 16, generator=g) for h in (4, 2, 2))
    tables = torch.tensor([[0, 1]], dtype=torch.int32)
    args = (torch.tensor([5, 6, 7], dtype=torch.int32), tables, torch.tensor([8], dtype=torch.int32),
            torch.tensor([0, 3], dtype=torch.int32))
    plain = _paged_attention_gather_sdpa(q, k, v, k_cache.clone(), v_cache.clone(), *args, None)
    chain = _paged_attention_gather_sdpa(q, k, v, k_cache.clone(), v_cache.clone(), *args, None,
                                         {0: token_tree.ancestor_mask([0, 1])})
    torch.testing.assert_close(chain, plain)


# ---- the engine ---------------------------------------------------------------------
# One engine per model (compiling is the slow part); each run sets its speculator.


def _lookahead(window=3, ngram=3, guesses=3, **extra):
    extra.setdefault("adaptive", False)
    extra.setdefault("disable_by_batch_size", None)
    return dict(method="lookahead", window=window, ngram=ngram, guesses=guesses, **extra)


def _run(llm, prompts, params, config=None, pool_from_prompt=True):
    """Generate with ``config``'s lookahead (None: plain); every KV block must come back."""
    engine = llm.engine
    engine.speculator = None
    if config is not None:
        engine.speculator = LookaheadSpeculator(SpeculativeConfig.from_options(config), engine.runner,
                                                SpecStats(), pool_from_prompt=pool_from_prompt)
    engine.scheduler.block_manager.reset_prefix_cache()
    out = llm.generate(prompts, params)
    assert engine.num_free_blocks == engine.num_total_blocks  # nothing leaked
    engine.scheduler.block_manager.check_invariants()
    return out


def _prompts(n, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).tolist()
            for length in torch.randint(3, 20, (n,), generator=g).tolist()]


@pytest.fixture(scope="module")
def small_pool(tokenizer):
    """A random model (200 tokens) on a pool so small that 8 prompts preempt each other."""
    return LLM(random_llama(heads="gqa", num_layers=2), tokenizer, lower="eager", block_size=16,
               num_kv_blocks=12, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def tiny_vocab(tokenizer):
    """A random model with 6 tokens: its greedy output cycles, so n-grams get verified."""
    return LLM(random_llama(heads="gqa", num_layers=2, vocab_size=6, seed=3), tokenizer, lower="eager",
               block_size=8, num_kv_blocks=64)


def test_greedy_identical_on_a_random_model_with_preemption(small_pool):
    prompts = _prompts(8, 200)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = [o.token_ids for o in _run(small_pool, prompts, params)]
    for wng in [(3, 3, 3), (4, 2, 2), (2, 5, 1)]:
        out = _run(small_pool, prompts, params, _lookahead(*wng))
        assert [o.token_ids for o in out] == plain, wng
        assert sum(o.metrics.num_preemptions for o in out) > 0  # the tiny pool preempts


def test_tiny_vocabulary_accepts_ngrams_and_stays_identical(tiny_vocab):
    prompts = _prompts(5, 6, seed=2)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    reference = [o.token_ids for o in _run(tiny_vocab, prompts, params)]
    for config, from_prompt in ((_lookahead(4, 4, 4), True), (_lookahead(3, 3, 3), False)):
        steps = tiny_vocab.engine.num_steps
        out = _run(tiny_vocab, prompts, params, config, from_prompt)  # batch 5, continuous batching
        assert [o.token_ids for o in out] == reference
        speculator = tiny_vocab.engine.speculator
        assert speculator.stats.num_accepted > 0
        assert speculator.stats.mean_accepted_length > 1.0
        assert tiny_vocab.engine.num_steps - steps < 40  # fewer steps than one token each
        assert speculator.num_kv_moves > 0  # a later branch won and its K/V moved


def test_one_at_a_time_matches_a_batch(tiny_vocab):
    prompts = _prompts(3, 6, seed=5)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    plain = [o.token_ids for o in _run(tiny_vocab, prompts, params)]
    batch = [o.token_ids for o in _run(tiny_vocab, prompts, params, _lookahead())]
    single = [_run(tiny_vocab, [p], params, _lookahead())[0].token_ids for p in prompts]
    assert batch == single == plain


def test_sampled_and_logprob_requests(tiny_vocab):
    prompts = _prompts(3, 6, seed=7)
    sampled = SamplingParams(temperature=0.8, seed=11, max_tokens=16, ignore_eos=True)
    assert [o.token_ids for o in _run(tiny_vocab, prompts, sampled, _lookahead())] == \
        [o.token_ids for o in _run(tiny_vocab, prompts, sampled)]  # sampled requests decode plainly
    with_logprobs = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    got = _run(tiny_vocab, prompts, with_logprobs, _lookahead())
    assert tiny_vocab.engine.speculator.stats.num_accepted > 0
    want = _run(tiny_vocab, prompts, with_logprobs)
    for a, b in zip(got, want):
        assert a.token_ids == b.token_ids
        for (ta, la, top_a), (tb, lb, top_b) in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert ta == tb and la == pytest.approx(lb, abs=1e-4)
            assert [t for t, _ in top_a] == [t for t, _ in top_b]


def test_off_switch_by_batch_size(tiny_vocab):
    prompts = _prompts(3, 6, seed=9)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    out = _run(tiny_vocab, prompts, params, _lookahead(disable_by_batch_size=2))
    assert all(o.metrics.num_drafted_tokens == 0 for o in out)  # three run together: off
    assert tiny_vocab.engine.speculator.stats.num_verify_steps == 0
    tiny_vocab.generate(prompts[:1], params)  # one alone: lookahead runs
    assert tiny_vocab.engine.speculator.stats.num_verify_steps > 0


def test_adaptive_switches_a_missing_sequence_off(tokenizer):
    llm = LLM(random_llama(heads="gqa", num_layers=2, seed=5), tokenizer, lower="eager", block_size=16,
              num_kv_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    # A long random prompt: the pool holds wrong candidates for most tokens at first.
    prompt = torch.randint(0, 100, (400,), generator=torch.Generator().manual_seed(1)).tolist()
    plain = _run(llm, [prompt], params)[0].token_ids
    on = _run(llm, [prompt], params, _lookahead(adaptive=True))[0].token_ids
    on_steps = llm.engine.speculator.stats.num_verify_steps
    off = _run(llm, [prompt], params, _lookahead(adaptive=False))[0].token_ids
    assert on == off == plain
    assert on_steps < llm.engine.speculator.stats.num_verify_steps


@pytest.mark.parametrize("options, message", [
    (dict(window=0), "window must be an int in \\[1, 64\\]"),
    (dict(ngram=1), "ngram must be an int in \\[2, 16\\]"),
    (dict(guesses=65), "guesses must be an int in \\[0, 64\\]"),
    (dict(window=2.5), "window must be an int"),
])
def test_config_errors(options, message):
    with pytest.raises(LLMOptConfigError, match=message):
        SpeculativeConfig.from_options(dict(method="lookahead", **options))


def test_lookahead_fields_belong_to_lookahead():
    with pytest.raises(LLMOptConfigError, match="window belong to method 'lookahead'"):
        SpeculativeConfig.from_options(dict(method="ngram", window=4))
    config = SpeculativeConfig.from_options(dict(method="lookahead"))
    assert (config.window, config.ngram, config.guesses) == (5, 4, 5)


def test_the_engine_builds_lookahead_from_speculative_config(tiny_vocab):
    from llmopt.runtime.speculative.speculator import build_speculator

    engine = tiny_vocab.engine
    config = SpeculativeConfig.from_options(_lookahead(2, 3, 1))
    speculator = build_speculator(config, engine.model, engine.runner, engine.num_total_blocks, engine.config)
    assert isinstance(speculator, LookaheadSpeculator)
    assert (speculator.window, speculator.ngram, speculator.guesses) == (2, 3, 1)
