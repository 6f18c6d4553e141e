"""int4 greedy decoding with speculation: bit-identical to int4 plain decoding.

The int4 ``cpu_native`` linear rounds each activation block to int8, so a
last-bit difference in its input can move its output by a whole quantization
step and flip a near-tie argmax: token identity under int4 needs the
verification step to give every row exactly the arithmetic plain decoding
gives that token. Checked here bitwise, on the logits, at each level: the
int4 kernel (a row's result whatever the rows beside it), the model runner
(a k-row verification step against k single-token decode steps) and the
engine (every context both engines scored gets the same logits, so the
tokens are equal). Random models rarely have near-ties, so comparing tokens
alone would not catch a difference; comparing logits does.
"""

import pytest
import torch

from llmopt.kernels import quantized_linear as ql
from llmopt.models import random_llama
from llmopt.runtime.llm import LLM
from llmopt.runtime.model_runner import ModelRunner, RunnerOptions
from llmopt.runtime.sampling_params import SamplingParams

INT4 = {"quantize": "int4"}

needs_native_int4 = pytest.mark.skipif(not ql.native_int4_available(),
                                       reason="no C compiler here: the native int4 kernel is not built")


@pytest.fixture(scope="module")
def target():
    return random_llama(heads="gqa", num_layers=2, hidden_size=128).eval()


@needs_native_int4
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_int4_row_does_not_depend_on_the_other_rows(dtype):
    """Row r of an M-row call equals the same row called alone, bit for bit, for M on both
    sides of the kernel's four-rows-at-a-time passes and N with a partial 16-row tile."""
    g = torch.Generator().manual_seed(0)
    n, k, group = 40, 96, 32
    q = torch.randint(0, 16, (n, k), generator=g)
    scales_zeros = torch.stack([torch.rand(k // group, n, generator=g) * 0.1 + 0.01,
                                torch.randn(k // group, n, generator=g) * 0.01], dim=-1)
    weight, scales = ql.to_cpu_native_int4_layout(ql.pack_int4(q), scales_zeros)
    x = torch.randn(9, k, generator=g).to(dtype)

    def linear(rows):
        return ql.linear_int4(rows, weight, scales, group, "cpu_native")

    alone = torch.cat([linear(x[r:r + 1]) for r in range(x.shape[0])])
    for m in (2, 4, 5, 8, 9):
        assert torch.equal(linear(x[:m]), alone[:m]), f"M={m}"


def _runner(model, lower="eager"):
    runner = ModelRunner(model, RunnerOptions(device=torch.device("cpu"), block_size=16, lower=lower,
                                              compile_options=INT4))
    runner.profile()
    return runner


@needs_native_int4
def test_verification_rows_get_the_logits_of_plain_decode_steps(target):
    """The same prompt, then six tokens decoded one step each, or fed as one step (a
    verification step's shape) crossing a block boundary: every row's logits are equal."""
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 200, (13,), generator=g).tolist()
    fed = torch.randint(3, 200, (6,), generator=g).tolist()
    table, bs = [3, 1, 5, 0], 16
    runner = _runner(target)

    def step(tokens, start, logit_rows):
        end = start + len(tokens)
        slots = [table[p // bs] * bs + p % bs for p in range(start, end)]
        return runner._run_packed(tokens, range(start, end), slots, [0, len(tokens)], [end], [table], logit_rows)

    runner.allocate_kv_cache(8)
    step(prompt, 0, [len(prompt) - 1])
    decoded = torch.cat([step([t], len(prompt) + i, [0]) for i, t in enumerate(fed)])
    runner.allocate_kv_cache(8)
    step(prompt, 0, [len(prompt) - 1])
    verified = step(fed, len(prompt), list(range(len(fed))))
    assert torch.equal(verified, decoded)


def _recorded(llm):
    """Wrap the engine's target runner: {context tokens: logits predicting the next} of every
    sampled row (a verification step's rows each have their own context)."""
    runner, seen = llm.engine.runner, {}
    execute = runner.execute

    def record(scheduled):
        logits = execute(scheduled)
        row = 0
        for item in scheduled:
            if not item.samples:
                continue
            context = item.seq.all_token_ids[:item.start] + list(item.token_ids)
            first = len(context) - item.num_draft_tokens
            for j in range(item.num_draft_tokens + 1):
                seen[tuple(context[:first + j])] = logits[row].clone()
                row += 1
        assert row == logits.shape[0]
        return logits

    runner.execute = record
    return seen


def _prompts(n, seed=0):
    """Repetitive prompts: n-gram lookup finds drafts, some right, some wrong."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 60, (length,), generator=g).tolist() * 3
            for length in torch.randint(2, 10, (n,), generator=g).tolist()]


def _spec(method, target):
    extra = {}
    if method == "draft_model":
        extra = dict(model=random_llama(heads="gqa", num_layers=1, hidden_size=128, seed=1),
                     model_options=INT4)
    if method == "layer_skip":
        extra = dict(num_layers=1)
    return dict(method=method, num_speculative_tokens=4, adaptive=False, disable_by_batch_size=None, **extra)


@needs_native_int4
@pytest.mark.parametrize("method", ["ngram", pytest.param("draft_model", marks=pytest.mark.long),
                                    pytest.param("layer_skip", marks=pytest.mark.long)])
def test_int4_speculation_is_identical_to_int4_plain(smollm2, target, method):
    prompts = _prompts(3)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    options = dict(lower="eager", block_size=16, num_kv_blocks=32, compile_options=INT4)
    plain_llm = LLM(target, smollm2.tokenizer, **options)
    plain_logits = _recorded(plain_llm)
    plain = plain_llm.generate(prompts, params)
    llm = LLM(target, smollm2.tokenizer, speculative_config=_spec(method, target), **options)
    spec_logits = _recorded(llm)
    spec = llm.generate(prompts, params)
    stats = llm.engine.speculator.stats
    assert stats.num_verify_steps > 0 and stats.num_drafted > 0
    if method == "ngram":
        assert 0 < stats.num_accepted < stats.num_drafted  # drafts accepted and rejected
    shared = plain_logits.keys() & spec_logits.keys()
    # Every emitted token's context was scored by both engines (the rejected drafts' are not).
    assert len(shared) == len(plain_logits) == len(prompts) * params.max_tokens
    for context in shared:
        assert torch.equal(spec_logits[context], plain_logits[context]), f"context of length {len(context)}"
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
