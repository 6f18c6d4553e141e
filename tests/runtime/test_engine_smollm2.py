"""The engine on the real SmolLM2 (fp32): greedy outputs token-identical to Hugging Face ``generate``.

Sixteen prompts of different lengths go in together, so every step packs
prefills and decodes of many sequences; then the same with a shared system
prompt (prefix-cache hits) and with a KV pool so small that sequences are
preempted and recomputed. The reference runs each prompt alone, unpadded.
"""

import pytest
import torch

from llmopt.runtime.llm import LLM
from llmopt.runtime.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

MAX_TOKENS = 12  # enough for replies to diverge on a wrong cache or schedule; kept short for CI time
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "Explain photosynthesis in one sentence.",
    "What is 12 times 12?",
    "Translate 'good morning' into Spanish.",
    "Who wrote Romeo and Juliet?",
    "Give me a synonym for happy.",
    "What is the boiling point of water in Celsius?",
    "List two programming languages.",
    "Why is the sky blue? Answer briefly, in a way a child would understand, please.",
    "Hi",
    "Describe a cat.",
    "What comes after Monday?",
    "Summarize the plot of Macbeth in two sentences, mentioning the witches and Lady Macbeth.",
]
SYSTEM = ("You are a careful assistant for a school library. Answer every question briefly, "
          "politely and accurately, and never invent facts you are unsure of.")


def _chat(tokenizer, question, system=None):
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                         return_dict=False)


def _hf_generate(model, prompt):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                             do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def plain_prompts(smollm2):
    prompts = [_chat(smollm2.tokenizer, q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) >= 10  # different lengths
    return prompts, [_hf_generate(smollm2.model, p) for p in prompts]


@pytest.fixture(scope="module")
def llm(smollm2):
    return LLM(smollm2.model, smollm2.tokenizer, lower="eager", kv_cache_memory_gib=0.25)


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)


def test_sixteen_prompts_together_match_hf_generate(llm, plain_prompts):
    prompts, expected = plain_prompts
    outputs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outputs] == expected
    assert outputs[0].text == llm.tokenizer.decode(expected[0], skip_special_tokens=True)
    assert llm.engine.num_free_blocks == llm.engine.num_total_blocks


@pytest.mark.long  # CI time; prefix-cache identity on random models stays in test_engine.py
def test_shared_system_prompt_hits_the_prefix_cache(llm, smollm2):
    prompts = [_chat(smollm2.tokenizer, q, SYSTEM) for q in QUESTIONS[:8]]
    expected = [_hf_generate(smollm2.model, p) for p in prompts]
    first = llm.generate(prompts[:1], GREEDY)[0]  # computes and caches the shared prefix
    rest = llm.generate(prompts[1:], GREEDY)
    assert [o.token_ids for o in [first] + rest] == expected
    assert all(o.metrics.num_prefix_hit_tokens >= 32 for o in rest)


@pytest.mark.long  # CI time; preemption identity on random models stays in test_engine.py
def test_tiny_kv_pool_preempts_and_stays_identical(smollm2, plain_prompts):
    prompts, expected = plain_prompts
    # 16 blocks of 16 tokens = 256 tokens for 16 sequences of ~40-70 tokens each.
    tiny = LLM(smollm2.model, smollm2.tokenizer, lower="eager", num_kv_blocks=16, block_size=16)
    outputs = tiny.generate(prompts, GREEDY)
    assert sum(o.metrics.num_preemptions for o in outputs) > 0
    assert [o.token_ids for o in outputs] == expected


@pytest.mark.long
@pytest.mark.parametrize("spec", [
    {"method": "ngram", "num_speculative_tokens": 4},
    {"method": "layer_skip", "num_layers": 20, "num_speculative_tokens": 3},
], ids=["ngram", "layer_skip"])
def test_speculative_decoding_matches_hf_generate(smollm2, plain_prompts, spec):
    """Lossless: with drafts verified in the packed forward, still HF's greedy tokens.

    Eight prompts so speculation stays on (its default batch cut-off is 8 sequences).
    """
    prompts, expected = plain_prompts
    llm = LLM(smollm2.model, smollm2.tokenizer, lower="eager", kv_cache_memory_gib=0.25,
              speculative_config={**spec, "disable_by_batch_size": None})
    outputs = llm.generate(prompts[:8], GREEDY)
    assert [o.token_ids for o in outputs] == expected[:8]
    assert llm.engine.speculator.stats.num_drafted > 0
    assert llm.engine.num_free_blocks == llm.engine.num_total_blocks
