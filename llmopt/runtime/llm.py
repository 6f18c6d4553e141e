"""``llmopt.LLM``: the offline entry point to the serving engine (mirrors vLLM's ``LLM``).

    llm = llmopt.LLM("smollm2")
    outputs = llm.generate(["Hello", "The capital of France is"],
                           llmopt.SamplingParams(temperature=0, max_tokens=32))
    print(outputs[0].text)

``generate`` submits every prompt at once and runs the engine until all are
done (continuous batching); ``stream`` yields each request's output as it
grows; ``engine`` is the step-level API the server uses.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from llmopt.runtime.engine import LLMEngine
from llmopt.runtime.engine_config import EngineConfig
from llmopt.runtime.outputs import RequestOutput
from llmopt.runtime.sampling_params import SamplingParams

Prompt = "str | list[int]"


class LLM:
    """A model served by the llmopt engine.

    Args:
        model: ``"smollm2"`` (the embedded default), a local Hugging Face
            directory or ``.gguf`` file, or an ``nn.Module`` that follows the
            runtime's protocol (then pass ``tokenizer``).
            An :class:`llmopt.Cascade` serves its models as a cascade
            (``llmopt/runtime/cascade.py``); ``options`` then apply to each.
        tokenizer: a Hugging Face tokenizer (needed for string prompts and
            text output when ``model`` is a module).
        **options: :class:`EngineConfig` fields (``dtype``, ``lower``,
            ``kv_cache_memory_gib``, ``max_num_seqs``, ``num_kv_blocks``, ...).
    """

    def __init__(self, model: Any = "smollm2", tokenizer: Any = None, **options: Any):
        from llmopt.runtime.cascade import Cascade

        if isinstance(model, Cascade):  # its own engine, with the same step API
            self.engine = model.build_engine(tokenizer, **options)
            return
        config = EngineConfig.from_kwargs(**options)
        module, tokenizer, name = _resolve_model(model, tokenizer, config)
        self.engine = LLMEngine(module, tokenizer, config, model_name=name,
                                model_source=model if isinstance(model, str) else None)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: "Prompt | Sequence[Prompt]",
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Complete every prompt; outputs in the order of ``prompts``."""
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompts))
        ids = self._add_all(prompts, params)
        finished: dict[str, RequestOutput] = {}
        progress = _Progress(len(ids)) if use_tqdm else None
        try:
            while self.engine.has_unfinished():
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        if progress:
                            progress.update(output)
        except BaseException:
            for request_id in ids:
                self.engine.abort(request_id)
            raise
        finally:
            if progress:
                progress.close()
        return [finished[i] for i in ids]

    def stream(self, prompts: "Prompt | Sequence[Prompt]",
               sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
               ) -> Iterator[RequestOutput]:
        """Yield each request's cumulative output every step it grows.

        Closing the iterator early (``break``) aborts the requests still running.
        """
        prompts = _as_prompt_list(prompts)
        ids = self._add_all(prompts, _as_params_list(sampling_params, len(prompts)))
        running = set(ids)
        try:
            while running:
                for output in self.engine.step():
                    if output.request_id in running:
                        if output.finished:
                            running.discard(output.request_id)
                        yield output
                if not self.engine.has_unfinished():
                    break
        finally:
            for request_id in running:
                self.engine.abort(request_id)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def _add_all(self, prompts, params) -> list[str]:
        ids: list[str] = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self.engine.add_request(None, prompt, p))
        except BaseException:
            for request_id in ids:  # nothing half-submitted stays queued
                self.engine.abort(request_id)
            raise
        return ids


def _resolve_model(model, tokenizer, config: EngineConfig):
    if isinstance(model, torch.nn.Module):
        module = model
        name = type(model).__name__
    elif isinstance(model, str):
        from llmopt.models import load

        loaded = load(model, dtype=config.dtype)
        module, tokenizer = loaded.model, tokenizer or loaded.tokenizer
        name = model
    else:
        raise TypeError(f"model must be a name, a path or an nn.Module, got {type(model).__name__}")
    module = module.to(device=config.resolved_device(), dtype=config.dtype).eval()
    return module, tokenizer, name


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]  # one prompt given as token ids
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a string, a list of token ids, or a non-empty list of those")
    return list(prompts)


def _as_params_list(params, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling params for {count} prompts; give one, or one per prompt")
    return params


class _Progress:
    """A one-line progress report on stderr: requests done and output tokens/s."""

    def __init__(self, total: int):
        self.total, self.done, self.tokens = total, 0, 0
        self.start = time.perf_counter()

    def update(self, output: RequestOutput) -> None:
        self.done += 1
        self.tokens += len(output.token_ids)
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        print(f"\rllmopt: {self.done}/{self.total} requests, {rate:.1f} output tok/s",
              end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        print(file=sys.stderr)
