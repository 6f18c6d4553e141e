"""The TensorRT lowering: settings, partition plan, missing-package errors, and (with a GPU) real TensorRT.

Everything but the last test runs without torch-tensorrt: the settings are
translated against the field names of Torch-TensorRT's CompilationSettings,
and the partition plan is computed on real rewritten graphs.
"""

import importlib.util
import sys

import pytest
import torch

import llmopt
from llmopt.backends import tensorrt as trt
from llmopt.backends.tensorrt import (
    TensorRTNotInstalled,
    TensorRTSettings,
    plan_partition,
)
from llmopt.models import random_llama
from llmopt.rewriter.backend import LLMOptLoweringError, llmopt_backend

# Field names of torch_tensorrt.dynamo.CompilationSettings, the part the
# settings builder reads, in two generations: a release with weak typing
# (enabled_precisions, use_explicit_typing) and a strongly typed one (2.14,
# read from its wheel), which has neither.
WEAKLY_TYPED_FIELDS = {
    "enabled_precisions", "use_explicit_typing", "workspace_size", "min_block_size",
    "torch_executed_ops", "pass_through_build_failures", "optimization_level", "use_python_runtime",
}
STRONGLY_TYPED_FIELDS = {
    "workspace_size", "min_block_size", "torch_executed_ops", "pass_through_build_failures",
    "optimization_level", "enable_autocast", "autocast_low_precision_type",
}

HAVE_REAL_TENSORRT = importlib.util.find_spec("torch_tensorrt") is not None and torch.cuda.is_available()
REAL_TENSORRT_SKIP = (
    "needs torch-tensorrt and a CUDA GPU"
    + ("" if importlib.util.find_spec("torch_tensorrt") else "; torch-tensorrt is not installed")
    + ("" if torch.cuda.is_available() else "; no CUDA device")
)


def _tokens(batch=1, length=9, seed=0):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def rewritten_graph(model, ids, **options):
    """The Dynamo graph of ``model`` after llmopt's passes (lowered eagerly), as TensorRT
    would get it: route_dense_linear (a CPU kernel choice) is off under lower="tensorrt"."""
    captured = []

    def backend(gm, example_inputs):
        compiled = llmopt_backend(gm, example_inputs, options={"lower": "eager",
                                                               "disable_passes": ["route_dense_linear"], **options})
        captured.append(gm)  # rewritten in place by the passes
        return compiled

    with torch.no_grad():
        torch.compile(model, backend=backend)(ids)
    assert len(captured) == 1
    return captured[0]


@pytest.fixture(scope="module")
def llama_graph():
    torch._dynamo.reset()
    return rewritten_graph(random_llama(heads="gqa", num_layers=2), _tokens())


# ---------------------------------------------------------------- settings


def test_options_build_tensorrt_settings():
    config = llmopt.LLMOptConfig.from_options(
        {"lower": "tensorrt", "tensorrt": {"precision": "fp16", "min_block_size": 3, "torch_executed_ops": ["x"]}}
    )
    assert config.tensorrt == TensorRTSettings(precision="fp16", min_block_size=3, torch_executed_ops=("x",))
    assert llmopt.LLMOptConfig.from_options({"lower": "tensorrt"}).tensorrt is None  # defaults when lowering


@pytest.mark.parametrize(
    "options, message",
    [
        ({"lower": "tensorrt", "tensorrt": {"precison": "fp16"}}, "unknown tensorrt option 'precison'; valid options are 'precision'"),
        ({"lower": "tensorrt", "tensorrt": {"precision": "int8"}}, "tensorrt option 'precision' got 'int8'"),
        ({"lower": "tensorrt", "tensorrt": {"min_block_size": 0}}, "'min_block_size' must be an integer >= 1, got 0"),
        ({"lower": "tensorrt", "tensorrt": {"workspace_size": True}}, "'workspace_size' must be an integer >= 0"),
        ({"lower": "tensorrt", "tensorrt": {"optimization_level": 6}}, r"'optimization_level' must be an integer in \[0, 5\]"),
        ({"lower": "tensorrt", "tensorrt": {"torch_executed_ops": "aten.mm"}}, "must be a list of op names"),
        ({"lower": "tensorrt", "tensorrt": 5}, "option 'tensorrt' must be a dict"),
        ({"lower": "inductor", "tensorrt": {}}, "option 'tensorrt' applies only with lower='tensorrt'"),
        ({"lower": "onnx"}, r"'onnx' is not a torch.compile lowering; export the model with llmopt.export_onnx"),
    ],
)
def test_bad_tensorrt_options_raise(options, message):
    with pytest.raises(llmopt.LLMOptConfigError, match=message):
        llmopt.LLMOptConfig.from_options(options)


def test_llmopt_ops_are_named_for_torch_executed_ops():
    names = trt.llmopt_op_names()
    for expected in ("attention", "linear_int8", "linear_int4", "paged_attention_layer"):
        assert f"torch.ops.llmopt.{expected}.default" in names
    for name in names:  # each one names a real llmopt overload
        _, _, namespace, op, overload = name.split(".")
        target = getattr(getattr(getattr(torch.ops, namespace), op), overload)
        assert isinstance(target, torch._ops.OpOverload) and target.namespace == "llmopt"


def test_compile_options_keep_llmopt_ops_in_pytorch():
    settings = TensorRTSettings(min_block_size=7, workspace_size=1 << 30, optimization_level=4,
                                torch_executed_ops=("torch.ops.aten.embedding.default",))
    options, ignored = settings.compile_options(STRONGLY_TYPED_FIELDS)
    assert ignored == []
    assert options["min_block_size"] == 7 and options["workspace_size"] == 1 << 30
    assert options["optimization_level"] == 4
    assert options["pass_through_build_failures"] is False
    assert options["torch_executed_ops"] == set(trt.llmopt_op_names()) | {"torch.ops.aten.embedding.default"}
    assert not {"enabled_precisions", "enable_autocast"} & options.keys()  # the graph's dtypes decide


def test_strict_passes_build_failures_through():
    options, _ = TensorRTSettings().compile_options(STRONGLY_TYPED_FIELDS, pass_through_build_failures=True)
    assert options["pass_through_build_failures"] is True
    assert "optimization_level" not in options  # unset: TensorRT's default


def test_precision_on_a_weakly_typed_release():
    options, ignored = TensorRTSettings(precision="fp16").compile_options(WEAKLY_TYPED_FIELDS)
    assert options["enabled_precisions"] == {torch.float16}
    assert options["use_explicit_typing"] is False  # otherwise such releases refuse enabled_precisions
    assert ignored == []
    options, _ = TensorRTSettings(precision="bf16").compile_options(WEAKLY_TYPED_FIELDS - {"use_explicit_typing"})
    assert options["enabled_precisions"] == {torch.bfloat16} and "use_explicit_typing" not in options


def test_precision_on_a_strongly_typed_release():
    options, _ = TensorRTSettings(precision="fp32").compile_options(STRONGLY_TYPED_FIELDS)
    assert "enabled_precisions" not in options and "enable_autocast" not in options
    with pytest.raises(RuntimeError, match="strongly typed.*cast the model to torch.float16"):
        TensorRTSettings(precision="fp16").compile_options(STRONGLY_TYPED_FIELDS)


def test_settings_a_release_lacks_are_reported_not_passed():
    available = STRONGLY_TYPED_FIELDS - {"optimization_level", "workspace_size"}
    options, ignored = TensorRTSettings(optimization_level=2).compile_options(available)
    assert ignored == ["optimization_level", "workspace_size"]
    assert set(options) <= available


# ---------------------------------------------------------------- partition plan


def _call_nodes(gm):
    return {n.name: n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")}


def test_plan_puts_attention_in_pytorch_between_engines(llama_graph):
    plan = plan_partition(llama_graph)
    nodes = _call_nodes(llama_graph)
    kinds = [s.runs_in for s in plan.segments]
    assert kinds == ["tensorrt", "pytorch", "tensorrt", "pytorch", "tensorrt"]  # one engine around each layer's attention
    assert plan.num_engines == 3

    for segment in plan.segments_in("pytorch"):
        assert segment.reason == "llmopt op"
        assert segment.ops == ("llmopt.attention", "getitem")  # the op and the output it is read by
        assert nodes[segment.nodes[0]].target is torch.ops.llmopt.attention.default
    for segment in plan.segments_in("tensorrt"):
        assert not any(op.startswith("llmopt.") for op in segment.ops)
        assert len(segment) >= trt.DEFAULT_MIN_BLOCK_SIZE

    # Every tensor-valued node is placed exactly once; only shape bookkeeping is left out.
    placed = [name for s in plan.segments for name in s.nodes]
    assert len(placed) == len(set(placed))
    for name, node in nodes.items():
        if name not in placed:
            assert not isinstance(node.meta.get("example_value"), torch.Tensor), name
    assert "attention" in plan.summary() and "llmopt op" in plan.summary()


def test_plan_without_llmopt_attention_is_one_engine():
    graph = rewritten_graph(random_llama(heads="gqa", num_layers=2), _tokens(), attention=False)
    plan = plan_partition(graph)
    assert [s.runs_in for s in plan.segments] == ["tensorrt"]  # SDPA stays for TensorRT's own converter
    assert "sdpa" in plan.segments[0].ops


def test_plan_moves_small_blocks_and_unsupported_ops_to_pytorch(llama_graph):
    everything = plan_partition(llama_graph, TensorRTSettings(min_block_size=10_000))
    assert everything.num_engines == 0 and len(everything.segments) == 1
    assert everything.segments[0].reason == "below min_block_size, llmopt op"

    plan = plan_partition(llama_graph, supported=lambda node: "silu" not in str(node.target))
    silu = [s for s in plan.segments if "silu" in s.ops]
    assert len(silu) == 2 and all(s.runs_in == "pytorch" and s.reason == "unsupported" for s in silu)
    assert plan.num_engines == 5  # each layer's MLP is split at its activation


def test_plan_keeps_quantized_linears_in_pytorch():
    graph = rewritten_graph(random_llama(heads="gqa", num_layers=1), _tokens(), quantize="int8")
    plan = plan_partition(graph)
    in_trt = [op for s in plan.segments_in("tensorrt") for op in s.ops]
    in_torch = [op for s in plan.segments_in("pytorch") for op in s.ops]
    assert in_torch.count("llmopt.linear_int8") == 5  # q/k/v (one call), o, gate/up (one call), down, lm_head
    assert not any(op.startswith("llmopt.") for op in in_trt)
    assert "linear" not in in_trt  # every float linear was replaced
    assert plan.num_engines >= 1  # the norms and rotary embeddings still form engines


# ---------------------------------------------------------------- without torch-tensorrt


@pytest.fixture
def no_torch_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)  # import fails as if not installed


def test_missing_package_error_says_how_to_install(no_torch_tensorrt):
    with pytest.raises(TensorRTNotInstalled) as error:
        trt.import_torch_tensorrt()
    message = str(error.value)
    assert "needs torch-tensorrt, which is not installed" in message
    assert 'pip install "llmopt[tensorrt]"' in message
    assert torch.__version__.split("+")[0] in message  # the release must match this torch


class _BrokenTorchTensorRT:
    """A finder that makes ``import torch_tensorrt`` fail as a broken install does."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch_tensorrt":
            raise ImportError("libnvinfer.so.10: cannot open shared object file")


def test_broken_install_is_told_apart(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch_tensorrt", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BrokenTorchTensorRT(), *sys.meta_path])
    with pytest.raises(TensorRTNotInstalled, match="installed but cannot be imported.*libnvinfer"):
        trt.import_torch_tensorrt()


def test_compile_without_tensorrt_warns_and_runs_eagerly(no_torch_tensorrt):
    model = random_llama(heads="gqa", num_layers=1)
    ids = _tokens()
    with torch.no_grad():
        want = model(ids).logits
        with pytest.warns(llmopt.LLMOptWarning, match=r'lowering to .tensorrt. failed.*pip install "llmopt\[tensorrt\]"'):
            got = torch.compile(model, backend="llmopt", options={"lower": "tensorrt"})(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    graph = llmopt.last_report().graphs[0]
    assert graph.lowering == "tensorrt" and graph.lowering_status == "failed, ran eagerly"


def test_strict_compile_without_tensorrt_raises(no_torch_tensorrt):
    model = random_llama(heads="gqa", num_layers=1)
    compiled = torch.compile(model, backend="llmopt", options={"lower": "tensorrt", "strict": True})
    with torch.no_grad(), pytest.raises(Exception, match=r'needs torch-tensorrt.*pip install "llmopt\[tensorrt\]"') as error:
        compiled(_tokens())
    chain = [error.value]  # Dynamo wraps what the backend raised
    while (chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    assert [type(e) for e in chain if isinstance(e, (LLMOptLoweringError, TensorRTNotInstalled))] == [
        LLMOptLoweringError, TensorRTNotInstalled]


def test_inputs_must_be_cuda_and_inference():
    with pytest.raises(RuntimeError, match="runs on CUDA devices; this graph's inputs are on cpu"):
        trt.check_inference_on_cuda([torch.ones(2), 3])
    with torch._subclasses.fake_tensor.FakeTensorMode():  # CUDA tensors without a GPU
        weight = torch.empty(2, 2, device="cuda", requires_grad=True)
        x = torch.empty(2, device="cuda")
    with pytest.raises(RuntimeError, match="builds inference engines"):
        trt.check_inference_on_cuda([x, weight])
    with torch.no_grad():
        trt.check_inference_on_cuda([x, weight])  # parameters need no grad under no_grad


# ---------------------------------------------------------------- real TensorRT


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_REAL_TENSORRT, reason=REAL_TENSORRT_SKIP)
def test_random_llama_on_real_tensorrt():
    model = random_llama(heads="gqa", num_layers=2).cuda().half()
    ids = _tokens().cuda()
    with torch.no_grad():
        want = model(ids).logits.float()
        compiled = torch.compile(model, backend="llmopt",
                                 options={"lower": "tensorrt", "strict": True, "tensorrt": {"min_block_size": 3}})
        got = compiled(ids).logits.float()
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)  # fp16 engines vs fp16 eager
    report = llmopt.last_report()
    assert report.count("attention") == 2
    assert report.graphs[0].lowering_status == "ok"
