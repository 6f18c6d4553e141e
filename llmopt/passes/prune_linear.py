"""Prune the weights of linear layers (``prune`` option: unstructured or 2:4).

Each ``F.linear`` whose weight is a parameter of the user's model gets a
pruned copy of that weight, installed on the graph module as a buffer and
read through a ``get_attr`` node; the user's module keeps its original
weights. The parameter's placeholder stays (Dynamo still passes it) but goes
unused.

2:4 uses PyTorch's semi-structured sparse tensors
(``torch.sparse.to_sparse_semi_structured``) on CUDA GPUs with compute
capability 8.0 or higher; elsewhere (CPU included) the weight is stored dense
with the zeros in place, which is what the pass notes say. Unstructured
sparsity is always stored dense: it changes quality, not speed.

Heads and channels shrink layers and are applied to the model before
compiling (:func:`llmopt.pruning.prune_model`); see llmopt/pruning/__init__.py.
"""

from __future__ import annotations


import torch
from torch.fx import GraphModule, Node

from llmopt.passes.base import GraphPass, PassContext, PassResult, Rewrite, Skipped
from llmopt.passes.graph_utils import LINEAR_FUNCTIONS, fake_value, get_constant, install_constant, module_path, \
    node_arg

KIND = "prune"
BUFFER_PREFIX = "llmopt_pruned_"
DENSE_NOTE = "unstructured sparsity stored dense (zeros in place)"


class PruneLinear(GraphPass):
    name = "prune_linear"

    def enabled(self, config) -> bool:
        return getattr(config, "prune", None) is not None and super().enabled(config)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        config = ctx.config.prune
        if config.structured:
            raise ValueError(
                f"prune pattern {config.pattern!r} cannot run in the backend; use llmopt.pruning.prune_model"
            )
        if ctx.training:
            # The pruned copies are constants: the user's weights would get no gradient.
            raise ValueError("pruning is for inference; this graph is being trained (gradients required)")
        result = PassResult()
        installed: dict[str, str] = {}  # parameter path -> buffer name (a weight used twice is pruned once)
        notes: set[str] = set()
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in LINEAR_FUNCTIONS:
                continue
            weight = node_arg(node, 1, "weight")
            why, path = _why_not(node, weight, ctx, config)
            if why:
                result.skipped.append(Skipped(KIND, path or _name(weight), why))
                continue
            if path not in installed:
                value = ctx.parameter_value(gm, path)
                dense = _pruned(value, path, config)
                stored, note = _semi_structured(dense) if config.pattern == "2:4" else (dense, DENSE_NOTE)
                notes.add(note)
                installed[path] = install_constant(gm, BUFFER_PREFIX, path, stored)
                result.rewrites.append(Rewrite(KIND, path[: -len(".weight")], _detail(dense, config)))
            with gm.graph.inserting_before(node):
                attr = get_constant(gm, installed[path], like=weight)
            node.replace_input_with(weight, attr)
        result.notes.extend(sorted(notes))
        return result


def _name(value) -> str:
    return value.name if isinstance(value, Node) else repr(value)


def _why_not(node: Node, weight, ctx: PassContext, config) -> tuple[str, str | None]:
    """Why this linear's weight is left alone ("" if it is pruned), and its parameter path."""
    if not isinstance(weight, Node) or weight.op != "placeholder":
        return "weight is computed in the graph, not a parameter", None
    path = ctx.parameters.get(weight.name)
    if path is None or not path.endswith(".weight"):
        return "weight is a graph input, not a parameter", None
    # The calling module counts too: a tied output head reads the embedding's weight.
    if config.skips(path[: -len(".weight")]) or config.skips(module_path(node)):
        return f"excluded by prune option 'skip' {config.skip!r} (called from {module_path(node)})", path
    value = fake_value(weight)
    if value is None or value.dim() != 2:
        return "weight is not a 2-D matrix", path
    if config.pattern == "2:4" and value.shape[1] % 4:
        return f"2:4 needs in_features divisible by 4, got {value.shape[1]}", path
    return "", path


def _pruned(value: torch.Tensor, path: str, config) -> torch.Tensor:
    from llmopt.pruning.masks import weight_mask  # late: keeps the pass import light

    if isinstance(value, torch._subclasses.FakeTensor):
        raise RuntimeError("the backend was given fake parameters; pruning needs their values")
    module = path[: -len(".weight")]
    norms = None
    if config.method == "wanda":
        if module not in config.calibration:
            raise KeyError(f"prune calibration has no activation norms for {module!r}")
        norms = config.calibration[module]
    weight = value.detach()
    return weight * weight_mask(weight, config, norms).to(weight.device)


def _semi_structured(dense: torch.Tensor) -> tuple[torch.Tensor, str]:
    """A semi-structured sparse weight where the GPU supports it, else the dense masked one."""
    reason = _semi_structured_unavailable(dense)
    if reason:
        return dense, f"2:4 stored dense with zeros ({reason})"
    try:
        return torch.sparse.to_sparse_semi_structured(dense), "2:4 stored as semi-structured sparse tensors"
    except (RuntimeError, ValueError) as error:  # shape or dtype the sparse kernels do not take
        return dense, f"2:4 stored dense with zeros (to_sparse_semi_structured: {error})"


def _semi_structured_unavailable(weight: torch.Tensor) -> str:
    if weight.device.type != "cuda":
        return f"semi-structured sparse kernels need a CUDA GPU; weights are on {weight.device.type}"
    if torch.cuda.get_device_capability(weight.device) < (8, 0):
        return "semi-structured sparse kernels need compute capability 8.0 or higher"
    if weight.dtype not in (torch.float16, torch.bfloat16):
        return f"semi-structured sparse kernels take float16/bfloat16 weights, not {weight.dtype}"
    return ""


def _detail(dense: torch.Tensor, config) -> str:
    zeros = dense.numel() - int(torch.count_nonzero(dense))
    return f"{config.describe()}: {zeros}/{dense.numel()} weights zero"
