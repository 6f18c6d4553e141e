"""Drafters: each proposes up to k next tokens for running sequences.

``propose(seqs, ks, params, generators)`` returns one :class:`Draft` per sequence.
Sampled requests also get the distribution each draft token was drawn from
(``q``), which the rejection rule needs; greedy requests draft the
drafter's argmax.

- :class:`NgramProposer`: prompt lookup. The sequence's last n tokens
  (n from ``prompt_lookup_max`` down to ``prompt_lookup_min``) are looked up
  in its earlier tokens (prompt and output); the tokens that followed the
  most recent earlier occurrence are the draft. Deterministic, no model.
- :class:`ModelProposer`: a model drafts autoregressively, all sequences
  batched, k forwards per step. It runs through its own :class:`ModelRunner`
  on the target's block tables and slot mapping (same block ids, its own
  cache tensors), so it needs no block manager of its own: the engine
  reserves the lookahead slots in the target's pool before drafting. A
  separate draft model keeps ``seq.num_draft_computed`` (positions whose
  draft K/V is valid) and first catches up on the tokens it has not seen
  (after admission, preemption or accepted tokens). For ``layer_skip`` the
  draft's layers are the target's first layers and their cache tensors
  are the target's own: the target's K/V of those layers at every computed
  position is what the draft would compute, so it never catches up.
"""

from __future__ import annotations

import copy
from array import array
from dataclasses import dataclass

import torch

from llmopt.runtime.sampler import draw, probabilities
from llmopt.runtime.sequence import Sequence


@dataclass
class Draft:
    token_ids: list[int]
    q: torch.Tensor | None = None  # (len(token_ids), V) for sampled requests of a model drafter


class NgramProposer:
    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int):
        self.min_n, self.max_n = prompt_lookup_min, prompt_lookup_max

    def propose(self, seqs: list[Sequence], ks: list[int], params, generators) -> list[Draft]:
        return [Draft(ngram_lookup(s.all_token_ids, k, self.min_n, self.max_n)) for s, k in zip(seqs, ks)]


def ngram_lookup(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """The up to ``k`` tokens after the latest earlier match of the longest suffix that has one."""
    if k < 1 or len(tokens) < 2:
        return []
    # Byte search (C speed): token ids as int32, a match must start on a 4-byte boundary.
    data = array("i", tokens).tobytes()
    size = len(tokens)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        suffix = data[(size - n) * 4:]
        end = (size - 1) * 4  # the match must be followed by a token before the suffix's last one
        while end >= len(suffix):
            pos = data.rfind(suffix, 0, end)
            if pos < 0:
                break
            if pos % 4 == 0:
                start = pos // 4 + n
                return tokens[start:start + k]
            end = pos + len(suffix) - 1  # misaligned: look strictly before it
    return []


class ModelProposer:
    """Drafts with a (smaller or truncated) model through its own ModelRunner."""

    def __init__(self, runner, target_runner, shares_target_cache: bool, num_blocks: int):
        self.runner = runner
        self.target_runner = target_runner
        self.shares_target_cache = shares_target_cache
        self.num_blocks = num_blocks
        self._bound = False
        if not shares_target_cache:
            runner.allocate_kv_cache(num_blocks)

    def _bind_cache(self) -> None:
        """layer_skip: point the draft's layers at the target's cache tensors (made on first use)."""
        if self._bound:
            return
        from llmopt.runtime.paged_context import PagedKVCache

        target = self.target_runner.kv_cache
        names = list(self.runner.layer_specs)
        target_names = list(target.layers)
        cache = PagedKVCache(num_blocks=target.num_blocks, block_size=target.block_size,
                             device=target.device)
        for name, target_name in zip(names, target_names):
            cache.layers[name] = target.layers[target_name]
            cache.layer_specs[name] = target.layer_specs[target_name]
        self.runner.kv_cache = cache
        self._bound = True

    def propose(self, seqs: list[Sequence], ks: list[int], params, generators) -> list[Draft]:
        if self.shares_target_cache:
            self._bind_cache()
        bs = self.runner.options.block_size
        drafts = [Draft([], None) for _ in seqs]
        qs: list[list[torch.Tensor]] = [[] for _ in seqs]
        # First forward: catch up (draft_model) and feed the last token.
        feeds = []
        for seq in seqs:
            start = seq.num_computed_tokens if self.shares_target_cache else \
                min(seq.num_draft_computed, seq.num_computed_tokens)
            feeds.append((start, seq.token_ids(start, seq.num_tokens)))
        active = list(range(len(seqs)))
        while active:
            items = []
            for i in active:
                start, tokens = feeds[i]
                items.append((tokens, start, seqs[i].block_table))
            logits = self.runner.execute_packed(items, bs)
            next_active = []
            greedy_rows = [r for r, i in enumerate(active) if params[i].greedy]
            argmax = logits.max(dim=-1).indices.tolist() if greedy_rows else None
            for r, i in enumerate(active):
                seq, p = seqs[i], params[i]
                if p.greedy:
                    token = argmax[r]
                else:
                    q = probabilities(logits[r:r + 1], [p])[0]
                    token = draw(q, generators[i])
                    qs[i].append(q)
                drafts[i].token_ids.append(token)
                start, tokens = feeds[i]
                position = start + len(tokens)  # where the draft token goes next
                if len(drafts[i].token_ids) < ks[i]:
                    feeds[i] = (position, [token])
                    next_active.append(i)
                else:
                    # Valid draft K/V: every position fed, the last draft not fed.
                    seq.num_draft_computed = position
            active = next_active
        for i, q in enumerate(qs):
            if q:
                drafts[i].q = torch.stack(q)
        return drafts



def layer_skip_model(model: torch.nn.Module, num_layers: int) -> torch.nn.Module:
    """A view of a Hugging Face causal LM with only its first ``num_layers`` decoder layers.

    Shallow copies: embeddings, those layers, the final norm and ``lm_head``
    are the target's own parameters (no memory is copied).
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    config = getattr(model, "config", None)
    if decoder is None or decoder is model or not isinstance(layers, torch.nn.ModuleList) \
            or config is None:
        raise _config_error("method 'layer_skip' needs a Hugging Face causal LM whose decoder has "
                            f"a 'layers' list; {type(model).__name__} has none")
    total = len(layers)
    if not 1 <= num_layers < total:
        raise _config_error(f"num_layers={num_layers} is out of range: the target has {total} "
                            f"decoder layers, so layer_skip drafts with 1 to {total - 1} of them")
    new_config = copy.copy(config)
    new_config.num_hidden_layers = num_layers
    new_decoder = copy.copy(decoder)
    new_decoder._modules = dict(decoder._modules)
    new_decoder.layers = torch.nn.ModuleList(list(layers)[:num_layers])
    new_decoder.config = new_config
    new_model = copy.copy(model)
    new_model._modules = dict(model._modules)
    for name, child in model.named_children():
        if child is decoder:
            setattr(new_model, name, new_decoder)
    new_model.config = new_config
    if new_model.get_decoder() is not new_decoder:
        raise _config_error(f"method 'layer_skip': could not truncate {type(model).__name__}'s decoder")
    return new_model


def _config_error(message: str):
    from llmopt.errors import LLMOptConfigError

    return LLMOptConfigError(f"speculative_config: {message}")
