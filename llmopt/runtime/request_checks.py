"""What every engine checks when a request comes in: its parameters, its id and its prompt.

Shared by :class:`~llmopt.runtime.engine.LLMEngine` and the cascade engines, so
a bad request gets the same message whichever engine serves it.
"""

from __future__ import annotations

from collections.abc import Callable, Container

import torch

from llmopt.runtime.sampling_params import SamplingParams


def checked_request(request_id: str | None, params: SamplingParams | None, in_use: Container[str],
                    new_id: Callable[[], str]) -> tuple[str, SamplingParams]:
    """The request's id (a new one for None) and parameters (defaults for None), or an error."""
    params = SamplingParams() if params is None else params
    if not isinstance(params, SamplingParams):
        raise TypeError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
    request_id = new_id() if request_id is None else str(request_id)
    if request_id in in_use:
        raise ValueError(f"request id {request_id!r} is already in use")
    return request_id, params


def tokenize_prompt(prompt, tokenizer, vocab_size: int | None) -> tuple[str | None, list[int]]:
    """(prompt text or None, token ids) of a string or a list of token ids; ValueError if bad."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("the prompt is empty")
        return prompt, list(tokenizer.encode(prompt))
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.tolist()
    if not isinstance(prompt, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise ValueError("a prompt is a string or a list of token ids (ints)")
    if not prompt:
        raise ValueError("the prompt is empty: at least one token id is needed")
    bad = [t for t in prompt if t < 0 or (vocab_size and t >= vocab_size)]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    return None, list(prompt)
