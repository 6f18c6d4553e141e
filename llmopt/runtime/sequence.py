"""The state of one request as the scheduler and the KV block manager see it.

A :class:`Sequence` is plain data: its tokens, how many of them already have
their K/V in the cache (``num_computed_tokens``), the blocks holding that K/V
(``block_table``) and where it stands (``status``). Sampling options belong to
the sampler; they ride along untouched in ``params``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # never scheduled yet
    RUNNING = "running"  # holds KV blocks, scheduled every step it fits
    PREEMPTED = "preempted"  # waiting again: its blocks were freed, it recomputes
    FINISHED = "finished"


class FinishReason(enum.Enum):
    # The values are the OpenAI API's ``finish_reason`` strings.
    STOP = "stop"  # a stop token or string, decided by the caller
    LENGTH = "length"  # max_tokens or the model's length limit
    ABORT = "abort"


# eq=False: sequences are compared by identity (list.remove, ``in``), never by
# comparing every field.
@dataclass(eq=False)
class Sequence:
    """One request.

    Attributes:
        request_id: unique among unfinished requests.
        prompt_token_ids: the prompt; never empty.
        params: the sampling parameters, opaque to the scheduler.
        max_tokens: the most output tokens; the scheduler finishes the
            sequence with ``FinishReason.LENGTH`` when it has that many.
        output_token_ids: tokens sampled so far.
        num_computed_tokens: leading tokens whose K/V is in the cache. The
            last sampled token is not computed until the next step feeds it.
        block_table: ids of the KV blocks, in token order (block ``i`` holds
            positions ``[i * block_size, (i + 1) * block_size)``).
        block_hashes: chained hashes of the full blocks of tokens, filled in
            lazily by the block manager; kept across preemptions because
            tokens never change.
        arrival_index: order of arrival, set by the scheduler.
        num_prefix_hit_tokens: tokens found in the prefix cache the last time
            the sequence was admitted.
        num_preemptions: how many times its blocks were taken back.
        draft_token_ids: tokens a drafter proposes after the last one, for
            the next step to verify (speculative decoding); the scheduler
            takes them (all, some or none) and clears the list.
        draft_parents: the drafts as a token tree (``runtime/token_tree.py``,
            lookahead decoding), or None for a chain; cleared with them.
        num_draft_computed: leading positions whose K/V a separate draft
            model holds (its own cache); 0 after a preemption.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: Any = None
    max_tokens: int | None = None
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list, repr=False)
    arrival_index: int = -1
    num_prefix_hit_tokens: int = 0
    num_preemptions: int = 0
    draft_token_ids: list[int] = field(default_factory=list, repr=False)
    draft_parents: list[int] | None = field(default=None, repr=False)
    num_draft_computed: int = 0

    def __post_init__(self) -> None:
        self.prompt_token_ids = [int(t) for t in self.prompt_token_ids]
        if not self.prompt_token_ids:
            raise ValueError(
                f"request {self.request_id!r}: the prompt is empty; at least one "
                "token is needed for the model to produce logits"
            )
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(
                f"request {self.request_id!r}: max_tokens must be at least 1, "
                f"got {self.max_tokens}"
            )

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_new_tokens(self) -> int:
        """Tokens still to be computed (fed to the model) before it samples."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens at positions ``[start, end)``, without copying the whole sequence."""
        prompt_len = len(self.prompt_token_ids)
        if end <= prompt_len:
            return self.prompt_token_ids[start:end]
        if start >= prompt_len:
            return self.output_token_ids[start - prompt_len:end - prompt_len]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - prompt_len]
