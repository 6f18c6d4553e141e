"""The token-level cascade's engine: the small model proposes, the large one judges, in rounds.

Each ``step()`` is one round for every running request, batched: the small
model decodes up to ``num_draft_tokens`` candidates (k forwards, all
requests packed into each), the large model scores them in one forward,
and :func:`judge_candidates` keeps the candidates that pass the rule, up to
the first that fails, which the large model's token replaces. Between
rounds both models hold the K/V of every token of a request but its last
one, so the next round feeds that token (and, in its first round, the
prompt: the prefill is the first round's catch-up) and nothing is ever
recomputed: the K/V a model wrote for a candidate that was replaced lies
past the request's end and is overwritten.

Memory: both models run through their own :class:`ModelRunner` (compiled
with the paging pass) on one block table per request; each running request
holds a fixed slot of ``max_model_len`` positions in both caches (no
paging between requests, no preemption). ``max_num_seqs`` slots, fewer if
``kv_cache_memory_gib`` cannot hold them; more requests wait for a slot.
Requests join and leave between rounds, so concurrent requests share the
models' forwards (continuous batching at round granularity).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch

from llmopt.runtime.cascade_cost import CascadeStats, ModelCost, ModelShape
from llmopt.runtime.cascade_outputs import CascadeInfo, CascadeRequestOutput
from llmopt.runtime.cascade_rules import TokenRule, judge_candidates
from llmopt.runtime.detokenizer import IncrementalDetokenizer
from llmopt.runtime.kv_budget import cpu_budget_bytes, gpu_budget_bytes
from llmopt.runtime.model_runner import ModelRunner, RunnerOptions
from llmopt.runtime.outputs import CompletionOutput, RequestMetrics
from llmopt.runtime.request_checks import checked_request, tokenize_prompt
from llmopt.runtime.sampler import draw, logprob_entry, new_generator, probabilities
from llmopt.runtime.sampling_params import SamplingParams
from llmopt.runtime.scheduler import ScheduledSequence
from llmopt.runtime.sequence import Sequence
from llmopt.runtime.stop_tokens import eos_token_ids

_DEFAULT_MAX_MODEL_LEN = 2048  # when neither the models nor the options give a length


@dataclass(eq=False)  # identity: requests are found in the queues by who they are
class _Request:
    seq: Sequence  # tokens and the slot's block table
    params: SamplingParams
    prompt: str | None
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    metrics: RequestMetrics
    info: CascadeInfo
    slot: int | None = None
    num_done: int = 0  # leading positions whose K/V both models hold
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list | None = None


class TokenCascadeEngine:
    """The step-level API of :class:`LLMEngine` (``add_request``, ``step``, ``abort``,
    ``has_unfinished``), so ``LLM`` and ``llmopt serve`` drive it the same way."""

    def __init__(self, members, tokenizer, config, rule: TokenRule, model_name: str):
        (small_spec, small), (large_spec, large) = members
        self.tokenizer = tokenizer
        self.config = config
        self.model_name = model_name
        self.rule = rule
        self.device = config.resolved_device()
        bs = config.block_size
        start = time.perf_counter()
        self.runners = []
        for spec, module in members:
            runner = ModelRunner(module, RunnerOptions(self.device, bs, config.lower, config.kernels,
                                                       spec.compile_options))
            runner.layer_specs = runner.profile()  # compiles
            self.runners.append(runner)
        self.warmup_seconds = time.perf_counter() - start
        self.small, self.large = self.runners
        self.max_model_len = self._max_model_len([small, large])
        self.blocks_per_slot = -(-self.max_model_len // bs)
        self.num_slots = self._num_slots()
        self.num_total_blocks = self.num_slots * self.blocks_per_slot
        for runner in self.runners:
            runner.allocate_kv_cache(self.num_total_blocks)
        self.eos_token_ids = eos_token_ids(large, tokenizer)
        self.vocab_size = getattr(getattr(large, "config", None), "vocab_size", None)
        self.stats = CascadeStats(models=[ModelCost(small_spec.label(), ModelShape.of(small)),
                                          ModelCost(large_spec.label(), ModelShape.of(large))])
        self._free_slots = list(range(self.num_slots))
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._requests: dict[str, _Request] = {}
        self._next_id = 0
        self.num_steps = 0

    # ---- sizing ----------------------------------------------------------

    def _max_model_len(self, modules) -> int:
        limits = [getattr(getattr(m, "config", None), "max_position_embeddings", None) for m in modules]
        limits = [x for x in limits + [self.config.max_model_len] if x]
        return min(limits) if limits else _DEFAULT_MAX_MODEL_LEN

    def _num_slots(self) -> int:
        per_token = sum(s.bytes_per_token() for r in self.runners for s in r.layer_specs.values())
        per_slot = per_token * self.blocks_per_slot * self.config.block_size
        if self.config.num_kv_blocks is not None:
            budget = self.config.num_kv_blocks * self.config.block_size * per_token
        elif self.device.type == "cuda":
            budget = gpu_budget_bytes(self.config.gpu_memory_utilization, self.device)
        else:
            budget = cpu_budget_bytes(self.config.kv_cache_memory_gib)
        slots = min(self.config.max_num_seqs, int(budget // per_slot))
        if slots < 1:
            raise ValueError(f"the cascade's KV budget ({budget} bytes) holds no request of max_model_len="
                             f"{self.max_model_len} in both models ({per_slot} bytes); raise kv_cache_memory_gib "
                             "or lower max_model_len")
        return slots

    def set_rule(self, rule: TokenRule) -> None:
        """Judge the next rounds by another rule (benchmarks sweep it on one compiled engine)."""
        if not isinstance(rule, TokenRule):
            raise TypeError(f"a token cascade takes a TokenRule, got {type(rule).__name__}")
        self.rule = rule

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_slots) * self.blocks_per_slot

    # ---- requests --------------------------------------------------------

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    def new_request_id(self) -> str:
        self._next_id += 1
        return f"cascade-{self._next_id}"

    def add_request(self, request_id: str | None, prompt, params: SamplingParams | None = None) -> str:
        request_id, params = checked_request(request_id, params, self._requests, self.new_request_id)
        prompt_text, token_ids = tokenize_prompt(prompt, self.tokenizer, self.vocab_size)
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(token_ids)} tokens, but this cascade serves at most "
                             f"{self.max_model_len} tokens per sequence (prompt + at least one output token)")
        request = _Request(Sequence(request_id, token_ids, params=params, max_tokens=params.max_tokens),
                           params, prompt_text, IncrementalDetokenizer(self.tokenizer, token_ids, params),
                           new_generator(params, self.device), RequestMetrics(arrival_time=time.perf_counter()),
                           CascadeInfo("token"))
        self._requests[request_id] = request
        self._waiting.append(request)
        return request_id

    def abort(self, request_id: str) -> CascadeRequestOutput | None:
        request = self._requests.pop(str(request_id), None)
        if request is None:
            return None
        if request in self._waiting:
            self._waiting.remove(request)
        else:
            self._running.remove(request)
            self._release(request)
        request.metrics.finished_time = time.perf_counter()
        return self._output(request)

    # ---- one round -------------------------------------------------------

    def step(self) -> list[CascadeRequestOutput]:
        self._admit()
        running = list(self._running)
        if not running:
            return []
        k = self.rule.num_draft_tokens
        ks = [min(k, self.max_model_len - r.seq.num_tokens,
                  (r.params.max_tokens or self.max_model_len) - r.seq.num_output_tokens) for r in running]
        candidates, confidences = self._propose(running, ks)
        large_logits = self._score(running, ks, candidates)
        now = time.perf_counter()
        outputs = []
        row = 0
        self.stats.num_rounds += 1
        for request, count, cands, confs in zip(running, ks, candidates, confidences):
            rows = large_logits[row:row + count]
            row += count
            tokens, kept = judge_candidates(cands, confs, rows, self.rule.threshold, self.rule.top_k,
                                            request.params, request.generator)
            self._emit(request, tokens, kept, rows)
            if request.metrics.first_token_time is None:
                request.metrics.first_token_time = now
            if request.finish_reason is not None:
                request.metrics.finished_time = now
                self._finish(request)
            outputs.append(self._output(request))
        self.num_steps += 1
        return outputs

    def _admit(self) -> None:
        while self._waiting and self._free_slots:
            request = self._waiting.popleft()
            request.slot = self._free_slots.pop(0)
            first = request.slot * self.blocks_per_slot
            request.seq.block_table = list(range(first, first + self.blocks_per_slot))
            request.num_done = 0
            self._running.append(request)

    def _propose(self, running: list[_Request], ks: list[int]) -> tuple[list[list[int]], list[list[float]]]:
        """Each request's candidates and the small model's probability of each."""
        cost = self.stats.models[0]
        bs = self.config.block_size
        feeds = [(r.num_done, r.seq.token_ids(r.num_done, r.seq.num_tokens)) for r in running]
        candidates: list[list[int]] = [[] for _ in running]
        confidences: list[list[float]] = [[] for _ in running]
        active = list(range(len(running)))
        while active:
            start_time = time.perf_counter()
            logits = self.small.execute_packed(
                [(feeds[i][1], feeds[i][0], running[i].seq.block_table) for i in active], bs)
            probs = logits.softmax(dim=-1)
            argmax = logits.max(dim=-1).indices.tolist()
            next_active = []
            for r, i in enumerate(active):
                params = running[i].params
                if params.greedy:
                    token = argmax[r]
                else:
                    token = draw(probabilities(logits[r:r + 1], [params])[0], running[i].generator)
                candidates[i].append(token)
                confidences[i].append(float(probs[r, token]))
                start, tokens = feeds[i]
                cost.add_tokens(start, len(tokens), 1)
                if len(candidates[i]) < ks[i]:
                    feeds[i] = (start + len(tokens), [token])
                    next_active.append(i)
            cost.add(time.perf_counter() - start_time)
            active = next_active
        return candidates, confidences

    def _score(self, running: list[_Request], ks: list[int], candidates: list[list[int]]) -> torch.Tensor:
        """The large model's logits at every candidate's position: ks[i] rows per request."""
        cost = self.stats.models[1]
        bs = self.config.block_size
        items = []
        for request, count, cands in zip(running, ks, candidates):
            seq, start = request.seq, request.num_done
            tokens = seq.token_ids(start, seq.num_tokens) + cands[:count - 1]
            table = seq.block_table
            slots = [table[p // bs] * bs + p % bs for p in range(start, start + len(tokens))]
            items.append(ScheduledSequence(seq, start, len(tokens), tokens, slots, samples=True,
                                           num_draft_tokens=count - 1))
            cost.add_tokens(start, len(tokens), count)
        start_time = time.perf_counter()
        logits = self.large.execute(items)
        cost.add(time.perf_counter() - start_time)
        return logits

    def _emit(self, request: _Request, tokens: list[int], kept: int, rows: torch.Tensor) -> None:
        """Append the round's tokens one by one until one ends the request."""
        seq, info = request.seq, request.info
        large_choice = rows.max(dim=-1).indices.tolist()
        want_logprobs = request.params.logprobs is not None
        logprobs = torch.log_softmax(rows, dim=-1) if want_logprobs else None
        info.num_judged += min(kept + 1, len(rows))
        info.num_kept += kept
        request.metrics.add(min(kept + 1, len(rows)), kept, len(tokens))
        for j, token in enumerate(tokens):
            seq.output_token_ids.append(token)
            self.stats.models[0 if j < kept else 1].num_emitted += 1
            info.num_agree_large += int(token == large_choice[j])
            if want_logprobs:
                _append_logprob(request, logprobs[j], token)
            request.detokenizer.add(token)
            stop = request.detokenizer.check_stop(self.eos_token_ids)
            if stop is not None:
                request.finish_reason, request.stop_reason = "stop", stop[1]
            elif request.params.max_tokens is not None and seq.num_output_tokens >= request.params.max_tokens:
                request.finish_reason = "length"
            elif seq.num_tokens >= self.max_model_len:
                request.finish_reason = "length"
            if request.finish_reason is not None:
                break
        request.num_done = seq.num_tokens - 1

    def _finish(self, request: _Request) -> None:
        if request.finish_reason != "stop":
            request.detokenizer.flush()
        self._running.remove(request)
        self._release(request)
        del self._requests[request.seq.request_id]
        info, stats = request.info, self.stats
        stats.num_requests += 1
        stats.num_emitted += request.seq.num_output_tokens
        stats.num_judged += info.num_judged
        stats.num_kept += info.num_kept
        stats.num_agree_large += info.num_agree_large

    def _release(self, request: _Request) -> None:
        if request.slot is not None:
            self._free_slots.append(request.slot)
            request.slot = None

    def _output(self, request: _Request) -> CascadeRequestOutput:
        seq = request.seq
        completion = CompletionOutput(0, request.detokenizer.text, list(seq.output_token_ids),
                                      request.finish_reason, request.stop_reason,
                                      None if request.logprobs is None else list(request.logprobs))
        return CascadeRequestOutput(seq.request_id, request.prompt, list(seq.prompt_token_ids), [completion],
                                    finished=request.finish_reason is not None, metrics=request.metrics,
                                    cascade=request.info)


def _append_logprob(request: _Request, logprobs: torch.Tensor, token: int) -> None:
    """The token's log-probability under the large model (the one that judged it), and its top ones."""
    if request.logprobs is None:
        request.logprobs = []
    request.logprobs.append(logprob_entry(logprobs, token, request.params.logprobs))


