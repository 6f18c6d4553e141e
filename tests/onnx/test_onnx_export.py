"""``llmopt.export_onnx`` on small random models, run with ONNX Runtime (CPU execution
provider; CUDA too where onnxruntime has it) against llmopt in PyTorch.

The reference is the model compiled with llmopt (``lower="eager"``, same
options), so a quantized export is compared with llmopt's own quantized
kernels: the export must compute what llmopt computes. Each exported model
runs a batch of 2 as a prefill of 6 tokens followed by 3 single-token decode
steps on the returned cache, and every step's logits are compared with the
reference's logits for the whole sequence at once (causal attention: the same
positions give the same values).
"""

import numpy as np
import pytest
import torch

import llmopt
from llmopt.models import random_handwritten_gpt, random_hf_model, random_llama
from llmopt.onnx import OnnxExportError, export_onnx
from llmopt.onnx.capture import model_logits

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from llmopt.onnx.runtime import OnnxCausalLM  # noqa: E402  (needs onnxruntime)

# llmopt runs fp32 int4/int8 layers in bf16 on CPU by default (for speed); the export
# computes in fp32 (MatMulNBits, accuracy_level 0), so references taken from llmopt use
# its fp32 path: the comparison is then of the same arithmetic.
EXACT = {"quant_cpu_dtype": "float32"}

PROVIDERS = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in ort.get_available_providers() else []
PROVIDERS.append("CPUExecutionProvider")

# fp32 logits of magnitude <= ~60 (handwritten GPT; ~3 for the others). ONNX
# Runtime's GEMMs and GroupQueryAttention sum in other orders than PyTorch's
# kernels: observed <= 8e-6 absolute over these cases (int4/int8 included,
# since both sides use the same quantized weights). 1e-4 + 1e-5 * |ref| leaves
# room while a wrong cache position, mask or weight layout gives errors of O(1).
ATOL, RTOL = 1e-4, 1e-5

CASES = {
    "llama-gqa": (lambda: random_llama("gqa"), {}),
    # int4 with q/k/v biases (Qwen2); group 32, so K=64 has two groups.
    "qwen2-int4": (lambda: random_hf_model("qwen2", num_key_value_heads=2), {"quantize": "int4", "group_size": 32}),
    # A sliding window shorter than the test's 9 tokens, and int8 weights; MQA.
    "mistral-window-int8": (lambda: random_hf_model("mistral", num_key_value_heads=1, sliding_window=4),
                            {"quantize": "int8"}),
}


def _llmopt_logits(model, options, input_ids, position_ids):
    compiled = torch.compile(model, backend="llmopt", options={"lower": "eager", "kernels": EXACT, **options})
    with torch.no_grad():
        return model_logits(compiled, input_ids, position_ids).numpy()


def _inputs(batch=2, tokens=9, vocab=256, seed=0):
    ids = torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(seed))
    return ids, torch.arange(tokens).expand(batch, tokens).contiguous()


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    build, options = CASES[request.param]
    model = build()
    path = tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx"
    info = export_onnx(model, path, options=options)
    torch._dynamo.reset()
    return request.param, model, options, info, OnnxCausalLM(path, providers=PROVIDERS)


def test_prefill_then_decode_steps_match_llmopt(exported):
    _, model, options, _, session = exported
    ids, positions = _inputs()
    expected = _llmopt_logits(model, options, ids, positions)
    logits, past = session.forward(ids[:, :6].numpy(), positions[:, :6].numpy())
    steps = [logits]
    for t in range(6, 9):
        logits, past = session.forward(ids[:, t:t + 1].numpy(), positions[:, t:t + 1].numpy(), past)
        steps.append(logits)
    assert past[0].shape[2] == 9  # the cache grew by one per step
    np.testing.assert_allclose(np.concatenate(steps, axis=1), expected, atol=ATOL, rtol=RTOL)


def test_exported_graph_uses_onnxruntime_fused_operators(exported):
    name, model, options, info, _ = exported
    graph = onnx.load(info.path).graph
    ops = [(n.domain, n.op_type) for n in graph.node]
    layers = model.config.num_hidden_layers
    assert ops.count(("com.microsoft", "GroupQueryAttention")) == layers
    if options:
        # Every linear layer is quantized, and siblings without bias share one MatMulNBits:
        # gate/up always, q/k/v unless they have biases (Qwen2); and lm_head.
        per_layer = 6 if model.model.layers[0].self_attn.q_proj.bias is not None else 4
        assert ops.count(("com.microsoft", "MatMulNBits")) == per_layer * layers + 1 == info.quantized_linears
        # Float MatMuls left: the rotary embedding's position product, and for int4 the block
        # offsets (llmopt's float zeros, (K / group, N)): none reads a (K, N) float weight.
        shapes = {i.name: tuple(i.dims) for i in graph.initializer}
        widths = (model.config.hidden_size, model.config.intermediate_size)
        block_rows = {k // options["group_size"] for k in widths} if options["quantize"] == "int4" else set()
        read = [shapes[i] for n in graph.node if n.op_type in ("MatMul", "Gemm") for i in n.input if i in shapes]
        assert all(len(shape) == 2 and shape[0] in block_rows for shape in read), read
    names = [i.name for i in graph.input]
    assert names[:2] == ["input_ids", "position_ids"]
    assert names[2:] == [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    assert [o.name for o in graph.output] == ["logits"] + [
        f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


@pytest.mark.parametrize("exported", ["llama-gqa"], indirect=True)  # one model is enough for the loop
def test_greedy_generation_is_token_identical_to_llmopt(exported):
    _, model, options, _, session = exported
    from llmopt.runtime.generate import generate

    prompt = [3, 17, 99, 4, 250, 8]
    compiled = torch.compile(model, backend="llmopt", options={"lower": "eager", "kernels": EXACT, **options})
    expected, _ = generate(compiled, None, torch.tensor([prompt]), 12, eos_token_ids=())
    assert session.generate_greedy(prompt, 12) == expected


def test_without_kv_cache_a_hand_written_gpt_exports_with_only_the_token_inputs(tmp_path):
    # Not Hugging Face: called as model(input_ids, position_ids); its attention is
    # matmul/softmax with a tril mask, fused by llmopt and exported as GroupQueryAttention.
    model = random_handwritten_gpt()
    info = export_onnx(model, tmp_path / "gpt.onnx", kv_cache=False)
    session = ort.InferenceSession(info.path, providers=PROVIDERS)
    assert [i.name for i in session.get_inputs()] == ["input_ids", "position_ids"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    ids, positions = _inputs(vocab=model.config.vocab_size)
    (logits,) = session.run(None, {"input_ids": ids.numpy(), "position_ids": positions.numpy()})
    np.testing.assert_allclose(logits, _llmopt_logits(model, {}, ids, positions), atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------- what cannot be exported


def test_fp8_linears_are_refused_by_operator_name(tmp_path):
    with pytest.raises(OnnxExportError, match=r"llmopt::linear_fp8 \(at model\.layers\.0\.self_attn\.q_proj\)"):
        export_onnx(random_llama("gqa"), tmp_path / "m.onnx", options={"quantize": "fp8"})


def test_an_operator_without_translation_is_named_with_its_place(tmp_path):
    @torch.library.custom_op("llmopt_test::mystery_norm", mutates_args=())
    def mystery_norm(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @mystery_norm.register_fake
    def _(x):
        return torch.empty_like(x)

    class MysteryNorm(torch.nn.Module):
        def forward(self, x):
            return mystery_norm(x)

    model = random_llama("gqa", num_layers=1)
    model.model.norm = MysteryNorm()
    with pytest.raises(OnnxExportError, match=r"operator llmopt_test::mystery_norm \(at model\.norm\) has no ONNX"):
        export_onnx(model, tmp_path / "m.onnx")


def test_options_that_cannot_be_exported_are_refused(tmp_path):
    with pytest.raises(OnnxExportError, match="paged_kv"):
        export_onnx(random_llama("gqa"), tmp_path / "m.onnx", options={"paged_kv": True})
    with pytest.raises(llmopt.LLMOptConfigError, match="unknown llmopt option"):
        export_onnx(random_llama("gqa"), tmp_path / "m.onnx", options={"quantise": "int4"})
    with pytest.raises(OnnxExportError, match="training mode"):
        export_onnx(random_llama("gqa").train(), tmp_path / "m.onnx")
