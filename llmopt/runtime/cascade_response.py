"""The response-level cascade's engine: each model answers in turn until one is confident.

Every model runs on its own :class:`LLMEngine` (its own compiled model, KV
pool, continuous batching). A request starts on the cheapest model; when
its answer finishes, its mean token confidence (:func:`response_confidence`,
from the log-probabilities the engine records: the emitted token's and the
most likely one's) is compared with that model's threshold, and a request
below it is submitted afresh, same prompt and parameters, to the next model.
The last model's answer is always kept. Only the kept answer is handed out
(finished), so a streaming client gets it in one piece.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from llmopt.runtime.cascade_cost import CascadeStats, ModelCost, ModelShape
from llmopt.runtime.cascade_outputs import CascadeInfo, CascadeRequestOutput
from llmopt.runtime.cascade_rules import ResponseRule, response_confidence
from llmopt.runtime.engine import LLMEngine
from llmopt.runtime.outputs import CompletionOutput
from llmopt.runtime.request_checks import checked_request
from llmopt.runtime.sampling_params import SamplingParams


@dataclass
class _Request:
    prompt_ids: list[int]
    prompt: str | None
    params: SamplingParams  # the caller's
    inner: SamplingParams  # what each model runs: the caller's, with log-probabilities on
    arrival_time: float
    info: CascadeInfo
    level: int = 0  # the model answering now


class ResponseCascadeEngine:
    """The step-level API of :class:`LLMEngine`, over one engine per model."""

    def __init__(self, members, tokenizer, config, rule: ResponseRule, model_name: str):
        self.tokenizer = tokenizer
        self.config = config
        self.model_name = model_name
        self.rule = rule
        start = time.perf_counter()
        self.engines = [LLMEngine(module, tokenizer, dataclasses.replace(config, compile_options=spec.compile_options),
                                  model_name=spec.label()) for spec, module in members]
        self.warmup_seconds = time.perf_counter() - start
        self.max_model_len = min(e.max_model_len for e in self.engines)
        self.stats = CascadeStats(models=[ModelCost(spec.label(), ModelShape.of(module)) for spec, module in members],
                                  answered_by=[0] * len(members))
        self._requests: dict[str, _Request] = {}
        self._next_id = 0
        self.num_steps = 0

    def set_rule(self, rule: ResponseRule) -> None:
        """Judge answers finishing from now on by another rule (benchmarks sweep it)."""
        if not isinstance(rule, ResponseRule) or len(rule.thresholds) != len(self.engines) - 1:
            raise TypeError(f"this cascade takes a ResponseRule with {len(self.engines) - 1} threshold(s)")
        self.rule = rule

    @property
    def num_total_blocks(self) -> int:
        return sum(e.num_total_blocks for e in self.engines)

    @property
    def num_free_blocks(self) -> int:
        return sum(e.num_free_blocks for e in self.engines)

    def has_unfinished(self) -> bool:
        return any(e.has_unfinished() for e in self.engines)

    def new_request_id(self) -> str:
        self._next_id += 1
        return f"cascade-{self._next_id}"

    def add_request(self, request_id: str | None, prompt, params: SamplingParams | None = None) -> str:
        request_id, params = checked_request(request_id, params, self._requests, self.new_request_id)
        prompt_text = prompt if isinstance(prompt, str) else None
        prompt_ids = list(self.tokenizer.encode(prompt)) if isinstance(prompt, str) and prompt else prompt
        # The confidence needs each token's log-probability and the most likely one's.
        inner = dataclasses.replace(params, logprobs=max(params.logprobs or 0, 1))
        self.engines[0].add_request(request_id, prompt_ids, inner)  # checks the prompt
        prompt_ids = [int(t) for t in prompt_ids]
        if len(prompt_ids) >= self.max_model_len:
            self.engines[0].abort(request_id)
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens, but this cascade serves at most "
                             f"{self.max_model_len} tokens per sequence (prompt + at least one output token)")
        self._requests[request_id] = _Request(prompt_ids, prompt_text, params, inner,
                                              time.perf_counter(), CascadeInfo("response"))
        return request_id

    def abort(self, request_id: str) -> CascadeRequestOutput | None:
        request = self._requests.pop(str(request_id), None)
        if request is None:
            return None
        output = self.engines[request.level].abort(request_id)
        return None if output is None else self._output(request, output)

    def step(self) -> list[CascadeRequestOutput]:
        outputs = []
        last = len(self.engines) - 1
        for level, engine in enumerate(self.engines):
            if not engine.has_unfinished():
                continue
            start = time.perf_counter()
            step_outputs = engine.step()
            self.stats.models[level].add(time.perf_counter() - start)
            for output in step_outputs:
                if not output.finished:
                    continue
                request = self._requests[output.request_id]
                completion = output.outputs[0]
                cost = self.stats.models[level]
                num_out = len(completion.token_ids)
                cost.add_tokens(0, len(request.prompt_ids) + num_out - 1, num_out)
                cost.num_emitted += num_out
                confidence = response_confidence(completion.logprobs or [], self.rule.confidence)
                request.info.confidences.append(confidence)
                if level < last and confidence < self.rule.thresholds[level]:
                    request.level = level + 1
                    self.engines[level + 1].add_request(output.request_id, request.prompt_ids, request.inner)
                    continue
                del self._requests[output.request_id]
                request.info.model_index = level
                self.stats.answered_by[level] += 1
                self.stats.num_requests += 1
                self.stats.num_emitted += num_out
                outputs.append(self._output(request, output))
        self.num_steps += 1
        return outputs

    def _output(self, request: _Request, output) -> CascadeRequestOutput:
        completion = output.outputs[0]
        logprobs = None
        if request.params.logprobs is not None and completion.logprobs is not None:
            keep = request.params.logprobs  # the caller's count of alternatives (the engine ran with >= 1)
            logprobs = [(t, lp, top[:keep]) for t, lp, top in completion.logprobs]
        completion = dataclasses.replace(completion, logprobs=logprobs)
        metrics = output.metrics
        if metrics is not None:
            metrics = dataclasses.replace(metrics, arrival_time=request.arrival_time)
        return CascadeRequestOutput(output.request_id, request.prompt, list(request.prompt_ids), [completion],
                                    finished=output.finished, metrics=metrics, cascade=request.info)
