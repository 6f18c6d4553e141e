"""Hand the rewritten graph to Torch-TensorRT (``options={"lower": "tensorrt"}``).

Three parts, so that all but the last can be checked without TensorRT:

* :class:`TensorRTSettings`: llmopt's ``tensorrt`` option, validated, and its
  translation into the ``options`` of Torch-TensorRT's ``torch.compile``
  backend (:meth:`TensorRTSettings.compile_options`). Every llmopt custom op
  (``torch.ops.llmopt.*``) goes into ``torch_executed_ops``: TensorRT has no
  converter for them, and naming them makes the split explicit, so they run in
  PyTorch between the engines.
* :func:`plan_partition`: which nodes of the rewritten Dynamo graph would go to
  TensorRT engines and which stay in PyTorch, as segments in graph order. An
  estimate: Torch-TensorRT partitions the ATen graph it gets after its own
  AOTAutograd trace and decompositions, and its converter coverage (unknown
  without TensorRT) has the last word.
* :func:`lower_tensorrt`: the call into ``torch_tensorrt``. Its ``torch.compile``
  backend takes Dynamo-level graphs such as ours and runs AOTAutograd itself
  (``aot_export_joint_simple``), as Inductor's ``compile_fx`` does, so the graph
  is passed as it is. Without the package the error says how to install it.
"""

from __future__ import annotations

import dataclasses
import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping, Optional, Sequence

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import _get_qualified_name

from llmopt.backends.tensorrt_settings import (  # noqa: F401  (the option group, re-exported)
    DEFAULT_MIN_BLOCK_SIZE,
    PRECISIONS,
    TensorRTSettings,
    llmopt_op_names,
)
from llmopt.rewriter.log import logger, warn_fallback

INSTALL_HINT = 'pip install "llmopt[tensorrt]"'

RUNS_IN_TENSORRT = "tensorrt"
RUNS_IN_PYTORCH = "pytorch"


class TensorRTNotInstalled(ImportError):
    """``lower="tensorrt"`` was asked for but torch-tensorrt cannot be imported."""


# ---------------------------------------------------------------- partition plan


@dataclass(frozen=True)
class Segment:
    """A run of graph nodes, in graph order, that goes to one place.

    ``runs_in`` is ``"tensorrt"`` (one engine) or ``"pytorch"``; ``reason``
    says why a PyTorch segment is not in TensorRT.
    """

    runs_in: str
    nodes: tuple[str, ...]
    ops: tuple[str, ...]
    reason: str = ""

    def __len__(self) -> int:
        return len(self.nodes)


@dataclass(frozen=True)
class PartitionPlan:
    segments: tuple[Segment, ...]
    min_block_size: int

    def segments_in(self, runs_in: str) -> list[Segment]:
        return [s for s in self.segments if s.runs_in == runs_in]

    @property
    def num_engines(self) -> int:
        return len(self.segments_in(RUNS_IN_TENSORRT))

    def summary(self) -> str:
        """One line per segment, e.g. ``tensorrt  41 ops`` / ``pytorch  2 ops (llmopt op): attention``."""
        lines = [f"{self.num_engines} TensorRT engine(s), min_block_size={self.min_block_size}:"]
        for s in self.segments:
            ops = Counter(s.ops)
            if s.runs_in == RUNS_IN_TENSORRT:
                lines.append(f"  tensorrt {len(s):4d} ops")
            else:
                listed = ", ".join(f"{op} x{n}" if n > 1 else op for op, n in ops.items())
                lines.append(f"  pytorch  {len(s):4d} ops ({s.reason}): {listed}")
        return "\n".join(lines)


def plan_partition(
    gm: GraphModule,
    settings: Optional[TensorRTSettings] = None,
    supported: Optional[Callable[[Node], bool]] = None,
) -> PartitionPlan:
    """Split ``gm``'s nodes, in graph order, into TensorRT and PyTorch segments.

    A node stays in PyTorch if it calls an llmopt op, an op named in
    ``settings.torch_executed_ops``, or one that ``supported`` (a predicate
    standing in for TensorRT's converter coverage; by default every other op
    counts as convertible) rejects. ``getitem`` on the tuple an op returns
    goes where the op goes. Nodes whose value is not a tensor (sizes, Python
    numbers) belong to no segment and split none: after AOTAutograd they are
    shape arithmetic, not operators. Runs of TensorRT nodes shorter than
    ``settings.min_block_size`` move to PyTorch, as Torch-TensorRT does.
    """
    settings = settings or TensorRTSettings()
    in_pytorch = settings.executed_in_pytorch()
    places: dict[Node, tuple[str, str]] = {}  # node -> (runs_in, reason)
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        producer = _tuple_producer(node)
        if producer is not None and producer in places:
            places[node] = places[producer]
        elif _is_llmopt_op(node.target):
            places[node] = (RUNS_IN_PYTORCH, "llmopt op")
        elif _qualified_name(node.target) in in_pytorch:
            places[node] = (RUNS_IN_PYTORCH, "torch_executed_ops")
        elif not _produces_tensor(node):
            continue
        elif supported is not None and not supported(node):
            places[node] = (RUNS_IN_PYTORCH, "unsupported")
        else:
            places[node] = (RUNS_IN_TENSORRT, "")
    segments = _runs(places)
    segments = [_demote_if_small(s, settings.min_block_size) for s in segments]
    return PartitionPlan(tuple(_merge_neighbours(segments)), settings.min_block_size)


def _runs(places: dict[Node, tuple[str, str]]) -> list[Segment]:
    segments: list[Segment] = []
    nodes: list[Node] = []
    current: Optional[tuple[str, str]] = None
    for node, place in places.items():  # insertion order is graph order
        if place != current and nodes:
            segments.append(_segment(current, nodes))
            nodes = []
        current = place
        nodes.append(node)
    if nodes:
        segments.append(_segment(current, nodes))
    return segments


def _segment(place: tuple[str, str], nodes: list[Node]) -> Segment:
    from llmopt.passes.graph_utils import op_name

    return Segment(place[0], tuple(n.name for n in nodes), tuple(op_name(n) for n in nodes), place[1])


def _demote_if_small(segment: Segment, min_block_size: int) -> Segment:
    if segment.runs_in == RUNS_IN_TENSORRT and len(segment) < min_block_size:
        return dataclasses.replace(segment, runs_in=RUNS_IN_PYTORCH, reason="below min_block_size")
    return segment


def _merge_neighbours(segments: list[Segment]) -> list[Segment]:
    """Adjacent segments with the same destination become one (reasons joined)."""
    merged: list[Segment] = []
    for s in segments:
        if merged and merged[-1].runs_in == s.runs_in:
            last = merged[-1]
            reasons = last.reason if s.reason in last.reason.split(", ") else f"{last.reason}, {s.reason}"
            merged[-1] = Segment(s.runs_in, last.nodes + s.nodes, last.ops + s.ops, reasons)
        else:
            merged.append(s)
    return merged


def _tuple_producer(node: Node) -> Optional[Node]:
    if node.op == "call_function" and node.target is operator.getitem:
        source = node.args[0]
        if isinstance(source, Node) and isinstance(_example(source), (tuple, list)):
            return source
    return None


def _is_llmopt_op(target: Any) -> bool:
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace == "llmopt"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.startswith("llmopt::")
    return False


def _qualified_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    try:
        return _get_qualified_name(target)
    except Exception:  # noqa: BLE001 - builtins without a module path have no such name
        return getattr(target, "__name__", str(target))


def _example(node: Node) -> Any:
    return node.meta.get("example_value", node.meta.get("val"))


def _produces_tensor(node: Node) -> bool:
    value = _example(node)
    if value is None:
        return True  # unknown: count it as an operator rather than hide it
    if isinstance(value, (tuple, list)):
        return any(isinstance(v, torch.Tensor) for v in value)
    return isinstance(value, torch.Tensor)


# ---------------------------------------------------------------- lowering


def import_torch_tensorrt() -> Any:
    """``torch_tensorrt``, or an error that says what is missing and how to install it."""
    try:
        import torch_tensorrt
    except ModuleNotFoundError as error:
        if error.name != "torch_tensorrt":
            raise _broken_install(error) from error
        raise TensorRTNotInstalled(
            "lower='tensorrt' needs torch-tensorrt, which is not installed; install it with "
            f"`{INSTALL_HINT}` (an NVIDIA GPU with CUDA is required, and torch-tensorrt must be "
            f"the release built for your torch {torch.__version__.split('+')[0]})"
        ) from error
    except ImportError as error:
        raise _broken_install(error) from error
    return torch_tensorrt


def _broken_install(error: ImportError) -> TensorRTNotInstalled:
    return TensorRTNotInstalled(
        f"torch-tensorrt is installed but cannot be imported ({error}); it must be the release "
        f"built for your torch {torch.__version__.split('+')[0]}, with TensorRT and CUDA available: "
        f"`{INSTALL_HINT}`"
    )


def check_inference_on_cuda(example_inputs: Sequence[Any]) -> None:
    """TensorRT engines run forward passes on NVIDIA GPUs: refuse anything else up front."""
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    devices = sorted({x.device.type for x in tensors})
    if any(d != "cuda" for d in devices):
        raise RuntimeError(
            f"lower='tensorrt' runs on CUDA devices; this graph's inputs are on {', '.join(devices)} "
            "(move the model and its inputs to 'cuda')"
        )
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        raise RuntimeError(
            "lower='tensorrt' builds inference engines (no backward): call the compiled model under "
            "torch.no_grad() or torch.inference_mode(), or lower to 'inductor' for training"
        )


def lower_tensorrt(gm: GraphModule, example_inputs: Sequence[Any], config: Any = None) -> Callable:
    """Compile ``gm`` with Torch-TensorRT; llmopt's ops run in PyTorch between engines.

    ``config`` is the backend's :class:`llmopt.LLMOptConfig` (its ``tensorrt``
    settings and ``strict``).
    """
    torch_tensorrt = import_torch_tensorrt()
    check_inference_on_cuda(example_inputs)
    settings = getattr(config, "tensorrt", None) or TensorRTSettings()
    strict = bool(getattr(config, "strict", False))

    from torch_tensorrt.dynamo import CompilationSettings
    from torch_tensorrt.dynamo.backend import torch_tensorrt_backend

    available = {f.name for f in dataclasses.fields(CompilationSettings)}
    options, ignored = settings.compile_options(available, pass_through_build_failures=strict)
    if ignored:
        warn_fallback(
            f"torch-tensorrt {getattr(torch_tensorrt, '__version__', '?')} has no setting(s) "
            f"{', '.join(ignored)}; compiling without them"
        )
    logger.info("TensorRT partition estimate:\n%s", plan_partition(gm, settings).summary())
    return torch_tensorrt_backend(gm, list(example_inputs), options=options)
