"""The llmopt backend end to end: registration, options, outputs, gradients, fallback, report."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import llmopt
from llmopt.models import random_handwritten_gpt, random_llama
from llmopt.passes.fuse_attention import FuseAttention

# fp32 logits of O(10). With lower="eager" the only change is SDPA -> the
# fused CPU flash kernel (same math, other summation order): ~1e-6 relative.
# Inductor also fuses and reorders the reductions of every norm and matmul,
# so errors grow with depth; observed ~1e-5 on 2-layer models, 8e-5 on 30.
TOL = {"eager": dict(atol=1e-5, rtol=1e-5), "inductor": dict(atol=2e-4, rtol=1e-4)}

LOWERINGS = ["eager", "inductor"]


def _tokens(batch=2, length=11, vocab=256, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


# ---------------------------------------------------------------- registration


def test_entry_point_registers_backend_in_fresh_interpreter():
    code = textwrap.dedent(
        """
        import sys, torch
        assert "llmopt" not in sys.modules
        assert "llmopt" in torch._dynamo.list_backends(exclude_tags=())
        f = torch.compile(lambda x: torch.sin(x) * 2, backend="llmopt", options={"lower": "eager"})
        x = torch.arange(4.0)
        assert torch.equal(f(x), torch.sin(x) * 2)
        print("ok", "llmopt" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok", "True"]


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    "options, message",
    [
        ({"lowr": "eager"}, "unknown llmopt option 'lowr'; valid options are 'lower'"),
        ({"lower": "tvm"}, "option 'lower' got 'tvm'; valid choices are 'inductor', 'eager'"),
        ({"lower": "onnx"}, "'onnx' is not a torch.compile lowering"),
        ({"strict": "yes"}, "option 'strict' must be True or False"),
        ({"disable_passes": ["fuse_attn"]}, "option 'disable_passes' got 'fuse_attn'; valid choices are 'fuse_attention'"),
        ({"disable_passes": "fuse_attention"}, "must be a list of pass names"),
    ],
)
def test_bad_options_raise_clear_errors(options, message):
    with pytest.raises(llmopt.LLMOptConfigError, match=message.replace("(", r"\(")):
        llmopt.LLMOptConfig.from_options(options)
    # ... and the same error reaches the user through torch.compile.
    compiled = torch.compile(torch.nn.Linear(2, 2), backend="llmopt", options=options)
    with pytest.raises(Exception, match="llmopt option|option '"):
        compiled(torch.ones(1, 2))


def test_options_reach_backend_as_config():
    model = random_llama(heads="gqa")
    ids = _tokens()
    torch.compile(model, backend="llmopt", options={"lower": "eager", "attention": False})(ids)
    report = llmopt.last_report()
    assert report.count("attention") == 0
    assert report.graphs[0].lowering == "eager"
    assert any(p.status == "skipped (disabled)" for p in report.graphs[0].passes)


# ---------------------------------------------------------------- outputs equal eager


@pytest.mark.parametrize("lower", LOWERINGS)
@pytest.mark.parametrize("heads", ["mha", "gqa", "mqa"])
def test_random_llama_matches_eager(lower, heads):
    model = random_llama(heads=heads, num_layers=2)
    ids = _tokens()
    with torch.no_grad():
        want = model(ids).logits
        got = torch.compile(model, backend="llmopt", options={"lower": lower})(ids).logits
    torch.testing.assert_close(got, want, **TOL[lower])
    assert llmopt.last_report().count("attention") == 2  # every layer's attention rewritten


@pytest.mark.parametrize("lower", LOWERINGS)
def test_handwritten_gpt_matches_eager(lower):
    model = random_handwritten_gpt()
    ids = _tokens(vocab=model.config.vocab_size)
    with torch.no_grad():
        want = _logits(model(ids))
        got = _logits(torch.compile(model, backend="llmopt", options={"lower": lower})(ids))
    torch.testing.assert_close(got, want, **TOL[lower])
    assert llmopt.last_report().count("attention") == model.config.num_layers  # plain matmul/softmax code


# ---------------------------------------------------------------- gradients equal eager


@pytest.mark.parametrize("lower", LOWERINGS)
def test_gradients_match_eager(lower):
    model = random_llama(heads="gqa", num_layers=2).train()
    ids = _tokens()

    def loss_and_grads(fn):
        model.zero_grad(set_to_none=True)
        logits = fn(ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    want_loss, want = loss_and_grads(model)
    got_loss, got = loss_and_grads(torch.compile(model, backend="llmopt", options={"lower": lower}))
    assert llmopt.last_report().count("attention") == 2  # the grads below went through llmopt::attention
    torch.testing.assert_close(got_loss, want_loss, **TOL[lower])
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL[lower], msg=name)


# ---------------------------------------------------------------- fallback and strict


def _broken_run(self, gm, ctx):
    # Leave the graph half-edited, then fail: the pipeline must undo both.
    for node in gm.graph.nodes:
        if node.op == "call_function":
            node.target = torch.cos
            break
    raise RuntimeError("deliberate failure for the test")


def test_failing_pass_warns_and_keeps_results_correct(monkeypatch):
    monkeypatch.setattr(FuseAttention, "run", _broken_run)
    model = random_llama(heads="gqa")
    ids = _tokens()
    with torch.no_grad():
        want = model(ids).logits
        with pytest.warns(llmopt.LLMOptWarning, match="fuse_attention.*deliberate failure"):
            got = torch.compile(model, backend="llmopt", options={"lower": "eager"})(ids).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    report = llmopt.last_report()
    assert report.count("attention") == 0
    assert "deliberate failure" in report.failures()[0]


def test_failing_pass_raises_when_strict(monkeypatch):
    monkeypatch.setattr(FuseAttention, "run", _broken_run)
    compiled = torch.compile(random_llama(), backend="llmopt", options={"lower": "eager", "strict": True})
    with pytest.raises(Exception, match="fuse_attention.*deliberate failure"):
        compiled(_tokens())


def test_pass_breaking_output_shapes_is_undone(monkeypatch):
    original = FuseAttention.run

    def shape_breaking_run(self, gm, ctx):
        result = original(self, gm, ctx)
        out = next(n for n in gm.graph.nodes if n.op == "output")
        first = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]
        with gm.graph.inserting_before(out):
            flat = gm.graph.call_method("flatten", (first,))
        out.args = ((flat, *out.args[0][1:]),) if isinstance(out.args[0], (tuple, list)) else (flat,)
        return result

    monkeypatch.setattr(FuseAttention, "run", shape_breaking_run)
    model = random_llama(heads="mha")
    ids = _tokens()
    with torch.no_grad():
        want = model(ids).logits
        with pytest.warns(llmopt.LLMOptWarning, match="output 0 changed"):
            got = torch.compile(model, backend="llmopt", options={"lower": "eager"})(ids).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_failing_lowering_falls_back_to_eager(monkeypatch):
    import llmopt.backends as backends

    def boom(gm, example_inputs):
        raise RuntimeError("no compiler today")

    monkeypatch.setitem(backends.LOWERINGS, "inductor", boom)
    model = random_llama(heads="gqa")
    ids = _tokens()
    with torch.no_grad():
        want = model(ids).logits
        with pytest.warns(llmopt.LLMOptWarning, match="lowering to 'inductor' failed"):
            got = torch.compile(model, backend="llmopt")(ids).logits
    torch.testing.assert_close(got, want, **TOL["eager"])
    assert llmopt.last_report().graphs[0].lowering_status == "failed, ran eagerly"


# ---------------------------------------------------------------- parameters by module path


def test_passes_see_parameters_by_module_path(monkeypatch):
    seen = {}
    original = FuseAttention.run

    def spy(self, gm, ctx):
        seen.update(ctx.parameters)
        seen["_value"] = ctx.parameter_value(gm, "model.layers.1.self_attn.k_proj.weight")
        return original(self, gm, ctx)

    monkeypatch.setattr(FuseAttention, "run", spy)
    model = random_llama(heads="gqa", num_layers=2)
    torch.compile(model, backend="llmopt", options={"lower": "eager"})(_tokens())
    paths = set(seen.values()) - {seen["_value"]}
    expected = {n for n, _ in model.named_parameters()}
    assert expected <= {p for p in paths if isinstance(p, str)}
    assert seen["_value"] is model.model.layers[1].self_attn.k_proj.weight


# ---------------------------------------------------------------- report and explain


def test_explain_reports_rewrites_unmatched_and_op_counts():
    class TwoAttentions(torch.nn.Module):
        def forward(self, q, k, v):
            fused = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            # 3-D (no heads axis): left to PyTorch, with the reason in the report
            left = F.scaled_dot_product_attention(q[0], k[0], v[0])
            return fused, left

    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    report = llmopt.explain(TwoAttentions(), q, k, v)
    assert report.count("attention") == 1
    [left] = report.unmatched("attention")
    assert "q/k/v are 3/3/3-D; expected 4-D" in left.reason
    assert report.ops_before()["sdpa"] == 2
    assert report.ops_after()["sdpa"] == 1 and report.ops_after()["llmopt.attention"] == 1
    text = str(report)
    assert "fuse_attention" in text and "expected 4-D" in text and "llmopt.attention" in text


def test_explain_names_each_layer_location():
    report = llmopt.explain(random_llama(heads="mqa", num_layers=3), _tokens())
    locations = [r.location for r in report.rewrites("attention")]
    assert locations == [f"model.layers.{i}.self_attn" for i in range(3)]
    # The kernel reads the one shared KV head, whether the model repeated it
    # (transformers <= 5.2x: expand+reshape, removed) or passed enable_gqa.
    assert all("4q/1kv heads" in r.detail for r in report.rewrites("attention"))


def test_debug_log_shows_graphs_before_and_after_each_pass():
    code = textwrap.dedent(
        """
        import torch, torch.nn.functional as F
        f = torch.compile(lambda q: F.scaled_dot_product_attention(q, q, q), backend="llmopt",
                          options={"lower": "eager"})
        f(torch.randn(1, 2, 4, 8))
        """
    )
    env = dict(os.environ, LLMOPT_LOG="debug")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "graph 0 before fuse_attention" in out.stderr
    assert "graph 0 after fuse_attention" in out.stderr
    assert "llmopt.attention" in out.stderr


# ---------------------------------------------------------------- SmolLM2 (the embedded default)


@pytest.mark.slow
@pytest.mark.parametrize("lower", LOWERINGS)
def test_smollm2_matches_eager(smollm2, lower):
    model, tokenizer = smollm2
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 3, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = model(ids).logits
        got = torch.compile(model, backend="llmopt", options={"lower": lower})(ids).logits
    # 30 layers: Inductor's reordered reductions add up to ~1e-4 on logits of ~40.
    tol = dict(atol=1e-3, rtol=1e-4) if lower == "inductor" else TOL["eager"]
    torch.testing.assert_close(got, want, **tol)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert llmopt.last_report().count("attention") == model.config.num_hidden_layers == 30
