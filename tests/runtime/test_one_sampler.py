"""The plain loop behind ``--no-compile`` and the engine: one sampler, one EOS rule."""

import pytest
import torch

from llmopt.models import random_llama
from llmopt.runtime import engine as engine_module
from llmopt.runtime import generate as generate_module
from llmopt.runtime.generate import generate
from llmopt.runtime.llm import LLM
from llmopt.runtime.sampling_params import SamplingParams
from llmopt.runtime.stop_tokens import eos_token_ids

PROMPTS = [torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 11, 17)]


@pytest.fixture(scope="module")
def model_and_engine(smollm2):
    torch.manual_seed(0)
    model = random_llama(heads="gqa", num_layers=2)
    return model, LLM(model, smollm2.tokenizer, lower="eager", block_size=16, num_kv_blocks=64)


def _hf_greedy(model, prompt, max_tokens):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                         min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_tokens_are_identical(model_and_engine):
    model, llm = model_and_engine
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outputs):
        plain = generate(model, None, torch.tensor(prompt), 12, eos_token_ids=())[0]
        assert plain == out.token_ids == _hf_greedy(model, prompt, 12)


@pytest.mark.parametrize("top_k", [0, 5])
def test_seeded_samples_are_identical(model_and_engine, top_k):
    model, llm = model_and_engine
    params = [SamplingParams(temperature=1.3, top_k=top_k, seed=100 + i, max_tokens=10, ignore_eos=True)
              for i in range(len(PROMPTS))]
    outputs = llm.generate(PROMPTS, params)
    for prompt, p, out in zip(PROMPTS, params, outputs):
        plain = generate(model, None, torch.tensor(prompt), 10, temperature=1.3, top_k=top_k or None,
                         seed=p.seed, eos_token_ids=())[0]
        assert plain == out.token_ids
    # and the samples are samples: another seed gives another sequence
    other = generate(model, None, torch.tensor(PROMPTS[2]), 10, temperature=1.3, seed=999, eos_token_ids=())[0]
    assert other != outputs[2].token_ids


def test_one_eos_rule():
    model = random_llama()
    model.generation_config.eos_token_id = 5

    class ChatTokenizer:
        eos_token_id = 1  # like SmolLM2's GGUF tokenizer: <|im_start|>

        def get_vocab(self):
            return {"<|im_start|>": 1, "<|im_end|>": 2}

        def convert_tokens_to_ids(self, token):
            return self.get_vocab()[token]

    tokenizer = ChatTokenizer()
    assert eos_token_ids(model, tokenizer) == {1, 2, 5}
    assert generate_module.default_eos_token_ids(model, tokenizer) == {1, 2, 5}
    assert engine_module.eos_token_ids is eos_token_ids  # the engine's check uses the same function
    # the loop has no sampler of its own
    assert not hasattr(generate_module, "_choose_token")
    assert generate_module.sample is engine_module.sample
