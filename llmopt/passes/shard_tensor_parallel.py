"""Split a model's layers across the ranks of a process group (``tensor_parallel`` option).

Megatron-style tensor parallelism as a graph rewrite, run in every rank on
that rank's copy of the graph, right after ``fuse_attention`` (so each
attention layer is one ``llmopt::attention`` call whose head counts the graph
states) and before paging and quantization (which then see the rank's shards:
the paged cache holds the rank's KV heads, and each shard is quantized on its
own):

* **column-parallel** ``q_proj``/``k_proj``/``v_proj`` and ``gate_proj``/``up_proj``:
  the rank keeps its rows of the weight (and bias), so its output holds its
  heads (or its slice of the MLP's intermediate features);
* **row-parallel** ``o_proj``/``down_proj``: the rank keeps the matching columns,
  computes a partial product, and an all-reduce (sum) over the group gives
  every rank the full result; a bias is added once, after the reduction;
* **attention heads**: the rank attends with ``Hq/N`` query heads; GQA KV heads
  are divided among the ranks (``Hkv/N`` each) when ``N`` divides ``Hkv``; when
  ``Hkv`` divides ``N`` instead (e.g. one KV head, two ranks), each rank keeps
  the one KV head its query heads read, replicated as vLLM does; otherwise the
  pass refuses with the head counts;
* ``lm_head``: ``"vocab_parallel"`` (default; the rank computes its slice of the
  vocabulary, then an all-gather) or ``"replicated"``;
* the token embedding: ``"replicated"`` (default) or ``"vocab_parallel"`` (the
  rank holds its rows: ids outside them look up row 0 and are zeroed, then an
  all-reduce).

Layers are found by the last name of their module path (the Llama family's
``q_proj`` ... ``down_proj``, ``lm_head``); the collectives are functional ones
(:mod:`llmopt.parallel.collectives`), so eager lowering runs them and Inductor
compiles them. Every other tensor, including the norms, stays replicated.
The shards are copies installed on the graph module (as the quantize pass
installs its weights): what the compiled graph reads per rank is about 1/N of
the sharded layers (the Report's note gives the bytes); the user's module
keeps its full float weights unless it is loaded already sharded.

Refused with an error (not undone and warned about: a rank that ran
unsharded would still be correct but would hold the whole model): no
initialised process group or a world size other than ``size``, head counts
or widths ``size`` does not divide, an attention layer that was not fused, a
projection without its partner, and graphs that return a rank-local tensor
(a Hugging Face KV cache: call the model with ``use_cache=False``, or serve it
through the paged runtime). Graphs that compute gradients are left alone.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node
from torch.utils.weak import WeakIdKeyDictionary

import llmopt.kernels.attention  # noqa: F401  (registers llmopt::attention)
from llmopt.errors import LLMOptConfigError
from llmopt.parallel.collectives import World, reduce_dtype, world
from llmopt.passes.eliminate_dead_code import _has_side_effects as has_side_effects
from llmopt.passes.base import GraphPass, PassContext, PassResult, Rewrite, Skipped
from llmopt.passes.graph_utils import LINEAR_FUNCTIONS, copy_location_meta, fake_value, get_constant, \
    install_constant, is_op, known_equal, module_path, node_arg

KIND = "tensor_parallel"
PREFIX = "llmopt_tp_"
EMBEDDING_FUNCTIONS = (F.embedding, torch.embedding)
QUERY, KEY_VALUE, OUTPUT = ("q_proj",), ("k_proj", "v_proj"), ("o_proj",)
MLP_IN, MLP_OUT = ("gate_proj", "up_proj"), ("down_proj",)
LM_HEAD = "lm_head"
_ATTENTION = torch.ops.llmopt.attention.default
_C10D = torch.ops._c10d_functional


class TensorParallelError(LLMOptConfigError):
    """The graph cannot be sharded as asked; raised, never undone into an unsharded run."""

    fatal = True  # rewriter/pipeline.py re-raises it even without strict


@dataclass(frozen=True)
class HeadPlan:
    """How one attention layer's heads are split: rank ``r`` keeps query heads
    ``[r*Hq/N, (r+1)*Hq/N)`` and the KV heads they read."""

    q_heads: int
    kv_heads: int
    head_dim: int
    size: int

    @classmethod
    def build(cls, q_heads: int, kv_heads: int, head_dim: int, size: int, where: str) -> "HeadPlan":
        if q_heads % size:
            raise TensorParallelError(
                f"tensor_parallel size {size} does not divide the {q_heads} query heads of {where}")
        if q_heads % kv_heads:
            raise TensorParallelError(f"{where}: {q_heads} query heads are not a multiple of {kv_heads} KV heads")
        if kv_heads % size and size % kv_heads:
            raise TensorParallelError(
                f"tensor_parallel size {size} and the {kv_heads} KV heads of {where} ({q_heads} query heads): "
                f"the size must divide the KV heads (they are split) or the KV heads must divide the size "
                f"(they are replicated); choose a size among the divisors of {q_heads} that does")
        return cls(q_heads, kv_heads, head_dim, size)

    @property
    def local_q(self) -> int:
        return self.q_heads // self.size

    @property
    def local_kv(self) -> int:
        return max(self.kv_heads // self.size, 1)

    @property
    def replicated_kv(self) -> bool:
        return self.kv_heads < self.size

    def q_rows(self, rank: int) -> tuple[int, int]:
        return rank * self.local_q * self.head_dim, (rank + 1) * self.local_q * self.head_dim

    def kv_rows(self, rank: int) -> tuple[int, int]:
        if self.replicated_kv:  # every query head of this rank reads the same KV head
            first = (rank * self.local_q) // (self.q_heads // self.kv_heads)
        else:
            first = rank * self.local_kv
        return first * self.head_dim, (first + self.local_kv) * self.head_dim


@dataclass
class _Site:
    """A linear or embedding call whose weight is a parameter (or a tensor an earlier pass installed)."""

    node: Node
    layer: str
    weight_node: Node
    weight: torch.Tensor

    @property
    def tail(self) -> str:
        return self.layer.rsplit(".", 1)[-1]

    @property
    def parent(self) -> str:
        return self.layer.rsplit(".", 1)[0] if "." in self.layer else ""


class ShardTensorParallel(GraphPass):
    name = "shard_tensor_parallel"

    def enabled(self, config) -> bool:
        tp = getattr(config, "tensor_parallel", None)
        return tp is not None and tp.size > 1 and super().enabled(config)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        tp = ctx.config.tensor_parallel
        result = PassResult()
        if ctx.training:
            result.skipped.append(Skipped(KIND, "<graph>", "graph computes gradients (training): shards are "
                                                           "installed constants and would get none"))
            return result
        try:
            group = world(tp.size)
        except RuntimeError as why:
            raise TensorParallelError(str(why)) from None
        rewriter = _Rewriter(gm, ctx, group, result)
        linears, embeddings = rewriter.sites()
        by_parent: dict[str, dict[str, _Site]] = {}
        for site in linears:
            by_parent.setdefault(site.parent, {})[site.tail] = site
        attention = _attention_calls(gm)
        for parent, members in by_parent.items():
            if any(t in members for t in QUERY + KEY_VALUE + OUTPUT):
                rewriter.attention(parent, members, attention.get(parent))
            if any(t in members for t in MLP_IN + MLP_OUT):
                rewriter.mlp(parent, members)
        for site in linears:
            if site.tail == LM_HEAD and tp.lm_head == "vocab_parallel":
                rewriter.lm_head(site)
        if tp.embedding == "vocab_parallel":
            for site in embeddings:
                rewriter.embedding(site)
        rewriter.finish()
        return result


def _attention_calls(gm: GraphModule) -> dict[str, Node]:
    calls: dict[str, Node] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and (node.target is _ATTENTION or is_op(node, "sdpa")):
            calls.setdefault(module_path(node), node)
    return calls


# Shards of one weight, shared by every graph compiled from it (prefill, decode,
# recompiles), weakly both ways as the quantize pass shares its weights.
_SHARDS = WeakIdKeyDictionary()


def _shard(weight: torch.Tensor, dim: int, start: int, stop: int) -> torch.Tensor:
    import weakref

    key = (dim, start, stop, weight._version)
    entries = _SHARDS.setdefault(weight, {})
    ref = entries.get(key)
    shard = ref() if ref is not None else None
    if shard is None:
        shard = weight.detach().narrow(dim, start, stop - start).contiguous().clone()
        entries[key] = weakref.ref(shard)
    return shard


def sharded_weights() -> list[tuple[torch.Tensor, int]]:
    """(weight, bytes of its shards) for every weight that has a shard some compiled graph still
    holds: what a rank may release (its graphs read the shards; a recompile finds them here)."""
    found = []
    for weight, entries in list(_SHARDS.items()):
        shards = [s for s in (ref() for ref in entries.values()) if s is not None]
        if shards:
            found.append((weight, sum(s.untyped_storage().nbytes() for s in shards)))
    return found


class _Rewriter:
    def __init__(self, gm: GraphModule, ctx: PassContext, group: World, result: PassResult) -> None:
        self.gm, self.ctx, self.world, self.result = gm, ctx, group, result
        self.graph = gm.graph
        self.touched: list[Node] = []  # new or edited nodes whose example values must be recomputed
        self.sharded_bytes = [0, 0]  # this rank's shards, the same layers unsharded
        self.fake_mode = next((getattr(fake_value(n), "fake_mode", None) for n in gm.graph.nodes
                               if getattr(fake_value(n), "fake_mode", None) is not None), None)
        self.outputs_before = [fake_value(v) for v in _outputs(self.graph)]

    # ------------------------------------------------------------ finding the sites

    def sites(self) -> tuple[list[_Site], list[_Site]]:
        linears, embeddings = [], []
        for node in self.graph.nodes:
            if node.op != "call_function":
                continue
            if node.target in LINEAR_FUNCTIONS:
                target = linears
            elif node.target in EMBEDDING_FUNCTIONS:
                target = embeddings
            else:
                continue
            weight_node = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            weight = self._value(weight_node)
            if weight is not None:
                layer = module_path(node)
                if target is embeddings and node.target is torch.embedding:
                    continue  # aten spelling (weight first); Dynamo gives F.embedding
                target.append(_Site(node, layer, weight_node, weight))
        return linears, embeddings

    def _value(self, node: Any) -> Optional[torch.Tensor]:
        if not isinstance(node, Node):
            return None
        if node.op == "placeholder" and node.name in self.ctx.parameters:
            value = self.ctx.parameter_value(self.gm, self.ctx.parameters[node.name])
        elif node.op == "get_attr":
            value = self.gm
            for part in node.target.split("."):
                value = getattr(value, part)
        else:
            return None
        if not isinstance(value, torch.Tensor) or isinstance(value, torch._subclasses.FakeTensor):
            return None
        return value

    # ------------------------------------------------------------ the layers

    def attention(self, parent: str, members: dict[str, _Site], call: Optional[Node]) -> None:
        missing = [t for t in QUERY + KEY_VALUE + OUTPUT if t not in members]
        if missing:
            raise TensorParallelError(f"{parent}: tensor parallelism needs q_proj, k_proj, v_proj and o_proj; "
                                      f"{', '.join(missing)} not found as linear layers")
        if call is None or call.target is not _ATTENTION:
            raise TensorParallelError(
                f"{parent}: its attention was not fused into llmopt::attention (see the Report's unmatched "
                "sites); tensor parallelism splits fused attention only: keep attention=True")
        q, k = fake_value(call.args[0]), fake_value(call.args[1])
        plan = HeadPlan.build(int(q.shape[1]), int(k.shape[1]), int(q.shape[-1]), self.world.size, parent)
        for tail, rows in (("q_proj", plan.q_rows(self.world.rank)), ("k_proj", plan.kv_rows(self.world.rank)),
                           ("v_proj", plan.kv_rows(self.world.rank))):
            site = members[tail]
            expected = (plan.q_heads if tail == "q_proj" else plan.kv_heads) * plan.head_dim
            if site.weight.shape[0] != expected:
                raise TensorParallelError(f"{site.layer}: {site.weight.shape[0]} output features, expected "
                                          f"{expected} from the attention call's head counts")
            self.column(site, *rows, f"heads {rows[0] // plan.head_dim}..{rows[1] // plan.head_dim - 1}"
                        + (" (KV head replicated)" if tail != "q_proj" and plan.replicated_kv else ""))
        self.row(members["o_proj"], *plan.q_rows(self.world.rank), "query heads' columns")
        self.result.notes.append(
            f"{parent}: {plan.q_heads}q/{plan.kv_heads}kv heads -> {plan.local_q}q/{plan.local_kv}kv per rank"
            + (" (KV heads replicated)" if plan.replicated_kv else ""))

    def mlp(self, parent: str, members: dict[str, _Site]) -> None:
        inputs = [members[t] for t in MLP_IN if t in members]
        if not inputs or "down_proj" not in members:
            raise TensorParallelError(f"{parent}: tensor parallelism needs gate_proj/up_proj with down_proj")
        width = inputs[0].weight.shape[0]
        if width % self.world.size:
            raise TensorParallelError(f"tensor_parallel size {self.world.size} does not divide the {width} "
                                      f"intermediate features of {parent}")
        start, stop = _even(width, self.world)
        for site in inputs:
            self.column(site, start, stop, f"features {start}..{stop - 1}")
        self.row(members["down_proj"], start, stop, f"features {start}..{stop - 1}")

    def column(self, site: _Site, start: int, stop: int, what: str) -> None:
        node = site.node
        with self.graph.inserting_before(node):
            weight = self._install(site, site.weight, 0, start, stop)
            bias_node = node_arg(node, 2, "bias")
            bias = self._value(bias_node)
            if bias is not None:
                bias_node = self._install(site, bias, 0, start, stop, "bias")
        node.args = (node.args[0], weight, bias_node) + tuple(node.args[3:])
        node.kwargs = {k: v for k, v in node.kwargs.items() if k not in ("weight", "bias")}
        self.touched.append(node)
        self._record(site, f"column-parallel, rows {start}..{stop - 1} ({what})", start, stop, dim=0)

    def row(self, site: _Site, start: int, stop: int, what: str) -> None:
        node = site.node
        bias_node = node_arg(node, 2, "bias")
        with self.graph.inserting_before(node):
            weight = self._install(site, site.weight, 1, start, stop)
        node.args = (node.args[0], weight, None)
        node.kwargs = {}
        self.touched.append(node)
        dtype = fake_value(node).dtype
        since = len(self.touched)
        with self.graph.inserting_before(node.next):  # in order (inserting_after would reverse them)
            out = self._all_reduce(node, dtype)
            if bias_node is not None:
                out = self._call(node, "call_function", operator.add, out, bias_node)
        self._redirect(node, out, since)
        how = "" if reduce_dtype(dtype, self.world.backend) == dtype else " in float32"
        self._record(site, f"row-parallel, columns {start}..{stop - 1} ({what}), then all-reduce{how}", start,
                     stop, dim=1)

    def lm_head(self, site: _Site) -> None:
        vocab = site.weight.shape[0]
        if vocab % self.world.size:
            raise TensorParallelError(
                f"tensor_parallel size {self.world.size} does not divide the vocabulary of {site.layer} "
                f"({vocab} rows); use tensor_parallel={{'lm_head': 'replicated', ...}}")
        start, stop = _even(vocab, self.world)
        node = site.node
        self.column(site, start, stop, "vocabulary slice")
        dtype = fake_value(node).dtype
        gather_dtype = reduce_dtype(dtype, self.world.backend)
        since = len(self.touched)
        with self.graph.inserting_before(node.next):  # in order (inserting_after would reverse them)
            x = self._call(node, "call_method", "movedim", node, -1, 0)  # vocabulary first: gather on dim 0
            if gather_dtype != dtype:
                x = self._call(node, "call_method", "to", x, gather_dtype)
            x = self._call(node, "call_method", "contiguous", x)
            x = self._call(node, "call_function", _C10D.all_gather_into_tensor.default, x, self.world.size,
                           self.world.group_name)
            x = self._call(node, "call_function", _C10D.wait_tensor.default, x)
            if gather_dtype != dtype:
                x = self._call(node, "call_method", "to", x, dtype)
            x = self._call(node, "call_method", "movedim", x, 0, -1)
        self._redirect(node, x, since)
        self.result.rewrites[-1] = Rewrite(KIND, site.layer, self.result.rewrites[-1].detail + ", then all-gather")

    def embedding(self, site: _Site) -> None:
        node = site.node
        vocab = site.weight.shape[0]
        per = -(-vocab // self.world.size)
        start, stop = min(self.world.rank * per, vocab), min((self.world.rank + 1) * per, vocab)
        ids = node.args[0]
        dtype = site.weight.dtype
        with self.graph.inserting_before(node):
            weight = self._install(site, site.weight, 0, start, stop)
            inside = self._call(node, "call_function", operator.and_,
                                self._call(node, "call_function", operator.ge, ids, start),
                                self._call(node, "call_function", operator.lt, ids, stop))
            local = self._call(node, "call_function", torch.where, inside,
                               self._call(node, "call_function", operator.sub, ids, start), 0)
            rows = self._call(node, "call_function", F.embedding, local, weight)
            keep = self._call(node, "call_method", "unsqueeze", inside, -1)
            rows = self._call(node, "call_function", operator.mul, rows, self._call(node, "call_method", "to", keep,
                                                                                     dtype))
            out = self._all_reduce(node, dtype, rows)
        node.replace_all_uses_with(out)
        self.graph.erase_node(node)
        self._record(site, f"vocab-parallel embedding, rows {start}..{stop - 1}, masked lookup then all-reduce",
                     start, stop, dim=0)

    # ------------------------------------------------------------ graph edits

    def _install(self, site: _Site, tensor: torch.Tensor, dim: int, start: int, stop: int,
                 what: str = "weight") -> Node:
        name = install_constant(self.gm, PREFIX, f"{site.layer}_{what}", _shard(tensor, dim, start, stop))
        node = get_constant(self.gm, name, self.fake_mode)
        self.touched.append(node)
        return node

    def _call(self, like: Node, op: str, target: Any, *args: Any) -> Node:
        node = self.graph.create_node(op, target, args)
        copy_location_meta(like, node)
        self.touched.append(node)
        return node

    def _all_reduce(self, like: Node, dtype: torch.dtype, x: Optional[Node] = None) -> Node:
        x = like if x is None else x
        reduce_in = reduce_dtype(dtype, self.world.backend)
        if reduce_in != dtype:  # gloo: sum the partials in fp32 (collectives.py)
            x = self._call(like, "call_method", "to", x, reduce_in)
        x = self._call(like, "call_function", _C10D.all_reduce.default, x, "sum", self.world.group_name)
        x = self._call(like, "call_function", _C10D.wait_tensor.default, x)
        if reduce_in != dtype:
            x = self._call(like, "call_method", "to", x, dtype)
        return x

    def _redirect(self, node: Node, out: Node, since: int) -> None:
        """Users of ``node`` read ``out``; the chain built from it (``touched[since:]``) keeps reading ``node``."""
        chain = set(self.touched[since:])
        node.replace_all_uses_with(out, delete_user_cb=lambda user: user not in chain)

    def _record(self, site: _Site, detail: str, start: int, stop: int, dim: int) -> None:
        full = site.weight.numel() * site.weight.element_size()
        local = full * (stop - start) // site.weight.shape[dim]
        self.sharded_bytes[0] += local
        self.sharded_bytes[1] += full
        self.result.rewrites.append(Rewrite(KIND, site.layer, f"{detail}, {full} -> {local} bytes"))

    # ------------------------------------------------------------ example values, checks, report

    def finish(self) -> None:
        if not self.touched:
            return
        # fuse_attention leaves the KV repeats dead (removed by the last pass); their constant head
        # counts would not take the shard, so they go now
        self.graph.eliminate_dead_code(is_impure_node=has_side_effects)
        self._repropagate()
        for i, (value, before) in enumerate(zip(_outputs(self.graph), self.outputs_before)):
            if isinstance(value, Node) and not _same(before, fake_value(value)):
                raise TensorParallelError(
                    f"graph output {i} ({module_path(value)}) would hold only this rank's shard (shape "
                    f"{tuple(fake_value(value).shape)}): the model returns a tensor of the split layers, e.g. a "
                    "Hugging Face KV cache; call it with use_cache=False, or serve it through llmopt's paged runtime")
        self._report_bytes()

    def _repropagate(self) -> None:
        """Recompute the example values of edited nodes and of everything whose inputs changed shape."""
        self._changed: set[Node] = set()
        touched = set(self.touched)
        if self.fake_mode is None:
            raise TensorParallelError("the graph carries no fake values to propagate shard shapes through")
        with self.fake_mode:
            for node in self.graph.nodes:
                if node.op not in ("call_function", "call_method", "get_attr"):
                    continue
                if node.op == "get_attr":
                    if node in touched:
                        self._changed.add(node)
                    continue
                if node not in touched and not any(i in self._changed for i in node.all_input_nodes):
                    continue
                old = fake_value(node)
                args = torch.fx.node.map_arg(node.args, fake_value)
                kwargs = torch.fx.node.map_arg(node.kwargs, fake_value)
                try:
                    if node.op == "call_method":
                        new = getattr(args[0], node.target)(*args[1:], **kwargs)
                    else:
                        new = node.target(*args, **kwargs)
                except Exception as error:  # noqa: BLE001 - name the node that cannot take a shard
                    raise TensorParallelError(
                        f"{module_path(node)}: {node.format_node()} does not accept this rank's shard "
                        f"({type(error).__name__}: {error}); sizes written as constants (not -1) cannot be split"
                    ) from None
                node.meta["example_value"] = new
                if node in touched or not _same(old, new):
                    self._changed.add(node)

    def _report_bytes(self) -> None:
        used = set()
        read = replicated = 0
        for node in self.graph.nodes:
            if node.op == "placeholder" and node.name in self.ctx.parameters and node.users:
                value = self._value(node)
                if value is not None and id(value) not in used:
                    used.add(id(value))
                    replicated += value.numel() * value.element_size()
        local, full = self.sharded_bytes
        read = local + replicated
        self.result.notes.append(
            f"rank {self.world.rank} of {self.world.size} ({self.world.backend}): weight bytes read by this graph "
            f"{read} = sharded {local} (of {full} unsharded) + replicated {replicated}")


def _outputs(graph) -> list[Any]:
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    return list(output.args[0]) if isinstance(output.args[0], (list, tuple)) else [output.args[0]]


def _even(width: int, group: World) -> tuple[int, int]:
    per = width // group.size
    return group.rank * per, (group.rank + 1) * per



def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return (a.dtype == b.dtype and a.dim() == b.dim()
                and all(known_equal(x, y) for x, y in zip(a.shape, b.shape)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - symbolic values that cannot be compared: treat as changed
        return False
