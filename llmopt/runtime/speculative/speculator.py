"""The engine's side of speculative decoding: draft before a step, verify after it.

Before ``schedule`` the engine asks :meth:`Speculator.propose` to draft for
every running sequence that decodes (its prompt is computed): each gets
``seq.draft_token_ids`` (up to its own k, see :mod:`.adaptive`), and the
scheduler feeds them after the sequence's last token. A model drafter
writes K/V while drafting, so its lookahead slots are reserved in the
target's pool first, and only while the pool keeps a block of headroom per
running sequence (drafts never cause a preemption). After the forward,
:meth:`verify` turns a sequence's 1 + d logit rows into the tokens it emits
(:mod:`.rejection`) and counts drafted and accepted tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmopt.runtime.sampler import probabilities
from llmopt.runtime.sequence import Sequence, SequenceStatus
from llmopt.runtime.speculative.adaptive import AdaptiveK
from llmopt.runtime.speculative.config import SpeculativeConfig
from llmopt.runtime.speculative.proposers import Draft, ModelProposer, NgramProposer
from llmopt.runtime.speculative.rejection import verify_greedy, verify_sampled


@dataclass
class SpecStats:
    """Drafted and accepted tokens, and verification steps (one per sequence and step)."""

    num_drafted: int = 0
    num_accepted: int = 0
    num_verify_steps: int = 0
    num_emitted: int = 0  # tokens emitted by verification steps (accepted + one each)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_drafted if self.num_drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification step (1 + accepted drafts on average)."""
        return self.num_emitted / self.num_verify_steps if self.num_verify_steps else 0.0

    def add(self, drafted: int, accepted: int, emitted: int) -> None:
        self.num_drafted += drafted
        self.num_accepted += accepted
        self.num_verify_steps += 1
        self.num_emitted += emitted


class Speculator:
    def __init__(self, config: SpeculativeConfig, proposer, reserves_slots: bool):
        self.config = config
        self.proposer = proposer
        self.reserves_slots = reserves_slots  # a model drafter writes K/V while drafting
        self.adaptive = AdaptiveK(config.num_speculative_tokens, enabled=config.adaptive)
        self.stats = SpecStats()
        self._q: dict[str, torch.Tensor | None] = {}

    # ---- before the step -------------------------------------------------

    def propose(self, scheduler, requests: dict, max_model_len: int) -> None:
        running = scheduler.running
        for seq in running:
            seq.draft_token_ids = []  # left over from a step that did not schedule them
        limit = self.config.disable_by_batch_size
        if not running or (limit is not None and len(running) >= limit):
            return
        block_manager = scheduler.block_manager
        bs = block_manager.block_size
        # Blocks the running sequences need for their next token anyway: drafts leave them free.
        headroom = sum(1 for s in running if len(s.block_table) * bs <= s.num_computed_tokens)
        seqs, ks = [], []
        for seq in running:
            if seq.num_new_tokens != 1 or seq.status is not SequenceStatus.RUNNING:
                continue  # still prefilling
            k = self.adaptive.k(seq.request_id)
            if seq.max_tokens is not None:
                k = min(k, seq.max_tokens - seq.num_output_tokens - 1)  # the target adds one
            k = min(k, max_model_len - seq.num_tokens)
            if k < 1:
                continue
            if self.reserves_slots:
                new = self._new_blocks(block_manager, seq, k)
                own = 1 if len(seq.block_table) * bs <= seq.num_computed_tokens else 0
                if new and block_manager.num_free_blocks - new < headroom - own:
                    continue
                headroom -= own  # its next-token block is part of the reservation
                block_manager.allocate(seq, 1 + k)
            seqs.append(seq)
            ks.append(k)
        if not seqs:
            return
        params = [requests[s.request_id].params for s in seqs]
        generators = [requests[s.request_id].generator for s in seqs]
        drafts: list[Draft] = self.proposer.propose(seqs, ks, params, generators)
        for seq, draft in zip(seqs, drafts):
            seq.draft_token_ids = list(draft.token_ids)
            self._q[seq.request_id] = draft.q

    @staticmethod
    def _new_blocks(block_manager, seq: Sequence, k: int) -> int:
        needed = -(-(seq.num_computed_tokens + 1 + k) // block_manager.block_size)
        return max(0, needed - len(seq.block_table))

    # ---- after the forward -----------------------------------------------

    def verify(self, item, logits: torch.Tensor, request) -> list[int]:
        """The tokens ``item`` (which fed drafts) emits, from its 1 + d logit rows."""
        drafts = item.token_ids[len(item.token_ids) - item.num_draft_tokens:]
        q = self._q.pop(item.request_id, None)
        if request.params.greedy:
            tokens = verify_greedy(logits.max(dim=-1).indices.tolist(), drafts)
        else:
            p = probabilities(logits, [request.params] * logits.shape[0])
            tokens = verify_sampled(p, drafts, None if q is None else q[:len(drafts)], request.generator)
        accepted = len(tokens) - 1
        self.stats.add(len(drafts), accepted, len(tokens))
        request.metrics.add(len(drafts), accepted, len(tokens))
        self.adaptive.observe(item.request_id, len(drafts), accepted)
        return tokens

    def after_step(self, scheduled) -> None:
        """Draft K/V is valid only up to what the target verified."""
        for item in scheduled:
            seq = item.seq
            if seq.num_draft_computed > seq.num_computed_tokens:
                seq.num_draft_computed = seq.num_computed_tokens
        for request_id in list(self._q):  # drafted, but the scheduler fed none of it
            del self._q[request_id]

    def forget(self, request_id: str) -> None:
        self._q.pop(request_id, None)
        self.adaptive.forget(request_id)


def build_speculator(config: SpeculativeConfig, target_model: torch.nn.Module, target_runner,
                     num_blocks: int, engine_config) -> Speculator:
    if config.method == "lookahead":
        from llmopt.runtime.speculative.lookahead import LookaheadSpeculator

        return LookaheadSpeculator(config, target_runner, SpecStats())
    if config.method == "ngram":
        return Speculator(config, NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max),
                          reserves_slots=False)
    from llmopt.runtime.model_runner import ModelRunner, RunnerOptions
    from llmopt.runtime.speculative.proposers import layer_skip_model

    options = target_runner.options
    if config.method == "layer_skip":
        draft = layer_skip_model(target_model, config.num_layers)
        runner = ModelRunner(draft, RunnerOptions(options.device, options.block_size, options.lower,
                                                  options.kernels))
        runner.layer_specs = runner.profile()
        return Speculator(config, ModelProposer(runner, target_runner, True, num_blocks), True)
    draft = resolve_draft_model(config.model, engine_config)
    _check_vocab(draft, target_model)
    runner = ModelRunner(draft, RunnerOptions(options.device, options.block_size, options.lower,
                                              options.kernels, dict(config.model_options)))
    runner.layer_specs = runner.profile()
    return Speculator(config, ModelProposer(runner, target_runner, False, num_blocks), True)


def resolve_draft_model(model, engine_config) -> torch.nn.Module:
    if isinstance(model, torch.nn.Module):
        module = model
    elif isinstance(model, str):
        from llmopt.models import load

        module = load(model, dtype=engine_config.dtype).model
    else:
        from llmopt.errors import LLMOptConfigError

        raise LLMOptConfigError("speculative_config: model must be a name, a path or an nn.Module, "
                                f"got {type(model).__name__}")
    return module.to(device=engine_config.resolved_device(), dtype=engine_config.dtype).eval()


def _check_vocab(draft, target) -> None:
    def vocab(m):
        return getattr(getattr(m, "config", None), "vocab_size", None)

    if vocab(draft) is not None and vocab(target) is not None and vocab(draft) != vocab(target):
        from llmopt.errors import LLMOptConfigError

        raise LLMOptConfigError(
            f"speculative_config: the draft model's vocabulary has {vocab(draft)} tokens but the "
            f"target's has {vocab(target)}; a draft must share the target's tokenizer")
