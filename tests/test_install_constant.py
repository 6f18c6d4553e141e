"""One helper installs constants on a graph module (passes/graph_utils.install_constant)."""

import pathlib

import torch
import torch.fx

from llmopt.passes.graph_utils import get_constant, install_constant

ROOT = pathlib.Path(__file__).resolve().parents[1] / "llmopt"


def test_installed_constants_are_read_by_get_attr_nodes():
    def f(x):
        return x + 1

    gm = torch.fx.symbolic_trace(f)
    add = next(n for n in gm.graph.nodes if n.op == "call_function")
    a, b = torch.randn(3), torch.randn(3)
    first = install_constant(gm, "llmopt_test_", "model.layers.0.w", a)
    second = install_constant(gm, "llmopt_test_", "model.layers.0.w", b)  # same hint: a second name
    assert first == "llmopt_test_model_layers_0_w" and second == first + "_"
    assert getattr(gm, first) is a and getattr(gm, second) is b
    assert first in dict(gm.named_buffers())
    with gm.graph.inserting_before(add):
        na, nb = get_constant(gm, first), get_constant(gm, second)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(output):
        out = gm.graph.call_function(torch.mul, (add, na))
        out = gm.graph.call_function(torch.sub, (out, nb))
    output.args = (out,)
    gm.graph.lint()
    gm.recompile()
    x = torch.randn(3)
    torch.testing.assert_close(gm(x), (x + 1) * a - b, rtol=0, atol=0)


def test_dynamo_source_table_names_the_constant():
    def f(x):
        return x

    gm = torch.fx.symbolic_trace(f)
    gm._param_name_to_source = {}
    name = install_constant(gm, "p_", "w", torch.ones(2))
    from torch._dynamo.source import ConstantSource

    assert gm._param_name_to_source[name] == ConstantSource(name)


def test_no_other_module_registers_buffers_on_graphs():
    """Passes and the export's graph steps install tensors only through the helper."""
    offenders = []
    for path in list((ROOT / "passes").rglob("*.py")) + list((ROOT / "onnx").rglob("*.py")):
        if path.name == "graph_utils.py":
            continue
        text = path.read_text()
        for needle in ("register_buffer(", "ConstantSource("):
            if needle in text:
                offenders.append(f"{path.relative_to(ROOT.parent)}: {needle}")
    assert not offenders, offenders
