import pytest
import torch

import llmopt

from llmopt.models import random_hf_model, random_llama
from llmopt.runtime.generate import (
    GenerationStats,
    cache_length,
    default_eos_token_ids,
    generate,
    generate_stream,
    warm_up,
)

PROMPT = torch.randint(0, 256, (1, 11), generator=torch.Generator().manual_seed(7))


def hf_greedy(model, prompt_ids, max_tokens):
    # An explicit mask, so HF never guesses padding from pad tokens in the prompt.
    out = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
                         max_new_tokens=max_tokens)
    return out[0, prompt_ids.shape[1]:].tolist()


def llmopt_eager(model):
    return torch.compile(model, backend="llmopt", options={"lower": "eager"})


@pytest.mark.parametrize("heads", ["mha", "gqa", "mqa"])
def test_greedy_matches_hf_generate(heads):
    model = random_llama(heads)
    tokens, stats = generate(model, None, PROMPT, 24)
    assert tokens == hf_greedy(model, PROMPT, 24)
    assert stats.new_tokens == 24 and stats.prompt_tokens == 11
    assert stats.prefill_s > 0 and stats.decode_tokens_per_s > 0


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_greedy_matches_hf_generate_other_architectures(arch):
    model = random_hf_model(arch)
    assert generate(model, None, PROMPT, 16)[0] == hf_greedy(model, PROMPT, 16)


@pytest.mark.parametrize("heads", ["mha", "gqa"])
def test_greedy_through_llmopt_matches_hf_generate(heads):
    model = random_llama(heads)
    expected = hf_greedy(model, PROMPT, 20)
    compiled = llmopt_eager(model)
    assert generate(compiled, None, PROMPT, 20)[0] == expected
    # A second request of another length reuses the compiled model.
    assert generate(compiled, None, PROMPT[:, :5], 20)[0] == hf_greedy(model, PROMPT[:, :5], 20)


def test_stops_after_an_eos_token():
    model = random_llama()
    expected = hf_greedy(model, PROMPT, 12)
    eos = expected[3]
    first = expected.index(eos)  # the token may also occur before index 3
    tokens, stats = generate(model, None, PROMPT, 12, eos_token_ids=[eos])
    assert tokens == expected[: first + 1]
    assert stats.new_tokens == first + 1
    # An empty stop set never stops early.
    assert generate(model, None, PROMPT, 12, eos_token_ids=())[0] == expected


def test_default_eos_ids_come_from_generation_config_and_tokenizer():
    model = random_llama()
    model.generation_config.eos_token_id = [5, 6]

    class Tokenizer:
        eos_token_id = 7

        def get_vocab(self):
            return {"<|im_end|>": 9}

        def convert_tokens_to_ids(self, token):
            return self.get_vocab()[token]

    assert default_eos_token_ids(model, Tokenizer()) == {5, 6, 7, 9}
    assert default_eos_token_ids(random_llama(), None) == set()


def test_sampling_is_seeded_and_respects_top_k():
    model = random_llama()
    kwargs = dict(temperature=1.5, top_k=3, seed=11)
    tokens = generate(model, None, PROMPT, 16, **kwargs)[0]
    assert generate(model, None, PROMPT, 16, **kwargs)[0] == tokens
    assert generate(model, None, PROMPT, 16, **{**kwargs, "seed": 12})[0] != tokens
    # Every sampled token is among the 3 most likely after its prefix.
    sequence = PROMPT[0].tolist()
    with torch.no_grad():
        for token in tokens:
            logits = model(torch.tensor([sequence])).logits[0, -1]
            assert token in torch.topk(logits, 3).indices.tolist()
            sequence.append(token)
    # top_k=1 leaves nothing to chance.
    greedy = generate(model, None, PROMPT, 16)[0]
    assert generate(model, None, PROMPT, 16, temperature=2.0, top_k=1)[0] == greedy


def test_stream_yields_lazily_without_leaking_inference_mode():
    model = random_llama()
    stats = GenerationStats()
    stream = generate_stream(model, None, PROMPT[0], 5, stats=stats)
    first = next(stream)
    assert stats.new_tokens == 1 and stats.decode_s == 0
    assert not torch.is_inference_mode_enabled()
    rest = list(stream)
    assert [first, *rest] == hf_greedy(model, PROMPT, 5)
    assert stats.new_tokens == 5 and stats.decode_s > 0


def test_arguments_are_checked_when_the_stream_is_made():
    model = random_llama()
    with pytest.raises(ValueError, match="max_tokens"):
        generate_stream(model, None, PROMPT, 0)
    with pytest.raises(ValueError, match="temperature"):
        generate_stream(model, None, PROMPT, 4, temperature=-1.0)
    with pytest.raises(ValueError, match="needs 14"):
        generate_stream(model, None, PROMPT, 4, max_cache_len=13)
    # Exactly enough room: the last new token is never written to the cache.
    assert generate(model, None, PROMPT, 4, max_cache_len=14)[0] == hf_greedy(model, PROMPT, 4)


def test_cache_length_rounds_up_to_a_multiple_of_128():
    assert cache_length(37, 128) == 256
    assert cache_length(100, 28) == 128
    assert cache_length(1, 1) == 128


def test_warm_up_compiles_once_for_the_request_shape():
    model = random_llama()
    compiled_graphs = []

    def counting_backend(gm, example_inputs):
        compiled_graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=counting_backend)
    assert warm_up(compiled, PROMPT, 40) > 0
    after_warm_up = len(compiled_graphs)
    assert after_warm_up >= 2  # prefill and decode
    assert generate(compiled, None, PROMPT, 40)[0] == hf_greedy(model, PROMPT, 40)
    assert len(compiled_graphs) == after_warm_up  # steady state: no recompiles


@pytest.mark.slow
def test_smollm2_greedy_matches_hf_generate(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three colours of the rainbow."}],
        add_generation_prompt=True, return_tensors="pt",
    )["input_ids"]
    expected = hf_greedy(model, ids, 24)
    assert generate(model, tokenizer, ids, 24)[0] == expected
    assert generate(llmopt_eager(model), tokenizer, ids, 24)[0] == expected
    # ... and the tokens did come through llmopt's fused attention (the last
    # graph compiled is the decode step: one attention per layer).
    assert llmopt.last_report().count("attention") == model.config.num_hidden_layers
