"""The served step's guard filter: fewer guards, and an input that needs a new graph still gets one."""

import pytest
import torch

from llmopt.models import random_llama
from llmopt.runtime.llm import LLM
from llmopt.runtime.paged_context import PagedStep, paged_step
from llmopt.runtime.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2.tokenizer




def _guard_texts(entry) -> list[str]:
    manager = entry.guard_manager
    manager.populate_code_parts_for_debugging()
    return list(manager.code_parts)


def _hf_greedy(model, prompt, max_tokens):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                         min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_module_guards_dropped_input_guards_kept(tokenizer):
    torch._dynamo.reset()
    model = random_llama(heads="gqa", num_layers=2)
    llm = LLM(model, tokenizer, lower="eager", block_size=16, num_kv_blocks=32)
    prompts = [[5, 6, 7, 8], [9] * 20]
    outputs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outputs] == [_hf_greedy(model, p, 6) for p in prompts]
    (entry,) = llm.engine.runner.compiled_entries()
    texts = _guard_texts(entry)
    # The inputs keep their tensor guards (dtype, device, dispatch keys, sizes).
    assert any("L['input_ids']" in t for t in texts) and any("L['position_ids']" in t for t in texts)
    # No guard on the runner and its model is left (but the inputs' no-aliasing check, which names them).
    assert not [t for t in texts if "L['self']" in t and not t.startswith("check_no_aliasing(L['input_ids']")]


def test_an_input_that_needs_a_new_graph_still_gets_one(tokenizer):
    torch._dynamo.reset()
    model = random_llama(heads="gqa", num_layers=2)
    llm = LLM(model, tokenizer, lower="eager", block_size=16, num_kv_blocks=32)
    llm.generate([[5, 6, 7]], GREEDY)
    runner = llm.engine.runner
    assert len(runner.compiled_entries()) == 1
    # The same step with int32 token ids: the int64 graph's guards must refuse it.
    step = PagedStep(slot_mapping=torch.tensor([-1, -1], dtype=torch.int32),
                     block_tables=torch.zeros((1, 1), dtype=torch.int32),
                     seq_lens=torch.tensor([2], dtype=torch.int32),
                     query_start_loc=torch.tensor([0, 2], dtype=torch.int32), max_query_len=2, max_seq_len=2)
    ids, positions = torch.tensor([5, 6]), torch.tensor([0, 1])  # made as the runner makes them
    with torch.inference_mode(), paged_step(runner.kv_cache, step):
        reference = runner._compiled(ids[None], positions[None])
        assert len(runner.compiled_entries()) == 1  # the served graph
        hidden = runner._compiled(ids.int()[None], positions[None])
    assert len(runner.compiled_entries()) == 2
    torch.testing.assert_close(hidden, reference)


def test_each_engine_runs_its_own_model(tokenizer):
    """Runners compile the same ``_forward``: without guards on ``self``, only their own
    entries keep a second model from running the first one's graph."""
    first, second = random_llama(heads="gqa", num_layers=2), random_llama(heads="mqa", num_layers=3)
    engines = [LLM(m, tokenizer, lower="eager", block_size=16, num_kv_blocks=32) for m in (first, second)]
    prompt = [5, 6, 7, 8]
    for model, llm in zip((first, second), engines):
        assert llm.generate([prompt], GREEDY)[0].token_ids == _hf_greedy(model, prompt, 6)
        assert len(llm.engine.runner.compiled_entries()) == 1
