"""The engine on small random-weight models: paging pass, scheduling, sampling, API.

Reference: the same model run by Hugging Face ``generate`` (or, for the
hand-written model, a full-recompute greedy loop), one prompt at a time with
no padding. The engine packs many prompts into each step, so agreement shows
the paged cache, slot mapping and per-sequence masking are right.
"""

import pytest
import torch

import llmopt
from llmopt.runtime.paged_context import PagedKVCache, PagedStep, paged_step
from llmopt.models import random_handwritten_gpt, random_hf_model, random_llama
from llmopt.runtime.llm import LLM
from llmopt.runtime.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2.tokenizer


def _prompts(n, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for length in lengths]


def _hf_greedy(model, prompt, max_tokens):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                         min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _loop_greedy(model, prompt, max_tokens):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("heads", ["gqa", "mqa"])
def test_llama_greedy_matches_hf_generate(tokenizer, heads):
    model = random_llama(heads=heads, num_layers=2)
    llm = LLM(model, tokenizer, lower="eager", block_size=16, num_kv_blocks=64)
    prompts = _prompts(10)
    outputs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outputs):
        assert out.token_ids == _hf_greedy(model, prompt, 12)
        assert out.finish_reason == "length"
    assert llm.engine.num_free_blocks == 64  # everything handed back


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_llama_family_models_match_hf_generate(tokenizer, arch):
    model = random_hf_model(arch, num_hidden_layers=2)
    llm = LLM(model, tokenizer, lower="eager", block_size=16, num_kv_blocks=64)
    prompts = _prompts(6, seed=2)
    for prompt, out in zip(prompts, llm.generate(prompts, GREEDY)):
        assert out.token_ids == _hf_greedy(model, prompt, 12)


def test_handwritten_model_follows_the_protocol(tokenizer):
    """A plain nn.Module with hand-written attention, called (input_ids, position_ids)."""
    model = random_handwritten_gpt()
    llm = LLM(model, tokenizer, lower="eager", block_size=16, num_kv_blocks=64)
    prompts = _prompts(6, vocab=model.config.vocab_size, seed=1)
    outputs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outputs):
        assert out.token_ids == _loop_greedy(model, prompt, 12)


def test_preemption_and_chunked_prefill_keep_outputs(tokenizer):
    model = random_llama(heads="gqa", num_layers=2)
    # 12 blocks of 16 tokens for 10 prompts of up to 40 + 24 tokens: sequences are
    # preempted and recomputed; an 8-token step budget chunks every prompt.
    llm = LLM(model, tokenizer, lower="eager", block_size=16, num_kv_blocks=12,
              max_num_batched_tokens=8)
    prompts = _prompts(10)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert sum(o.metrics.num_preemptions for o in outputs) > 0
    for prompt, out in zip(prompts, outputs):
        assert out.token_ids == _hf_greedy(model, prompt, 24)
    assert llm.engine.num_free_blocks == 12


def test_prefix_cache_hits_keep_outputs(tokenizer):
    model = random_llama(heads="gqa", num_layers=2)
    llm = LLM(model, tokenizer, lower="eager", block_size=16, num_kv_blocks=64)
    shared = list(range(3, 43))  # 40 shared tokens: two full blocks reusable
    first = llm.generate([shared + [50]], GREEDY)[0]
    prompts = [shared + tail for tail in ([60, 61], [70], [80, 81, 82])]
    outputs = llm.generate(prompts, GREEDY)
    assert first.token_ids == _hf_greedy(model, shared + [50], 12)
    for prompt, out in zip(prompts, outputs):
        assert out.metrics.num_prefix_hit_tokens == 32
        assert out.token_ids == _hf_greedy(model, prompt, 12)


def test_one_graph_serves_every_step_shape(tokenizer):
    """T is dynamic and (lower="eager") single-token steps are padded: no recompiles after the
    first graph."""
    model = random_llama(heads="gqa", num_layers=2)
    llm = LLM(model, tokenizer, lower="eager", block_size=16, num_kv_blocks=64)
    counts = torch._dynamo.utils.counters
    frames_before = counts["stats"]["unique_graphs"]
    llm.generate([[5] * 30, [6, 7]], GREEDY)  # prefill of 32 tokens, then 2-row decode steps
    llm.generate([[8, 9, 10]], GREEDY)  # a single sequence: 1-token decode steps
    assert counts["stats"]["unique_graphs"] == frames_before


def test_inductor_runner_on_cpu_has_a_single_token_graph():
    """With lower="inductor" on CPU single-token steps get a graph of their own (not padded to
    two rows); with "eager" they are padded. (Its logits: tests/runtime/test_speculative_int4.py.)"""
    from llmopt.runtime.model_runner import ModelRunner, RunnerOptions

    model = random_llama(heads="gqa", num_layers=2)
    cpu = torch.device("cpu")
    assert ModelRunner(model, RunnerOptions(cpu, 16, "inductor"))._compiled_single is not None
    assert ModelRunner(model, RunnerOptions(cpu, 16, "eager"))._compiled_single is None


def test_paging_pass_removes_the_models_mask():
    model = random_llama(heads="gqa", num_layers=2)
    captured = []

    def backend(gm, example_inputs):
        compiled = llmopt.llmopt_backend(gm, example_inputs, options={"paged_kv": True, "lower": "eager"})
        captured.append(gm)
        return compiled

    def forward(input_ids, position_ids):
        return model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits

    compiled = torch.compile(forward, backend=backend)
    ids, pos = torch.tensor([[4, 5, 6, 7, 8]]), torch.tensor([[0, 1, 2, 0, 1]])
    torch._dynamo.maybe_mark_dynamic(ids, 1)
    torch._dynamo.maybe_mark_dynamic(pos, 1)
    cache = PagedKVCache(num_blocks=4, block_size=16)
    step = PagedStep(torch.tensor([0, 1, 2, 16, 17]), torch.tensor([[0], [1]]), torch.tensor([3, 2]),
                     torch.tensor([0, 3, 5]), 3, 3)
    with paged_step(cache, step):
        logits = compiled(ids, pos)
    report = llmopt.last_report()
    assert report.count("paged_attention") == 2
    (gm,) = captured
    targets = [str(n.target) for n in gm.graph.nodes]
    assert not any("scaled_dot_product" in t for t in targets)
    # T is the only dynamic size: a value with two dynamic dims is a T x T mask.
    sizes = [n.meta.get("example_value") for n in gm.graph.nodes]
    assert any(isinstance(v, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in v.shape) for v in sizes)
    for node, value in zip(gm.graph.nodes, sizes):
        if isinstance(value, torch.Tensor):
            assert sum(isinstance(d, torch.SymInt) for d in value.shape) < 2, node.format_node()
    for i, (prompt, rows) in enumerate((([4, 5, 6], slice(0, 3)), ([7, 8], slice(3, 5)))):
        ref = model(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(logits[0, rows], ref, atol=1e-5, rtol=1e-5)


def test_model_without_pageable_attention_is_refused(tokenizer):
    class NoAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(64, 16)
            self.out = torch.nn.Linear(16, 64)

        def forward(self, input_ids, position_ids):
            return self.out(self.emb(input_ids))

    with pytest.raises(RuntimeError, match="no attention was rewritten"):
        LLM(NoAttention(), tokenizer, lower="eager", num_kv_blocks=8)


def test_seeded_sampling_is_reproducible_across_batches(tokenizer):
    model = random_llama(heads="gqa", num_layers=2)
    llm = LLM(model, tokenizer, lower="eager", num_kv_blocks=64)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    alone = llm.generate([[5, 6, 7]], params)[0].token_ids
    others = SamplingParams(temperature=0.8, max_tokens=10, ignore_eos=True)
    together = llm.generate([[9, 9], [5, 6, 7], [3] * 20], [others, params, others])[1].token_ids
    assert alone == together


def test_stop_token_ids_and_max_tokens(tokenizer):
    model = random_llama(heads="gqa", num_layers=2)
    llm = LLM(model, tokenizer, lower="eager", num_kv_blocks=64)
    prompt = [5, 6, 7, 8]
    free_run = llm.generate([prompt], GREEDY)[0].token_ids
    stop_at = free_run[4]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                stop_token_ids=[stop_at]))[0]
    assert out.token_ids == free_run[:free_run.index(stop_at) + 1]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop_at
    assert len(llm.generate([prompt], SamplingParams(temperature=0, max_tokens=3))[0].token_ids) <= 3


def test_stream_and_abort(tokenizer):
    model = random_llama(heads="gqa", num_layers=2)
    llm = LLM(model, tokenizer, lower="eager", num_kv_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    seen = [out.token_ids for out in llm.stream([[5, 6, 7]], params)]
    assert [len(s) for s in seen] == list(range(1, 9))
    assert seen[-1] == llm.generate([[5, 6, 7]], params)[0].token_ids
    # Closing a stream early aborts its request and frees its blocks.
    stream = llm.stream([[5, 6, 7], [8, 9]], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    next(stream)
    stream.close()
    assert not llm.engine.has_unfinished()
    assert llm.engine.num_free_blocks == 64
    # Engine-level abort.
    request_id = llm.engine.add_request(None, [5, 6, 7], params)
    llm.engine.step()
    aborted = llm.engine.abort(request_id)
    assert aborted.finish_reason == "abort" and not llm.engine.has_unfinished()


def test_bad_requests_get_clear_errors(tokenizer):
    model = random_llama(heads="gqa", num_layers=2)
    llm = LLM(model, tokenizer, lower="eager", num_kv_blocks=4, block_size=16)  # 64 tokens
    with pytest.raises(ValueError, match="at most 64 tokens"):
        llm.generate([[5] * 64], GREEDY)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[5, 100000]], GREEDY)
    with pytest.raises(ValueError, match="sampling params"):
        llm.generate([[5], [6]], [GREEDY] * 3)
    with pytest.raises(ValueError, match="SamplingParams.temperature"):
        SamplingParams(temperature=-1)
    assert not llm.engine.has_unfinished()
    with pytest.raises(TypeError, match="unknown engine option"):
        LLM(model, tokenizer, block_sise=16)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        LLM(model, tokenizer, block_size=12)


@pytest.mark.parametrize("impl", ["torch", "gather_sdpa"])
def test_paged_attention_impl_is_an_engine_option(tokenizer, impl):
    """``kernels.paged_attention`` reaches every paged site (named in the Report) and the
    chosen path gives Hugging Face's greedy tokens, as the default does."""
    model = random_llama(heads="gqa", num_layers=2)
    llm = LLM(model, tokenizer, lower="eager", block_size=16, num_kv_blocks=64,
              kernels={"paged_attention": impl})
    prompts = _prompts(6, seed=3)
    for prompt, out in zip(prompts, llm.generate(prompts, GREEDY)):
        assert out.token_ids == _hf_greedy(model, prompt, 12)
    sites = llmopt.last_report().impls("paged_attention")
    assert len(sites) == 2 and set(sites.values()) == {impl}  # one per layer


def test_bad_kernel_option_is_refused_when_the_engine_is_built(tokenizer):
    with pytest.raises(llmopt.LLMOptConfigError, match="paged_attention"):
        LLM(random_llama(heads="gqa", num_layers=2), tokenizer, lower="eager", num_kv_blocks=8,
            kernels={"paged_attention": "flash9"})


def test_compile_options_quantize_the_served_model(tokenizer):
    """``compile_options={"quantize": "int8"}`` serves the int8 model: its greedy tokens are
    those of the float model with each linear weight replaced by its dequantized int8 copy
    (exactness mode keeps the arithmetic in fp32, so only the weights differ)."""
    import copy

    from llmopt.quantization.config import DEFAULT_INT8_METHOD
    from llmopt.quantization.quantize import quantize_count, quantize_weight

    model = random_llama(heads="gqa", num_layers=2)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in reference.named_modules():
            if isinstance(module, torch.nn.Linear):  # lm_head too: the runner compiles it quantized
                module.weight.copy_(quantize_weight(module.weight, "int8", method=DEFAULT_INT8_METHOD).dequantize())
    before = quantize_count()
    llm = LLM(model, tokenizer, lower="eager", num_kv_blocks=64, compile_options={"quantize": "int8"},
              kernels={"quant_cpu_dtype": "float32"})
    assert quantize_count() > before
    prompts = _prompts(4)
    for prompt, out in zip(prompts, llm.generate(prompts, GREEDY)):
        assert out.token_ids == _hf_greedy(reference, prompt, 12)
    # The head is quantized too: the first token's log-probability is the reference's to fp32
    # rounding (1e-4), while an fp32 head would be off by its int8 error (about 1e-2 here).
    prompt = prompts[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, logprobs=0))[0]
    with torch.no_grad():
        want = torch.log_softmax(reference(torch.tensor([prompt])).logits[0, -1].double(), -1)
        fp32_head = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1].double(), -1)
    token, logprob = out.outputs[0].logprobs[0][0], out.outputs[0].logprobs[0][1]
    assert abs(logprob - want[token].item()) < 1e-4
    assert abs(fp32_head[token].item() - want[token].item()) > 1e-3  # the check above can tell


@pytest.mark.parametrize("options, message", [
    ({"quantize": "int3"}, "int3"), ({"lower": "eager"}, "belong to the engine"),
    ({"bogus": 1}, "bogus"), ("int4", "must be a dict")])
def test_compile_options_errors_are_clear(options, message):
    from llmopt.errors import LLMOptConfigError
    from llmopt.runtime.engine_config import EngineConfig

    with pytest.raises(LLMOptConfigError, match=message):
        EngineConfig(compile_options=options)
