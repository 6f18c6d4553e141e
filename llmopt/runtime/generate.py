"""A simple single-sequence generation loop (greedy or temperature sampling).

Used by the CLI and the decode benchmark until the serving engine replaces it.
It calls ``model`` directly, so pass either the model or a compiled wrapper
(``torch.compile(model, ...)``); compiling is the caller's business.

KV cache: a transformers ``StaticCache`` sized ``prompt + max_tokens`` rounded
up to a multiple of 128. Its shapes never change during decoding, so a compiled
model compiles the decode step once (a DynamicCache's growing length makes a
string of recompiles; the timings: docs/PERFORMANCE.md).

Tokens are chosen by the engine's sampler (:func:`llmopt.runtime.sampler.sample`
with a :class:`SamplingParams` and the request's seeded generator) and the
loop stops on the engine's EOS rule (:mod:`llmopt.runtime.stop_tokens`), so
``--no-compile`` and the engine pick the same tokens from the same logits.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from llmopt.runtime.sampler import new_generator, sample
from llmopt.runtime.sampling_params import SamplingParams
from llmopt.runtime.stop_tokens import eos_token_ids

CACHE_MULTIPLE = 128


@dataclass
class GenerationStats:
    """Timings of one generation; time spent by the consumer is excluded."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0  # prompt forward pass + choosing the first token
    decode_s: float = 0.0  # every later step

    @property
    def decode_tokens_per_s(self) -> float:
        # The first new token comes from the prefill, so decode made the rest.
        decoded = self.new_tokens - 1
        return decoded / self.decode_s if decoded > 0 and self.decode_s > 0 else 0.0


def cache_length(prompt_tokens: int, max_tokens: int) -> int:
    """KV cache size for a request, rounded up so that nearby request sizes
    share one cache shape (and so one compiled graph)."""
    needed = prompt_tokens + max_tokens
    return -(-needed // CACHE_MULTIPLE) * CACHE_MULTIPLE


def default_eos_token_ids(model, tokenizer=None) -> set[int]:
    """Stop tokens: the engine's rule (:func:`llmopt.runtime.stop_tokens.eos_token_ids`)."""
    return eos_token_ids(model, tokenizer)


def generate_stream(
    model,
    tokenizer,
    prompt_ids,
    max_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = None,
    eos_token_ids: Iterable[int] | None = None,
    stats: GenerationStats | None = None,
    max_cache_len: int | None = None,
    config=None,
) -> Iterator[int]:
    """Yield new token ids one at a time, for one prompt.

    model: a Hugging Face causal LM, or a compiled wrapper of one.
    tokenizer: only used to find stop tokens when ``eos_token_ids`` is None.
    prompt_ids: token ids, shape (length,) or (1, length).
    temperature: 0 means greedy; otherwise sample from softmax(logits / T),
        restricted to the ``top_k`` most likely tokens if given.
    eos_token_ids: stop after yielding one of these; None means the model's
        and tokenizer's defaults; an empty collection never stops early.
    stats: filled in as generation proceeds (see GenerationStats).
    max_cache_len: KV cache size; defaults to ``cache_length(...)``.
    config: the model config, needed only if ``model`` has no ``.config``.
    """
    if max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    prompt = torch.as_tensor(prompt_ids).reshape(1, -1)
    needed = prompt.shape[1] + max_tokens - 1  # the last new token is never fed back
    max_cache_len = max_cache_len or cache_length(prompt.shape[1], max_tokens)
    if max_cache_len < needed:
        raise ValueError(f"max_cache_len={max_cache_len} is too small: this request needs {needed}")
    stop = set(default_eos_token_ids(model, tokenizer) if eos_token_ids is None else eos_token_ids)
    config = config if config is not None else model.config
    # The engine's sampler, with the engine's options and per-request generator.
    params = SamplingParams(max_tokens=None, temperature=temperature, top_k=top_k or 0, seed=seed)
    generator = new_generator(params, _device(model))
    # Checks above run at the call; the loop itself runs as tokens are taken.
    return _stream(model, prompt, max_tokens, params, generator, stop,
                   stats if stats is not None else GenerationStats(), max_cache_len, config)


def _device(model) -> torch.device:
    parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return parameter.device if parameter is not None else torch.device("cpu")


def _stream(model, prompt, max_tokens, params, generator, stop, stats, max_cache_len, config):
    from transformers import StaticCache

    prompt_len = prompt.shape[1]
    with torch.inference_mode():
        cache = StaticCache(config=config, max_cache_len=max_cache_len)
    stats.prompt_tokens, stats.new_tokens = prompt_len, 0
    stats.prefill_s = stats.decode_s = 0.0

    token = None
    for step in range(max_tokens):
        start = time.perf_counter()
        if step == 0:
            token = _forward_and_choose(model, prompt, 0, cache, params, generator)
            stats.prefill_s = time.perf_counter() - start
        else:
            last = torch.tensor([[token]])
            token = _forward_and_choose(model, last, prompt_len + step - 1, cache, params, generator)
            stats.decode_s += time.perf_counter() - start
        stats.new_tokens += 1
        yield token
        if token in stop:
            return


@torch.inference_mode()
def _forward_and_choose(model, ids, first_position, cache, params, generator) -> int:
    # Inference mode per step, not around the whole loop: a generator's `with`
    # block would stay active in the consumer's code between yields. Inputs are
    # copied in here so every call sees inference tensors; a compiled model
    # guards on dispatch keys and would otherwise recompile.
    ids = ids.clone()
    positions = torch.arange(first_position, first_position + ids.shape[1]).unsqueeze(0)
    out = model(
        input_ids=ids,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,  # only the last position's logits are needed
    )
    return sample(out.logits[0, -1:], [params], [generator])[0]


def generate(model, tokenizer, prompt_ids, max_tokens: int, **options) -> tuple[list[int], GenerationStats]:
    """Run ``generate_stream`` to the end; returns (new token ids, stats)."""
    stats = GenerationStats()
    tokens = list(generate_stream(model, tokenizer, prompt_ids, max_tokens, stats=stats, **options))
    return tokens, stats


def warm_up(model, prompt_ids, max_tokens: int, steps: int = 3, config=None) -> float:
    """Seconds to run prefill and a few decode steps with the cache shape a
    real request of this size will use. On a compiled model this is where
    compilation happens, so later runs are measured at steady state."""
    prompt_len = torch.as_tensor(prompt_ids).reshape(1, -1).shape[1]
    start = time.perf_counter()
    generate(
        model,
        None,
        prompt_ids,
        max_tokens=min(max_tokens, 1 + steps),
        eos_token_ids=(),
        max_cache_len=cache_length(prompt_len, max_tokens),
        config=config,
    )
    return time.perf_counter() - start
