"""llmopt.Cascade on two seeded random models, against references computed with plain forwards.

Token level: under greedy the rule decides each position from its prefix
alone, so the cascade's output must equal a per-token loop over full
forwards of both models (keep the small model's argmax when its probability
reaches the threshold or it is in the large model's top-k, else the large
model's argmax), whatever the number of drafts per round; its limits are
each model's own greedy output. Response level: the measured mean
confidence of the small model's answer decides, around a threshold just
above or below it, whether the large model answers.
"""

import json
import math
import urllib.request

import pytest
import torch

from llmopt.errors import LLMOptConfigError
from llmopt.models import random_llama
from llmopt.runtime.cascade import Cascade
from llmopt.runtime.cascade_cost import ModelShape
from llmopt.runtime.cascade_rules import in_top_k, response_confidence
from llmopt.runtime.llm import LLM
from llmopt.runtime.sampling_params import SamplingParams

VOCAB = 256  # random_llama's
OPTIONS = dict(lower="eager", block_size=16, max_model_len=128)
PROMPTS = [[5, 17, 99, 3], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57], [200]]


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2.tokenizer


@pytest.fixture(scope="module")
def small():
    return random_llama(heads="gqa", num_layers=1, seed=1)


@pytest.fixture(scope="module")
def large():
    return random_llama(heads="gqa", num_layers=2, seed=2)


@torch.no_grad()
def _next_logits(model, tokens):
    return model(torch.tensor([tokens])).logits[0, -1].double()


def greedy(model, prompt, n):
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(_next_logits(model, tokens).argmax()))
    return tokens[len(prompt):]


def per_token_rule(small, large, prompt, n, threshold, top_k):
    """The token rule, one position at a time, from full forwards (no cache, no rounds)."""
    tokens, kept = list(prompt), 0
    for _ in range(n):
        q = _next_logits(small, tokens).softmax(-1)
        candidate = int(q.argmax())
        large_logits = _next_logits(large, tokens)
        if float(q[candidate]) >= threshold or in_top_k(large_logits, candidate, top_k):
            tokens.append(candidate)
            kept += 1
        else:
            tokens.append(int(large_logits.argmax()))
    return tokens[len(prompt):], kept


def _cascade_llm(small, large, tokenizer, **rule):
    return LLM(Cascade([small, large], tokenizer=tokenizer, **rule), **OPTIONS)


GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


def test_threshold_zero_keeps_every_small_model_token(small, large, tokenizer):
    llm = _cascade_llm(small, large, tokenizer, deferral="token", threshold=0.0, num_draft_tokens=3)
    outputs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outputs] == [greedy(small, p, 20) for p in PROMPTS]
    stats = llm.engine.stats
    assert stats.num_kept == stats.num_judged == 3 * 20  # every token judged once, all kept
    assert stats.models[1].num_emitted == 0 and stats.models[0].num_emitted == 60
    assert stats.num_rounds == 7  # ceil(20 / 3) rounds, the three requests batched in each
    assert all(o.finish_reason == "length" for o in outputs)
    assert llm.engine.num_free_blocks == llm.engine.num_total_blocks


def test_top_k_of_the_whole_vocabulary_keeps_every_small_model_token(small, large, tokenizer):
    llm = _cascade_llm(small, large, tokenizer, deferral="token", threshold=2.0, top_k=VOCAB)
    outputs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outputs] == [greedy(small, p, 20) for p in PROMPTS]


def test_threshold_above_one_and_no_top_k_always_defers(small, large, tokenizer):
    llm = _cascade_llm(small, large, tokenizer, deferral="token", threshold=1.01, top_k=0, num_draft_tokens=4)
    outputs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outputs] == [greedy(large, p, 20) for p in PROMPTS]
    stats = llm.engine.stats
    assert stats.num_kept == 0 and stats.num_judged == 60 and stats.num_rounds == 20
    assert stats.num_agree_large == 60
    assert all(o.cascade.num_agree_large == 20 for o in outputs)


@pytest.mark.parametrize("num_draft_tokens", [1, 4])
def test_rule_in_between_matches_the_per_token_reference(small, large, tokenizer, num_draft_tokens):
    # A threshold inside the small model's range of confidences, and a small top-k: both rules fire.
    confidences = []
    for p in PROMPTS:
        tokens = list(p)
        for t in greedy(small, p, 20):
            confidences.append(float(_next_logits(small, tokens).softmax(-1).max()))
            tokens.append(t)
    threshold = sorted(confidences)[len(confidences) // 2]
    threshold = (threshold + min(c for c in confidences if c > threshold)) / 2  # not on any value
    expected = [per_token_rule(small, large, p, 20, threshold, 2) for p in PROMPTS]
    kept = sum(k for _, k in expected)
    assert 0 < kept < 60, "the reference must both keep and defer for this test to mean something"
    llm = _cascade_llm(small, large, tokenizer, deferral="token", threshold=threshold, top_k=2,
                       num_draft_tokens=num_draft_tokens)
    outputs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outputs] == [tokens for tokens, _ in expected]
    assert [o.cascade.num_kept for o in outputs] == [k for _, k in expected]


def test_more_requests_than_slots_wait_and_stop_conditions_hold(small, large, tokenizer):
    reference = greedy(small, PROMPTS[0], 20)
    stop_token = reference[6]
    cut = reference.index(stop_token) + 1  # the first time it appears
    llm = LLM(Cascade([small, large], tokenizer=tokenizer, deferral="token", threshold=0.0, num_draft_tokens=4),
              **{**OPTIONS, "max_num_seqs": 2})
    assert llm.engine.num_slots == 2
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[stop_token]),
              SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)] + [GREEDY] * 3
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0], PROMPTS[1]]
    outputs = llm.generate(prompts, params)
    assert outputs[0].token_ids == reference[:cut] and outputs[0].finish_reason == "stop"
    assert outputs[1].token_ids == greedy(small, PROMPTS[1], 5) and outputs[1].finish_reason == "length"
    assert [o.token_ids for o in outputs[2:]] == [greedy(small, p, 20) for p in prompts[2:]]
    assert llm.engine.num_free_blocks == llm.engine.num_total_blocks and not llm.engine.has_unfinished()


def test_sampled_requests_with_a_seed_repeat(small, large, tokenizer):
    llm = _cascade_llm(small, large, tokenizer, deferral="token", threshold=0.05, top_k=3)
    params = SamplingParams(temperature=0.8, max_tokens=12, ignore_eos=True, seed=7, logprobs=2)
    first, second = (llm.generate([PROMPTS[0]], params)[0] for _ in range(2))
    assert first.token_ids == second.token_ids and len(first.token_ids) == 12
    assert len(first.outputs[0].logprobs) == 12 and all(len(top) == 2 for _, _, top in first.outputs[0].logprobs)


def _mean_max_prob(model, prompt, answer):
    tokens, probs = list(prompt), []
    for t in answer:
        probs.append(float(_next_logits(model, tokens).softmax(-1).max()))
        tokens.append(t)
    return sum(probs) / len(probs)


@pytest.mark.parametrize("margin, escalates", [(0.01, True), (-0.01, False)])
def test_response_level_escalates_below_the_threshold_only(small, large, tokenizer, margin, escalates):
    prompt = PROMPTS[0]
    small_answer = greedy(small, prompt, 20)
    confidence = _mean_max_prob(small, prompt, small_answer)
    llm = _cascade_llm(small, large, tokenizer, deferral="response", threshold=confidence + margin)
    out = llm.generate([prompt], GREEDY)[0]
    assert out.cascade.confidences[0] == pytest.approx(confidence, abs=1e-4)
    assert out.token_ids == (greedy(large, prompt, 20) if escalates else small_answer)
    assert out.cascade.model_index == (1 if escalates else 0)
    assert len(out.cascade.confidences) == (2 if escalates else 1)
    assert out.outputs[0].logprobs is None  # the caller did not ask for them
    assert llm.engine.stats.answered_by == ([0, 1] if escalates else [1, 0])


def test_response_level_mean_logprob_and_three_models(small, large, tokenizer):
    prompt = PROMPTS[1]
    middle = random_llama(heads="gqa", num_layers=1, seed=3)
    # Thresholds no answer's mean log-probability can reach (<= 0): every answer escalates to the last.
    llm = LLM(Cascade([small, middle, large], tokenizer=tokenizer, deferral="response", threshold=[0.5, 0.5],
                      confidence="mean_logprob"), **OPTIONS)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0))[0]
    assert out.token_ids == greedy(large, prompt, 8) and out.cascade.model_index == 2
    assert len(out.cascade.confidences) == 3 and all(c < 0 for c in out.cascade.confidences)
    assert all(top == [] for _, _, top in out.outputs[0].logprobs)
    assert response_confidence(out.outputs[0].logprobs, "mean_logprob") == pytest.approx(out.cascade.confidences[2])


def test_flops_per_token_from_the_shape(small):
    shape = ModelShape.of(small)
    hidden, inter, kv = 64, 128, 2 * 16  # 4 heads of 16, gqa: 2 kv heads
    per_layer = hidden * hidden * 2 + hidden * kv * 2 + 3 * hidden * inter  # q, o, k, v, gate/up/down
    assert shape.decoder_linear_params == per_layer and shape.head_params == VOCAB * hidden
    # one token at context 10: 2 * params + lm_head + 4 * layers * width * 10
    assert shape.flops_per_token(10) == 2 * per_layer + 2 * VOCAB * hidden + 4 * 1 * 64 * 10
    assert shape.forward_flops(3, 2, 1) == 2 * per_layer * 2 + 2 * VOCAB * hidden + 4 * 64 * (4 + 5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(models=["smollm2"]), "two or more"),
    (dict(models=["a", "b"], deferral="layer"), "deferral"),
    (dict(models=["a", "b", "c"], deferral="token"), "exactly two"),
    (dict(models=["a", "b"], deferral="token", top_k=-1), "top_k"),
    (dict(models=["a", "b"], deferral="token", num_draft_tokens=0), "num_draft_tokens"),
    (dict(models=["a", "b"], deferral="token", threshold=math.nan), "finite"),
    (dict(models=["a", "b"], deferral="token", confidence="mean_logprob"), "belongs to deferral 'response'"),
    (dict(models=["a", "b"], deferral="response", top_k=2), "belongs to deferral 'token'"),
    (dict(models=["a", "b"], deferral="response", confidence="entropy"), "confidence"),
    (dict(models=["a", "b", "c"], deferral="response", threshold=[0.5]), "one value per model"),
    (dict(models=["a", {"model": "b", "quantize": "int4"}]), "must be a dict with 'model'"),
    (dict(models=["a", {"model": "b", "compile_options": {"quantise": "int4"}}]), "quantise"),
    (dict(models=["a", 3]), "name, a path or an nn.Module"),
])
def test_config_errors_are_clear(kwargs, message):
    with pytest.raises(LLMOptConfigError, match=message):
        Cascade(**kwargs)


def test_from_options_and_engine_level_errors(small, large, tokenizer):
    with pytest.raises(LLMOptConfigError, match="unknown cascade option"):
        Cascade.from_options({"models": ["a", "b"], "treshold": 0.5})
    with pytest.raises(LLMOptConfigError, match="'models' is required"):
        Cascade.from_options({"deferral": "token"})
    cascade = Cascade.from_options({"models": ["a", {"model": "b", "compile_options": {"quantize": "int4"}}],
                                    "deferral": "token", "threshold": 0.3, "top_k": 2})
    assert cascade.to_dict()["models"][1] == {"model": "b[quantize=int4]", "compile_options": {"quantize": "int4"}}
    with pytest.raises(LLMOptConfigError, match="give each model its own"):
        LLM(Cascade([small, large], tokenizer=tokenizer), compile_options={"quantize": "int4"})
    with pytest.raises(LLMOptConfigError, match="no tokenizer"):
        LLM(Cascade([small, large]), **OPTIONS)
    other = random_llama(heads="gqa", num_layers=1, vocab_size=128)
    with pytest.raises(LLMOptConfigError, match="share one vocabulary"):
        LLM(Cascade([other, large], tokenizer=tokenizer), **OPTIONS)


def test_served_through_the_openai_server(small, large, tokenizer):
    pytest.importorskip("uvicorn")
    from llmopt.runtime.server import build_server

    llm = _cascade_llm(small, large, tokenizer, deferral="token", threshold=0.0)
    server = build_server(llm.engine, "127.0.0.1", 0)
    server.start()
    try:
        body = json.dumps({"prompt": PROMPTS[0], "max_tokens": 10, "temperature": 0, "ignore_eos": True}).encode()
        request = urllib.request.Request(server.url + "/v1/completions", body, {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
    finally:
        server.close()
    assert answer["choices"][0]["text"] == tokenizer.decode(greedy(small, PROMPTS[0], 10), skip_special_tokens=True)


@pytest.mark.parametrize("spec, message", [
    ('{"models": ["smollm2"]}', "--cascade: cascade: models must be a list of two or more"),
    ('{"models": ["smollm2", "smollm2"], "deferral": "word"}', "--cascade: cascade option 'deferral'"),
])
def test_serve_cascade_flag_reports_a_bad_cascade_in_one_line(spec, message, capsys):
    from llmopt.cli import main

    assert main(["serve", "--cascade", spec, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
