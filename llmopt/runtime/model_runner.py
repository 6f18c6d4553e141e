"""Runs one scheduler step through the model compiled with the paging pass.

The runner packs the step's new tokens into one row (``input_ids (1, T)``,
``position_ids (1, T)``), publishes the step's paged-attention metadata
(slot mapping, block tables, sequence lengths) and the KV cache, runs the
model compiled by ``torch.compile(backend="llmopt", options={"paged_kv": True})``
and returns the logits of the rows that sample.

The protocol a model follows (see ``passes/page_kv_cache.py``): called with
``input_ids`` and ``position_ids`` of shape ``(1, T)`` it returns logits
``(1, T, V)`` (a tensor, or an object with ``.logits``), and its attention is
causal self-attention that the fuse pass matches. Hugging Face causal LMs are
called with ``use_cache=False``; for those with a plain ``lm_head`` the
compiled part stops at the decoder's hidden states and only the sampled rows
go through the head, so a prefill does not compute T x vocab logits.

Shapes: T is marked dynamic, so one graph serves every step of two tokens
or more. Dynamo would still specialise T == 1 (a single decoding sequence):
on CPU with ``lower="inductor"`` such steps run a second compiled graph of
their own, made for T == 1 on first use, because padding them to two rows
costs more than the compile (MKL's fp32 product of two rows runs far slower
than its one-row product on some CPUs: docs/PERFORMANCE.md, "Decode");
otherwise they get one padding token (written nowhere, attending nowhere).

Guards: every step runs Dynamo's guard checks before the graph. The runner
keeps those on its inputs (``input_ids``, ``position_ids``: dtype, device,
dispatch keys, the dynamic T), on globals and on global state, and drops the
ones on itself and its model (``L['self']...``: module types and ids,
attribute values, hook dicts, the weights' tensor checks), which hold for as
long as the engine's model is not changed after it was built — the engine's
contract, argued in docs/ARCHITECTURE.md ("Guards of the served step").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from llmopt.runtime import token_tree
from llmopt.runtime.paged_context import LayerSpec, PagedKVCache, PagedStep, paged_step
from llmopt.runtime.scheduler import ScheduledSequence

_MIN_TOKENS = 2  # pad single-token steps without a single-token graph: Dynamo specialises sizes 0 and 1


@dataclass
class RunnerOptions:
    device: torch.device
    block_size: int
    lower: str = "inductor"
    kernels: Any = None  # the compiler's ``kernels`` option group
    compile_options: dict | None = None  # more llmopt options (a draft model's ``quantize``, ...)


class PagingNotApplied(RuntimeError):
    """The compiled model has no attention the paging pass could rewrite."""


class ModelRunner:
    def __init__(self, model: torch.nn.Module, options: RunnerOptions):
        self.model = model
        self.options = options
        self.device = options.device
        self.decoder, self.head = _split_head(model)
        # isolate_recompiles: this runner's entries are its own, not shared with every other
        # runner's (all compile the same _forward code), so no guard needs to tell runners apart.
        step_options = {**(options.compile_options or {}), "paged_kv": True, "lower": options.lower,
                        "kernels": options.kernels, "guard_filter_fn": keep_step_guards}
        self._compiled = torch.compile(self._forward, backend="llmopt", dynamic=False, isolate_recompiles=True,
                                       options=step_options)
        # Single-token steps (T == 1) in a graph of their own on CPU (see the module docstring);
        # its own region, so the served graph's entries and guards stay those of T >= 2. Only
        # for lower="inductor" (the served default): "eager" is for tests and debugging, where
        # the second trace costs more than its speed is worth.
        self._compiled_single = (torch.compile(self._forward, backend="llmopt", dynamic=False,
                                               isolate_recompiles=True, options=step_options)
                                 if self.device.type == "cpu" and options.lower == "inductor" else None)
        self._head = self.head
        if self.head is not None and (options.compile_options or {}).get("quantize"):
            # The head runs outside the paged graph (on the sampled rows only); compiled with the
            # same options it is quantized too, instead of reading its fp32 weight every step.
            self._head = torch.compile(self._apply_head, backend="llmopt", dynamic=False,
                                       isolate_recompiles=True,
                                       options={**options.compile_options, "lower": options.lower,
                                                "kernels": options.kernels, "guard_filter_fn": keep_step_guards})
        self.kv_cache = PagedKVCache(num_blocks=1, block_size=options.block_size, device=self.device)

    def _apply_head(self, rows: Tensor) -> Tensor:
        return self.head(rows)

    def _run_head(self, rows: Tensor) -> Tensor:
        if self._head is self.head:
            return self.head(rows)
        count = rows.shape[0]
        if count < _MIN_TOKENS:  # one row: pad (Dynamo specialises size 1; the quantized head is row-cheap)
            rows = torch.cat([rows, rows.new_zeros((_MIN_TOKENS - count, rows.shape[1]))])
        torch._dynamo.maybe_mark_dynamic(rows, 0)
        return self._head(rows)[:count]

    def compiled_entries(self) -> list:
        """Dynamo's cache entries of this runner's compiled step (its own region)."""
        from torch._dynamo.eval_frame import _get_cache_entries_for_region

        return _get_cache_entries_for_region(ModelRunner._forward.__code__, self._compiled._isolate_recompiles_id)

    # ---- set-up ----------------------------------------------------------

    def profile(self, num_tokens: int = 8) -> dict[str, LayerSpec]:
        """Run (and compile) one prefill into a scratch cache; return what each layer stores.

        Raises PagingNotApplied if no attention was paged: the model would
        then attend with its own code, without the cache, and decode wrong.
        """
        bs = self.options.block_size
        num_blocks = -(-num_tokens // bs)
        self.kv_cache = PagedKVCache(num_blocks=num_blocks, block_size=bs, device=self.device)
        input_ids = torch.zeros((num_tokens,), dtype=torch.long)
        step = PagedStep(
            slot_mapping=torch.arange(num_tokens, dtype=torch.int32),
            block_tables=torch.arange(num_blocks, dtype=torch.int32)[None],
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32),
            query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32),
            max_query_len=num_tokens, max_seq_len=num_tokens)
        self._run(input_ids, torch.arange(num_tokens), step, torch.tensor([num_tokens - 1]))
        specs = dict(self.kv_cache.layer_specs)
        if not specs:
            raise PagingNotApplied(
                "llmopt could not page this model's KV cache: no attention was rewritten "
                "(see llmopt.last_report() / llmopt.explain for the reasons); the runtime "
                "needs causal self-attention that llmopt's attention pass matches")
        return specs

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_cache = PagedKVCache(num_blocks=num_blocks, block_size=self.options.block_size,
                                     device=self.device)

    # ---- one step --------------------------------------------------------

    def execute(self, scheduled: list[ScheduledSequence]) -> Tensor:
        """Logits (fp32) of the scheduled sequences that sample, in their order: one row
        each, or 1 + its number of drafts for a sequence verifying drafts (the rows that
        predict each draft, then the one after the last)."""
        token_ids, positions, slots, starts, seq_lens, logit_rows = [], [], [], [0], [], []
        trees = {}  # sequence index -> who sees whom among its fed tokens (drafts as a tree)
        for i, item in enumerate(scheduled):
            if item.draft_parents is not None:
                trees[i] = token_tree.ancestor_mask(list(item.draft_parents))
            token_ids += item.token_ids
            positions += item.positions
            slots += item.slot_mapping
            starts.append(starts[-1] + item.num_scheduled_tokens)
            seq_lens.append(item.end)
            if item.samples:
                logit_rows.extend(range(starts[-1] - 1 - item.num_draft_tokens, starts[-1]))
        return self._run_packed(token_ids, positions, slots, starts, seq_lens,
                                [item.seq.block_table for item in scheduled], logit_rows, trees or None)

    def execute_packed(self, items: list[tuple[list[int], int, list[int]]], block_size: int) -> Tensor:
        """Logits of the last token of each ``(token_ids, start position, block table)``:
        the tokens go to positions ``start...`` through the block table (a drafter's step)."""
        token_ids, positions, slots, starts, seq_lens, logit_rows = [], [], [], [0], [], []
        for tokens, start, table in items:
            end = start + len(tokens)
            token_ids += tokens
            positions += range(start, end)
            slots += [table[p // block_size] * block_size + p % block_size for p in range(start, end)]
            starts.append(starts[-1] + len(tokens))
            seq_lens.append(end)
            logit_rows.append(starts[-1] - 1)
        return self._run_packed(token_ids, positions, slots, starts, seq_lens,
                                [table for _, _, table in items], logit_rows)

    def _run_packed(self, token_ids, positions, slots, starts, seq_lens, tables, logit_rows,
                    append_masks=None) -> Tensor:
        num_real = len(token_ids)
        pad = 0 if num_real == 1 and self._compiled_single is not None else max(0, _MIN_TOKENS - num_real)
        token_ids = token_ids + [0] * pad
        positions = list(positions) + [0] * pad
        slots = slots + [-1] * pad
        width = max(len(t) for t in tables)
        block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        step = PagedStep(
            slot_mapping=torch.tensor(slots, dtype=torch.int32),
            block_tables=block_tables,
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            max_query_len=max(b - a for a, b in zip(starts, starts[1:])),
            max_seq_len=max(seq_lens), append_masks=append_masks)
        return self._run(torch.tensor(token_ids), torch.tensor(positions), step,
                         torch.tensor(logit_rows, dtype=torch.long))

    @torch.inference_mode()
    def _run(self, token_ids: Tensor, positions: Tensor, step: PagedStep, logit_rows: Tensor) -> Tensor:
        device = self.device
        step = PagedStep(*(t.to(device, non_blocking=True) for t in (
            step.slot_mapping, step.block_tables, step.seq_lens, step.query_start_loc)),
            step.max_query_len, step.max_seq_len, append_masks=step.append_masks)
        input_ids = token_ids.to(device)[None]
        position_ids = positions.to(device)[None]
        compiled = self._compiled
        if input_ids.shape[1] == 1 and self._compiled_single is not None:
            compiled = self._compiled_single  # static T == 1
        else:
            torch._dynamo.maybe_mark_dynamic(input_ids, 1)
            torch._dynamo.maybe_mark_dynamic(position_ids, 1)
        with paged_step(self.kv_cache, step):
            hidden = compiled(input_ids, position_ids)
        rows = hidden[0].index_select(0, logit_rows.to(device))
        logits = self._run_head(rows) if self.head is not None else rows
        return logits.float()

    def _forward(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        if self.head is not None:  # Hugging Face: decoder hidden states only
            return self.decoder(input_ids=input_ids, position_ids=position_ids,
                                use_cache=False).last_hidden_state
        out = self.model(input_ids, position_ids)
        return out.logits if hasattr(out, "logits") else out


def keep_step_guards(entries) -> list[bool]:
    """Dynamo's ``guard_filter_fn`` for the served step: every guard but the runner's module guards.

    Kept: guards on the step's inputs (dtype, device, dispatch keys, sizes,
    the dynamic T, their not aliasing the model's buffers) and on globals and
    global state (grad and inference mode, default dtype, torch function
    modes). Dropped: the guards under ``L['self']``, the runner and the model
    it holds (module types, object ids, attribute values such as
    ``training``, the weights' dtype/shape/device and dimension markings),
    which the engine's contract keeps true (see the module docstring). Each
    runner compiles with ``isolate_recompiles``: its entries are its own, so
    no guard has to tell one runner (one model) from another.
    """
    return [not _ON_SELF.search(entry.name) for entry in entries]


# A guard's source names the runner as the local ``self`` (``self['layers']...``,
# ``dict(type(self...``); inputs are ``input_ids`` / ``position_ids``, globals ``G[...]``.
_ON_SELF = re.compile(r"(^|\()self\b")


def _split_head(model: torch.nn.Module):
    """(decoder, lm_head) for a Hugging Face causal LM whose logits are ``lm_head(hidden)``.

    Models that post-process logits (soft-capping, scaling) or are not from
    Hugging Face run whole: (None, None).
    """
    config = getattr(model, "config", None)
    get_decoder = getattr(model, "get_decoder", None)
    head = getattr(model, "lm_head", None)
    if config is None or get_decoder is None or not isinstance(head, torch.nn.Linear):
        return None, None
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            return None, None
    decoder = get_decoder()
    if decoder is None or decoder is model:
        return None, None
    return decoder, head
