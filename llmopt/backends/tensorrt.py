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

from llmopt.config import LLMOptConfigError, checked_fields
from llmopt.rewriter.log import logger, warn_fallback

INSTALL_HINT = 'pip install "llmopt[tensorrt]"'

# Torch-TensorRT's own default for min_block_size: smaller TensorRT blocks
# cost more in engine switches than they gain, so they stay in PyTorch.
DEFAULT_MIN_BLOCK_SIZE = 5

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

RUNS_IN_TENSORRT = "tensorrt"
RUNS_IN_PYTORCH = "pytorch"


class TensorRTNotInstalled(ImportError):
    """``lower="tensorrt"`` was asked for but torch-tensorrt cannot be imported."""


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class TensorRTSettings:
    """The ``tensorrt`` option of the llmopt backend (with ``lower="tensorrt"``).

    Attributes:
        precision: None (default): layers run in the dtypes the graph has (cast
            the model, e.g. ``model.half()``, to choose). ``"fp16"`` / ``"bf16"``:
            TensorRT may run the layers of an fp32 model in that precision
            (releases with ``enabled_precisions`` only; strongly typed releases
            refuse it when lowering). ``"fp32"``: keep fp32 layers in fp32.
        workspace_size: bytes TensorRT may use as scratch while building and
            running an engine; 0 leaves it to TensorRT.
        min_block_size: the fewest operators a TensorRT engine may hold; shorter
            runs of supported operators stay in PyTorch.
        optimization_level: TensorRT builder optimization level 0-5 (higher
            builds longer, searching more kernels); None is TensorRT's default.
        torch_executed_ops: more ops to keep in PyTorch, as qualified ATen names
            (``"torch.ops.aten.embedding.default"``), in addition to llmopt's ops.
    """

    precision: Optional[str] = None
    workspace_size: int = 0
    min_block_size: int = DEFAULT_MIN_BLOCK_SIZE
    optimization_level: Optional[int] = None
    torch_executed_ops: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.precision is not None and self.precision not in PRECISIONS:
            raise LLMOptConfigError(
                f"tensorrt option 'precision' got {self.precision!r}; valid choices are None, "
                + ", ".join(repr(p) for p in PRECISIONS)
            )
        _check_int("workspace_size", self.workspace_size, low=0)
        _check_int("min_block_size", self.min_block_size, low=1)
        if self.optimization_level is not None:
            _check_int("optimization_level", self.optimization_level, low=0, high=5)
        ops = self.torch_executed_ops
        if isinstance(ops, str) or not all(isinstance(op, str) for op in ops):
            raise LLMOptConfigError(
                f"tensorrt option 'torch_executed_ops' must be a list of op names, got {ops!r}"
            )
        object.__setattr__(self, "torch_executed_ops", tuple(ops))

    @classmethod
    def from_options(cls, options: "Mapping[str, Any] | TensorRTSettings | None") -> "TensorRTSettings":
        """Build the settings from the dict given as ``options={"tensorrt": {...}}``."""
        if options is None:
            return cls()
        if isinstance(options, TensorRTSettings):
            return options
        if not isinstance(options, Mapping):
            raise LLMOptConfigError(
                f"option 'tensorrt' must be a dict of TensorRT settings, got {type(options).__name__}"
            )
        return cls(**checked_fields(cls, options, "tensorrt option"))

    def executed_in_pytorch(self) -> frozenset[str]:
        """Qualified names of the ops kept out of TensorRT: llmopt's, then the user's."""
        return frozenset(llmopt_op_names()) | frozenset(self.torch_executed_ops)

    def compile_options(
        self, available: Collection[str], *, pass_through_build_failures: bool = False
    ) -> tuple[dict[str, Any], list[str]]:
        """The ``options`` for Torch-TensorRT's backend, and what this version cannot take.

        ``available`` is the set of field names of the installed
        ``torch_tensorrt.dynamo.CompilationSettings``: the settings changed
        between releases (older ones have ``enabled_precisions``; newer ones,
        built on strongly typed TensorRT, drop it), and
        Torch-TensorRT silently ignores options it does not know, so they are
        left out here and returned as the second value for a warning.
        ``pass_through_build_failures`` (llmopt's ``strict``) makes a failed
        engine build raise instead of falling back to PyTorch quietly.
        """
        wanted: dict[str, Any] = {
            "min_block_size": self.min_block_size,
            "workspace_size": self.workspace_size,
            "torch_executed_ops": set(self.executed_in_pytorch()),
            "pass_through_build_failures": pass_through_build_failures,
        }
        if self.optimization_level is not None:
            wanted["optimization_level"] = self.optimization_level
        wanted.update(self._precision_options(available))
        options = {k: v for k, v in wanted.items() if k in available}
        ignored = sorted(k for k in wanted if k not in available)
        return options, ignored

    def _precision_options(self, available: Collection[str]) -> dict[str, Any]:
        if self.precision is None:
            return {}  # the graph's own dtypes decide, in every release
        dtype = PRECISIONS[self.precision]
        if "enabled_precisions" in available:
            options: dict[str, Any] = {"enabled_precisions": {dtype}}
            if "use_explicit_typing" in available:
                # Releases with both refuse enabled_precisions under explicit typing.
                options["use_explicit_typing"] = False
            return options
        if self.precision == "fp32":
            return {}  # strongly typed: fp32 layers stay fp32
        # Strongly typed releases (no enabled_precisions) do have an autocast
        # pass, but it reads reference outputs collected only on their
        # torch.export path, not on the torch.compile path used here.
        raise RuntimeError(
            f"this torch-tensorrt builds strongly typed engines (the graph's dtypes decide): "
            f"tensorrt option precision={self.precision!r} cannot be honoured; cast the model "
            f"to {dtype} instead and leave 'precision' unset"
        )


def _check_int(name: str, value: Any, *, low: int, high: Optional[int] = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise LLMOptConfigError(f"tensorrt option {name!r} must be an integer {bound}, got {value!r}")


def llmopt_op_names() -> list[str]:
    """``torch.ops.llmopt.<op>.<overload>`` for every llmopt op registered now.

    Qualified-name strings, the spelling Torch-TensorRT's partitioner compares
    node targets with (and the one that survives pickling its settings).
    Every op a rewritten graph can hold is registered by then: the passes
    import the kernels that define them.
    """
    names = []
    for qualified in sorted(torch._C._dispatch_get_all_op_names()):
        namespace, _, op = qualified.partition("::")
        if namespace != "llmopt":
            continue
        packet = getattr(torch.ops.llmopt, op)
        names += [f"torch.ops.llmopt.{op}.{overload}" for overload in packet.overloads()]
    return names


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
