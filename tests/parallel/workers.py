"""What each rank runs in tests/parallel (imported by the spawned processes)."""

from __future__ import annotations

import functools
import os
import sys
import time
import re

import torch

from llmopt.config import LLMOptConfig
from llmopt.rewriter.backend import llmopt_backend
from llmopt.rewriter.report import Report
from llmopt.models.random_models import random_llama


def compile_with_report(model, options):
    """``torch.compile`` through the llmopt backend, and the Report its graphs fill."""
    report = Report()
    config = LLMOptConfig.from_options(options)
    return torch.compile(model, backend=functools.partial(llmopt_backend, options=config, report=report)), report


def _tp_notes(report) -> list[str]:
    notes = []
    for graph in report.graphs:
        for record in graph.passes:
            if record.name == "shard_tensor_parallel":
                notes += record.notes
    return notes


def _weight_bytes(report) -> dict:
    for note in _tp_notes(report):
        found = re.search(r"read by this graph (\d+) = sharded (\d+) \(of (\d+) unsharded\) \+ replicated (\d+)", note)
        if found:
            read, local, full, replicated = map(int, found.groups())
            return {"read": read, "sharded": local, "sharded_full": full, "replicated": replicated}
    return None


def logits_against_one_process(rank: int, size: int, model_kwargs: dict, tp, ids_shape=(2, 7), options=None):
    """Tensor-parallel logits and the same model's eager logits (one process), on this rank."""
    torch.manual_seed(0)
    model_kwargs = dict(model_kwargs)
    dtype = model_kwargs.pop("dtype", torch.float32)
    model = random_llama(**model_kwargs).to(dtype)
    ids = torch.randint(0, model.config.vocab_size, ids_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits
        compiled, report = compile_with_report(
            model, {"lower": "eager", "strict": True, "tensor_parallel": tp, **(options or {})})
        got = compiled(ids, use_cache=False).logits
    return {"reference": reference, "got": got, "bytes": _weight_bytes(report), "notes": _tp_notes(report),
            "rewrites": [(r.location, r.detail) for g in report.graphs for p in g.passes
                         if p.name in ("shard_tensor_parallel", "quantize_linear") for r in p.rewrites]}


def expect_error(rank: int, size: int, model_kwargs: dict, tp) -> str:
    """The message the pass refuses with (it must refuse on every rank)."""
    model = random_llama(**model_kwargs)
    ids = torch.randint(0, model.config.vocab_size, (1, 4))
    try:
        with torch.no_grad():
            torch.compile(model, backend="llmopt", options={"lower": "eager", "tensor_parallel": tp})(
                ids, use_cache=False)
    except Exception as error:  # noqa: BLE001
        return str(error)
    return ""


def paged_against_one_process(rank: int, size: int, model_kwargs: dict, tp):
    """The paged graph (paged_kv=True after sharding): a packed prefill of two prompts, then a chunk
    of new tokens each over the cache, against the eager model's logits; and the KV heads the rank's
    cache holds."""
    from llmopt.runtime.paged_context import PagedKVCache, PagedStep, paged_step

    model = random_llama(**model_kwargs)

    def forward(input_ids, position_ids):
        return model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits

    compiled, report = compile_with_report(forward, {"lower": "eager", "strict": True, "paged_kv": True,
                                                     "tensor_parallel": tp,
                                                     # PyTorch's paged path: no C kernel build per rank
                                                     "kernels": {"native": False}})
    cache = PagedKVCache(num_blocks=4, block_size=16)
    prefill = PagedStep(torch.tensor([0, 1, 2, 16, 17]), torch.tensor([[0], [1]]), torch.tensor([3, 2]),
                        torch.tensor([0, 3, 5]), 3, 3)
    # a second chunk of the same shape (3 and 2 new tokens over the cached ones): no recompile
    chunk = PagedStep(torch.tensor([3, 4, 5, 18, 19]), torch.tensor([[0], [1]]), torch.tensor([6, 4]),
                      torch.tensor([0, 3, 5]), 3, 6)
    with torch.no_grad():
        with paged_step(cache, prefill):
            first = compiled(torch.tensor([[4, 5, 6, 7, 8]]), torch.tensor([[0, 1, 2, 0, 1]]))
        with paged_step(cache, chunk):
            second = compiled(torch.tensor([[9, 10, 11, 12, 13]]), torch.tensor([[3, 4, 5, 2, 3]]))
        got = torch.cat([first[0], second[0]])
        reference = torch.cat([model(torch.tensor([[4, 5, 6]])).logits[0], model(torch.tensor([[7, 8]])).logits[0],
                               model(torch.tensor([[4, 5, 6, 9, 10, 11]])).logits[0, -3:],
                               model(torch.tensor([[7, 8, 12, 13]])).logits[0, -2:]])
    heads = sorted({int(k.shape[2]) for k, _ in cache.layers.values()})
    paged = sum(r.kind == "paged_attention" for g in report.graphs for p in g.passes for r in p.rewrites)
    return {"got": got, "reference": reference, "cache_kv_heads": heads, "paged_sites": paged}


def cases(rank: int, size: int, cases: list):
    """Several cases in one process group (spawning ranks costs more than a tiny model's run)."""
    results = []
    for name, *args in cases:
        torch._dynamo.reset()
        start = time.perf_counter()
        results.append(globals()[name](rank, size, *args))
        results[-1] = {"value": results[-1], "seconds": time.perf_counter() - start}
        print(f"rank {rank}: {name} {results[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    return results


def smollm2_against_one_process(rank: int, size: int, tp, prompt: str, num_layers: int | None = None):
    """SmolLM2-135M (9 query heads, 3 KV heads) split over the ranks, against one process;
    ``num_layers``: only its first layers (real weights and head layout, a fraction of the time)."""
    from llmopt.models import load, load_cached

    if num_layers is None:
        model, tokenizer = load_cached("smollm2")
    else:
        model, tokenizer = load("smollm2")  # a copy of its own: the layers are cut below
        model.model.layers = model.model.layers[:num_layers]
        model.config.num_hidden_layers = num_layers
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits
        compiled, report = compile_with_report(model, {"lower": "eager", "strict": True, "tensor_parallel": tp})
        got = compiled(ids, use_cache=False).logits
    return {"reference": reference[0, -4:], "got": got[0, -4:], "max_diff": (got - reference).abs().max().item(),
            "argmax_equal": bool(torch.equal(got.argmax(-1), reference.argmax(-1))),
            "bytes": _weight_bytes(report), "notes": _tp_notes(report)}


def fail_or_hang(rank: int, size: int, mode: str):
    """Rank 1 raises (mode "raise") or sleeps (mode "hang"); rank 0 waits in a collective meanwhile."""
    import torch.distributed as dist

    if rank == 1:
        if mode == "raise":
            raise ValueError("rank 1 fails on purpose")
        time.sleep(600)
    dist.all_reduce(torch.ones(1))
    return os.getpid()


def step_over_the_wire(rank: int, size: int):
    """Rank 0 sends a step (with an attention mask for its second sequence) the way the
    tensor-parallel runner does, then a stop; every other rank returns what it received."""
    from llmopt.runtime import tp_worker
    from llmopt.runtime.paged_context import PagedStep

    control = torch.distributed.new_group(backend="gloo")
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    step = PagedStep(torch.tensor([5, 6, 17, 18, 19], dtype=torch.int32), torch.tensor([[0, 3], [1, 2]], dtype=torch.int32),
                     torch.tensor([6, 19], dtype=torch.int32), torch.tensor([0, 2, 5], dtype=torch.int32), 3, 19)
    step.append_masks = {1: mask}
    sent = (torch.tensor([7, 8, 9, 10, 11]), torch.tensor([4, 5, 16, 17, 18]), step, 64)
    if rank == 0:
        tp_worker._send(control, *sent)
        torch.distributed.broadcast(torch.zeros(tp_worker.HEADER_LEN, dtype=torch.long), 0, group=control)
        return sent
    return tp_worker._receive(control), tp_worker._receive(control)
