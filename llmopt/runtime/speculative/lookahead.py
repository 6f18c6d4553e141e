"""Lookahead decoding (Fu et al. 2024): several tokens per step without a draft model.

Each greedy sequence keeps a Jacobi window: N - 1 levels of W guessed tokens.
Level ``l`` column ``c`` is a guess for position ``p + 1 + l + c`` (``p``: the
position of the sequence's last token), so column ``c`` read down the levels
is a run of N - 1 consecutive guesses. One step feeds, after the last token,
as one token tree (``runtime/token_tree.py``) on the paged cache:

* the verification branch: up to G candidate (N-1)-grams from the sequence's
  n-gram pool whose key (the token before them) is the last token, each a
  chain from the last token;
* the lookahead branch: the window, where guess ``(0, c)`` continues
  ``(0, c - 1)`` (the last token for ``c = 0``) and ``(l, c)`` continues
  ``(l - 1, c)``: every guess sees the cached prefix, the last token, level
  0 up to its column and its own column's lower levels, at positions one
  apart, and nothing else.

The target's argmax at every fed token comes out of that one forward. A
candidate is kept while its tokens equal the target's argmax at their parent
(exactly greedy decoding, since each token saw only its true context), so the
step emits the longest verified candidate and one token of the target: the
output is token-identical to plain greedy decoding. The verified candidate's
K/V is moved to the slots after the prefix when it was not the first branch.

The window then advances one Jacobi step: each column's N - 1 guesses and
the target's argmax after its top guess form an n-gram, added to the pool
under its first token; levels shift down by one, the top level becomes those
argmaxes, and columns shift left by the number of tokens the step emitted
beyond one (the window's positions follow the sequence). The pool is also
filled with the n-grams of the prompt and of the verified output (prompt
lookup, as the reference implementation's pool-from-prompt option does), and
holds the G most recent n-grams per key.

Sampled requests, and requests asking for logprobs with G > 1, are not
changed: sampled ones decode plainly; a logprobs request verifies one
candidate only (the engine reads an emitted token's logprob from the row
after its predecessor in feeding order, which holds for the first branch).
The adaptive off-switch of speculative decoding applies: no lookahead while
``disable_by_batch_size`` or more sequences run, and per sequence,
``AdaptiveK`` switches lookahead off for a while after steps that accepted
nothing although the pool had candidates.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from llmopt.runtime import token_tree
from llmopt.runtime.sequence import Sequence, SequenceStatus
from llmopt.runtime.speculative.adaptive import AdaptiveK
from llmopt.runtime.speculative.config import SpeculativeConfig


@dataclass
class _Layout:
    """Where a proposal put its tokens among the fed ones (index 0: the last token)."""

    branches: list[list[int]]  # the candidates' tokens
    branch_rows: list[list[int]]  # their indices among the fed tokens
    window_rows: list[list[int]] | None  # [level][column] indices; None: window not fed


@dataclass
class _State:
    levels: list[list[int]]  # N - 1 rows of W guesses
    pool: dict[int, OrderedDict] = field(default_factory=dict)  # first token -> {(N-1)-gram: None}
    num_pooled: int = 0  # leading tokens of the sequence whose n-grams are in the pool
    layout: _Layout | None = None


class LookaheadSpeculator:
    """The engine's speculator for ``method="lookahead"`` (same hooks as ``Speculator``)."""

    def __init__(self, config: SpeculativeConfig, target_runner, stats, pool_from_prompt: bool = True):
        """``stats``: a ``speculator.SpecStats`` (given, so this module does not import that one)."""
        self.config = config
        self.window, self.ngram, self.guesses = config.window, config.ngram, config.guesses
        self.target_runner = target_runner
        self.pool_from_prompt = pool_from_prompt
        self.adaptive = AdaptiveK(self.ngram - 1, enabled=config.adaptive)
        self.stats = stats
        self.num_kv_moves = 0  # steps whose verified candidate was not the first branch
        self._states: dict[str, _State] = {}

    # ---- before the step -------------------------------------------------

    def propose(self, scheduler, requests: dict, max_model_len: int) -> None:
        running = scheduler.running
        for seq in running:
            seq.draft_token_ids, seq.draft_parents = [], None
            state = self._states.get(seq.request_id)
            if state is not None:
                state.layout = None
        limit = self.config.disable_by_batch_size
        if not running or (limit is not None and len(running) >= limit):
            return
        for seq in running:
            request = requests[seq.request_id]
            if seq.num_new_tokens != 1 or seq.status is not SequenceStatus.RUNNING \
                    or not request.params.greedy:
                continue
            if self.adaptive.k(seq.request_id) == 0:
                continue
            self._propose_one(seq, self._state(seq), request.params.logprobs is not None,
                              max_model_len)

    def _state(self, seq: Sequence) -> _State:
        state = self._states.get(seq.request_id)
        if state is None:
            # Initial guesses: tokens of the prompt, drawn with a per-request seed (deterministic).
            rng = random.Random(seq.request_id)
            prompt = seq.prompt_token_ids
            state = _State([[rng.choice(prompt) for _ in range(self.window)]
                            for _ in range(self.ngram - 1)])
            state.num_pooled = 0 if self.pool_from_prompt else seq.num_tokens
            self._states[seq.request_id] = state
        return state

    def _propose_one(self, seq: Sequence, state: _State, wants_logprobs: bool, max_model_len: int) -> None:
        self._pool_sequence(seq, state)
        room = max_model_len - seq.num_tokens  # fed slots past the last token
        length = self.ngram - 1
        if seq.max_tokens is not None:
            length = min(length, seq.max_tokens - seq.num_output_tokens - 1)  # the target adds one
        guesses = 1 if wants_logprobs else self.guesses
        candidates = list(reversed(state.pool.get(seq.last_token_id, {})))[:guesses] if length > 0 else []
        tokens, parents, branches, branch_rows = [], [], [], []
        for candidate in candidates:
            branch = list(candidate[:length])
            if len(tokens) + len(branch) > room:
                break
            rows = []
            for j, token in enumerate(branch):
                parents.append(rows[-1] if j else 0)
                tokens.append(token)
                rows.append(len(tokens))
            branches.append(branch)
            branch_rows.append(rows)
        window_rows = None
        if len(tokens) + self.window * (self.ngram - 1) <= room:
            window_rows = []
            for level, guesses_row in enumerate(state.levels):
                rows = []
                for column, token in enumerate(guesses_row):
                    if level == 0:
                        parents.append(rows[-1] if column else 0)
                    else:
                        parents.append(window_rows[level - 1][column])
                    tokens.append(token)
                    rows.append(len(tokens))
                window_rows.append(rows)
        if not tokens:
            return
        seq.draft_token_ids, seq.draft_parents = tokens, parents
        state.layout = _Layout(branches, branch_rows, window_rows)

    def _pool_sequence(self, seq: Sequence, state: _State) -> None:
        """Pool the n-grams of the sequence's tokens not pooled yet (prompt, verified output)."""
        n = self.ngram
        tokens = seq.all_token_ids
        start = max(0, state.num_pooled - n + 1)
        for i in range(start, len(tokens) - n + 1):
            self._pool_add(state, tokens[i], tuple(tokens[i + 1:i + n]))
        state.num_pooled = len(tokens)

    def _pool_add(self, state: _State, first: int, rest: tuple[int, ...]) -> None:
        entries = state.pool.setdefault(first, OrderedDict())
        entries[rest] = None
        entries.move_to_end(rest)  # most recent last
        while len(entries) > max(1, self.guesses):
            entries.popitem(last=False)

    # ---- after the forward -----------------------------------------------

    def verify(self, item, logits: torch.Tensor, request) -> list[int]:
        """The tokens ``item`` emits (the longest verified candidate and the target's
        token after it), from its 1 + d logit rows; advances the window."""
        state = self._states[item.request_id]
        layout = state.layout
        state.layout = None
        argmax = logits.max(dim=-1).indices.tolist()
        fed = item.num_draft_tokens  # the scheduler may have cut the drafts short
        best, best_rows = [], []
        for branch, rows in zip(layout.branches, layout.branch_rows):
            kept = []
            expected = argmax[0]
            for token, row in zip(branch, rows):
                if row > fed or token != expected:
                    break
                kept.append(row)
                expected = argmax[row]
            if len(kept) > len(best_rows):
                best_rows = kept
                best = [argmax[0]] + [argmax[row] for row in kept[:-1]]
        tokens = best + [argmax[best_rows[-1]] if best_rows else argmax[0]]
        if best_rows and best_rows[0] != 1:
            self._move_kv(item.slot_mapping, best_rows)
        drafted = max((len(b) for b in layout.branches), default=0)
        accepted = len(best_rows)
        if drafted:
            self.stats.add(drafted, accepted, len(tokens))
            request.metrics.add(drafted, accepted, len(tokens))
            self.adaptive.observe(item.request_id, drafted, accepted)
        if layout.window_rows is not None and layout.window_rows[-1][-1] <= fed:
            self._advance_window(state, layout.window_rows, argmax, len(tokens) - 1)
        return tokens

    @torch.inference_mode()  # the caches are inference tensors
    def _move_kv(self, slot_mapping: list[int], rows: list[int]) -> None:
        """Copy the verified candidate's K/V (fed at ``rows``) to the slots after the last token."""
        self.num_kv_moves += 1
        src = torch.tensor([slot_mapping[r] for r in rows], dtype=torch.int64)
        dst = torch.tensor(slot_mapping[1:1 + len(rows)], dtype=torch.int64)
        for k_cache, v_cache in self.target_runner.kv_cache.layers.values():
            for cache in (k_cache, v_cache):
                flat = cache.view(-1, *cache.shape[2:])
                src_d, dst_d = src.to(cache.device), dst.to(cache.device)
                flat.index_copy_(0, dst_d, flat.index_select(0, src_d))

    def _advance_window(self, state: _State, window_rows, argmax: list[int], shift: int) -> None:
        levels = state.levels
        top = [argmax[row] for row in window_rows[-1]]  # the target's token after each column's top guess
        for column in range(self.window):
            first = levels[0][column]
            self._pool_add(state, first, tuple(levels[level][column] for level in range(1, len(levels)))
                           + (top[column],))
        levels = levels[1:] + [top]
        if shift:
            # The sequence moved ``shift`` positions further than one: so do the guesses;
            # the freed right-hand columns repeat the last guess of their level.
            levels = [row[shift:] + [row[-1]] * min(shift, len(row)) for row in levels]
            levels = [row[:self.window] for row in levels]
        state.levels = levels

    def after_step(self, scheduled) -> None:
        return None

    def forget(self, request_id: str) -> None:
        self._states.pop(request_id, None)
        self.adaptive.forget(request_id)
