"""Which sequences run in the next step, and how many tokens each computes.

One token budget per step, shaped like vLLM's v1 scheduler:

1. RUNNING sequences, oldest first: a decode computes 1 token, an unfinished
   (chunked) prefill the next chunk. When the pool has no block for one, the
   most recently arrived running sequence is preempted (blocks freed,
   ``num_computed_tokens`` back to 0, put at the front of the waiting queue:
   it will recompute, mostly from the prefix cache) until it fits, or it is
   the one preempted.
2. If nothing was preempted, WAITING sequences in FIFO order while the
   budget, ``max_num_seqs`` and the free blocks allow. A long prompt is cut
   into chunks across steps; the step that computes its last token samples.

No request starves: the waiting queue is FIFO (the head is never skipped),
preempted sequences go back to its front, and a running sequence is only
ever preempted for an older one. The oldest request therefore always makes
progress, since ``max_model_len`` is capped at what the pool holds.

Speculative decoding: a decoding sequence may carry drafted tokens
(``seq.draft_token_ids``, set by the engine before ``schedule``). It is then
scheduled for 1 + d tokens (its last token and d <= drafts, as many as the
budget, ``max_model_len`` and the free blocks allow: drafts never preempt
anyone), the step returns logits for all of them, and ``update`` takes the
verified tokens (the accepted drafts and one token from the target). Its
``num_computed_tokens`` then counts only verified positions and its block
table is cut back to the blocks that hold them, so blocks that held only
rejected tokens go back to the pool; the K/V slots of rejected tokens left
in a kept block are overwritten by the next step. Drafts laid out as a
token tree (``seq.draft_parents``, lookahead decoding) are fed the same way;
their item carries the tree, which sets their positions and who attends to
whom (``runtime/token_tree.py``).

The scheduler knows nothing of sampling: ``update`` takes the sampled token
ids and asks ``finish_check`` (stop tokens, stop strings) whether a sequence
is done; ``max_tokens`` and ``max_model_len`` it checks itself.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from llmopt.runtime import token_tree
from llmopt.runtime.block_manager import BlockManager
from llmopt.runtime.sequence import FinishReason, Sequence, SequenceStatus

FinishCheck = Callable[[Sequence], "FinishReason | None"]


@dataclass
class SchedulerConfig:
    """Options of the scheduler.

    Attributes:
        max_num_batched_tokens: token budget of one step, all sequences together.
        max_num_seqs: most sequences running at once.
        block_size: tokens per KV block.
        enable_chunked_prefill: split prompts longer than the budget left.
        long_prefill_token_threshold: cap on one sequence's prefill chunk, so
            several prompts share a step (needs chunked prefill).
        enable_prefix_caching: reuse cached full blocks of earlier requests.
        max_model_len: most tokens (prompt + output) in one sequence; None:
            what the KV pool holds (and, without chunked prefill, what one
            step's budget holds).
    """

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    block_size: int = 16
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int | None = None
    enable_prefix_caching: bool = True
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"SchedulerConfig.{name} must be at least 1, got {getattr(self, name)}")
        threshold = self.long_prefill_token_threshold
        if threshold is not None and threshold < 1:
            raise ValueError(f"SchedulerConfig.long_prefill_token_threshold must be at least 1 "
                             f"or None, got {threshold}")
        if threshold is not None and not self.enable_chunked_prefill:
            raise ValueError("SchedulerConfig.long_prefill_token_threshold cuts prompts into "
                             "chunks, so it needs enable_chunked_prefill=True")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"SchedulerConfig.max_model_len must be at least 1, got {self.max_model_len}")


@dataclass(frozen=True)
class ScheduledSequence:
    """One sequence's share of a step: positions ``[start, start + num_scheduled_tokens)``.

    ``token_ids`` are fed at those positions and their K/V written to
    ``slot_mapping``; attention reads the first ``end`` positions through
    ``seq.block_table``.
    """

    seq: Sequence
    start: int
    num_scheduled_tokens: int
    token_ids: list[int]
    slot_mapping: list[int]
    samples: bool  # the step reaches the last token: a token is sampled from its logits
    num_draft_tokens: int = 0  # drafts fed after the last token, verified by this step
    # The drafts as a token tree (``runtime/token_tree.py``): each draft's parent among the
    # fed tokens; None: a chain. Sets the positions and the attention among the fed tokens.
    draft_parents: tuple[int, ...] | None = None

    @property
    def request_id(self) -> str:
        return self.seq.request_id

    @property
    def end(self) -> int:
        """Context length after this step."""
        return self.start + self.num_scheduled_tokens

    @property
    def positions(self) -> range | list[int]:
        if self.draft_parents is None:
            return range(self.start, self.end)
        return [self.start + depth for depth in token_tree.depths(list(self.draft_parents))]


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)  # their cached state is gone

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_scheduled_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, num_blocks: int,
                 finish_check: FinishCheck | None = None):
        self.config = config
        self.block_manager = BlockManager(num_blocks, config.block_size,
                                          config.enable_prefix_caching)
        self.max_model_len = _max_model_len(config, num_blocks)
        self.finish_check = finish_check
        self.waiting: deque[Sequence] = deque()  # read-only outside: FIFO, preempted first
        self.running: list[Sequence] = []  # read-only outside: by arrival
        self._requests: dict[str, Sequence] = {}
        self._next_arrival = 0
        self._pending: SchedulerOutput | None = None  # scheduled, not yet updated

    # ---- requests --------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        if seq.request_id in self._requests:
            raise ValueError(f"request {seq.request_id!r} is already being served")
        if seq.status is not SequenceStatus.WAITING or seq.output_token_ids or seq.block_table:
            raise ValueError(f"request {seq.request_id!r} is not a fresh sequence "
                             f"(status {seq.status.value}, {seq.num_output_tokens} output tokens)")
        if seq.num_prompt_tokens > self.max_model_len:
            raise ValueError(self._too_long_message(seq))
        seq.num_computed_tokens = 0
        seq.arrival_index = self._next_arrival
        self._next_arrival += 1
        self._requests[seq.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Finish a waiting or running request now and free its blocks; None if unknown."""
        seq = self._requests.get(request_id)
        if seq is None:
            return None
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._finish(seq, FinishReason.ABORT)
        return seq

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def get(self, request_id: str) -> Sequence | None:
        return self._requests.get(request_id)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ---- one step --------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        if self._pending is not None:
            raise RuntimeError("schedule() called again before update() of the previous step")
        output = SchedulerOutput()
        budget = self._schedule_running(output, self.config.max_num_batched_tokens)
        if not output.preempted:
            # Blocks are short: admitting new work now would only be preempted back.
            self._schedule_waiting(output, budget)
        self._pending = output if output.scheduled else None
        return output

    def update(self, output: SchedulerOutput, sampled_token_ids: Mapping[str, int]) -> list[Sequence]:
        """Record a step's results; returns the sequences that finished.

        ``sampled_token_ids`` maps request id -> the token sampled for each
        scheduled sequence whose ``samples`` is true (and only those); for a
        sequence that verified drafts, the list of tokens it emits (the
        accepted drafts, then the target's token): they are appended one by
        one, and the first one that finishes the sequence ends it.
        Sequences aborted since ``schedule`` are skipped.
        """
        if output is not self._pending and output.scheduled:
            raise RuntimeError("update() got an output that is not the last schedule()'s")
        self._check_sampled(output, sampled_token_ids)
        self._pending = None
        finished = []
        for item in output.scheduled:
            seq = item.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted during the step
            if not item.samples:
                seq.num_computed_tokens = item.end
                self.block_manager.mark_full_blocks_cached(seq)
                continue
            tokens = sampled_token_ids[seq.request_id]
            tokens = [tokens] if isinstance(tokens, int) else list(tokens)
            reason = None
            for token in tokens:
                seq.output_token_ids.append(int(token))
                reason = self._finish_reason(seq)
                if reason is not None:
                    break
            # Verified positions: the fed last token and the accepted drafts.
            seq.num_computed_tokens = item.start + (len(tokens) if item.num_draft_tokens
                                                    else item.num_scheduled_tokens)
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)
                finished.append(seq)
                continue
            if item.num_draft_tokens:
                self.block_manager.truncate(seq, seq.num_computed_tokens)
            self.block_manager.mark_full_blocks_cached(seq)
        return finished

    # ---- internals -------------------------------------------------------

    def _check_sampled(self, output: SchedulerOutput, sampled_token_ids: Mapping[str, int]) -> None:
        """Reject a malformed result before changing anything, so the caller can retry."""
        unknown = set(sampled_token_ids) - {item.request_id for item in output.scheduled}
        if unknown:
            raise ValueError(f"sampled tokens for requests not scheduled in this step: {sorted(unknown)}")
        for item in output.scheduled:
            if item.seq.status is SequenceStatus.RUNNING \
                    and item.samples != (item.request_id in sampled_token_ids):
                raise ValueError(
                    f"request {item.request_id!r}: "
                    + ("its step reached the last token but no token was sampled for it"
                       if item.samples else "a token was sampled mid-prefill, where none is due"))
            tokens = sampled_token_ids.get(item.request_id)
            if isinstance(tokens, (list, tuple)) and not 1 <= len(tokens) <= 1 + item.num_draft_tokens:
                raise ValueError(f"request {item.request_id!r}: {len(tokens)} tokens for a step that "
                                 f"verified {item.num_draft_tokens} drafts (1 to "
                                 f"{1 + item.num_draft_tokens} are possible)")

    def _schedule_running(self, output: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            drafts, seq.draft_token_ids = seq.draft_token_ids, []
            parents, seq.draft_parents = seq.draft_parents, None
            num_new = self._chunk(seq.num_new_tokens, budget)
            if drafts and seq.num_new_tokens == 1:
                drafts = drafts[:min(budget - 1, self.max_model_len - seq.num_tokens)]
                if drafts and self.block_manager.can_allocate(seq, 1 + len(drafts)):
                    self.block_manager.allocate(seq, 1 + len(drafts))
                    self._add_scheduled(output, seq, 1, drafts, parents)
                    budget -= 1 + len(drafts)
                    i += 1
                    continue
            if not self._reserve_blocks(seq, num_new, output):
                break  # it was the newest one left: preempted itself
            self._add_scheduled(output, seq, num_new)
            budget -= num_new
            i += 1
        return budget

    def _reserve_blocks(self, seq: Sequence, num_new: int, output: SchedulerOutput) -> bool:
        """Allocate for ``seq``, preempting the newest running sequences as needed."""
        while not self.block_manager.can_allocate(seq, num_new):
            # ``running`` is sorted by arrival and walked in order, so the victim
            # is never a sequence already scheduled in this step.
            victim = self.running.pop()
            self._preempt(victim)
            output.preempted.append(victim)
            if victim is seq:
                return False
        self.block_manager.allocate(seq, num_new)
        return True

    def _schedule_waiting(self, output: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            uncached = seq.num_tokens - self.block_manager.get_computed_prefix(seq)
            if not self.config.enable_chunked_prefill and uncached > budget:
                break  # FIFO: the head waits for a step with room, nobody overtakes it
            num_new = self._chunk(uncached, budget)
            if not self.block_manager.can_allocate(seq, num_new):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq, num_new)  # jumps past the cached prefix
            seq.status = SequenceStatus.RUNNING
            # Every running sequence arrived before every waiting one (FIFO
            # admission; victims are the newest running), so appending keeps
            # ``running`` in arrival order.
            self.running.append(seq)
            self._add_scheduled(output, seq, num_new)
            budget -= num_new

    def _chunk(self, num_tokens: int, budget: int) -> int:
        num = min(num_tokens, budget)
        threshold = self.config.long_prefill_token_threshold
        return min(num, threshold) if threshold is not None else num

    def _add_scheduled(self, output: SchedulerOutput, seq: Sequence, num_new: int,
                       drafts: list[int] | None = None, parents: list[int] | None = None) -> None:
        start = seq.num_computed_tokens
        drafts = drafts or []
        tree = None
        if parents is not None and not token_tree.is_chain(parents[:len(drafts)]):
            tree = tuple(parents[:len(drafts)])  # a cut-short tree is still a tree
        output.scheduled.append(ScheduledSequence(
            seq=seq, start=start, num_scheduled_tokens=num_new + len(drafts),
            token_ids=seq.token_ids(start, start + num_new) + drafts,
            slot_mapping=self.block_manager.slot_mapping(seq, start, num_new + len(drafts)),
            samples=start + num_new == seq.num_tokens, num_draft_tokens=len(drafts),
            draft_parents=tree))

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_draft_computed = 0
        seq.draft_token_ids = []
        seq.draft_parents = None
        seq.status = SequenceStatus.PREEMPTED
        seq.num_preemptions += 1
        # Victims are taken newest first, so the front stays in arrival order.
        self.waiting.appendleft(seq)

    def _finish_reason(self, seq: Sequence) -> FinishReason | None:
        if self.finish_check is not None:
            reason = self.finish_check(seq)
            if reason is not None:
                return reason
        if seq.max_tokens is not None and seq.num_output_tokens >= seq.max_tokens:
            return FinishReason.LENGTH
        if seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        del self._requests[seq.request_id]

    def _too_long_message(self, seq: Sequence) -> str:
        pool_tokens = self.block_manager.num_blocks * self.config.block_size
        return (f"request {seq.request_id!r}: the prompt has {seq.num_prompt_tokens} tokens but at "
                f"most {self.max_model_len} fit (max_model_len={self.config.max_model_len}, KV pool "
                f"{self.block_manager.num_blocks} blocks x {self.config.block_size} = {pool_tokens} "
                f"tokens, step budget {self.config.max_num_batched_tokens} tokens"
                f"{'' if self.config.enable_chunked_prefill else ' without chunked prefill'}); "
                "shorten the prompt or give the KV cache more memory")


def _max_model_len(config: SchedulerConfig, num_blocks: int) -> int:
    """The longest sequence the pool can always hold on its own (so the oldest
    request can always make progress), and, without chunked prefill, that
    one step can recompute after a preemption."""
    limit = num_blocks * config.block_size
    if not config.enable_chunked_prefill:
        limit = min(limit, config.max_num_batched_tokens)
    if config.max_model_len is None:
        return limit
    if config.max_model_len > limit:
        raise ValueError(
            f"max_model_len={config.max_model_len} does not fit: the KV pool holds "
            f"{num_blocks} blocks x {config.block_size} = {num_blocks * config.block_size} tokens"
            + ("" if config.enable_chunked_prefill else
               f" and one step computes at most {config.max_num_batched_tokens} tokens "
               "without chunked prefill")
            + "; lower max_model_len or give the KV cache more memory")
    return config.max_model_len
