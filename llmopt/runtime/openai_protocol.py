"""The OpenAI API's request checks and response shapes, without HTTP.

``llmopt serve`` (``server.py``) reads a body, hands it to
``parse_completion_request`` or ``parse_chat_request`` and gets back a
``GenerationRequest`` or a ``RequestError`` (HTTP 400 in OpenAI's error
shape). ``prompt_token_ids`` turns the request into token ids and checks
them against the model's context; the ``*_response`` and ``*_chunk``
functions build the JSON objects the official client expects.

Fields OpenAI defines but llmopt does not implement (``logprobs``,
penalties, tools ...) are accepted only at their "off" value, so a client
never silently gets something other than what it asked for; names OpenAI
does not define are rejected as OpenAI itself does.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

COMPLETION = "completion"
CHAT = "chat"
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

_COMMON_FIELDS = ("model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream",
                  "stream_options", "ignore_eos", "stop_token_ids", "skip_special_tokens",
                  "include_stop_str_in_output")
_FIELDS = {COMPLETION: frozenset(_COMMON_FIELDS + ("prompt",)),
           CHAT: frozenset(_COMMON_FIELDS + ("messages", "max_completion_tokens"))}
# Accepted and without effect: bookkeeping for the caller.
_IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier"})
# OpenAI's features llmopt lacks, allowed only at a value that turns them off
# (None is always allowed).
_OFF_VALUES = {
    "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},), "logprobs": (False, 0),
    "top_logprobs": (0,), "echo": (False,), "best_of": (1,), "suffix": ("",), "tools": ([],),
    "tool_choice": ("none", "auto"), "response_format": ({"type": "text"},),
    "parallel_tool_calls": (True, False),
}
_CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class RequestError(Exception):
    """A request the server refuses: becomes ``{"error": {...}}`` with ``status``."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.type = type
        self.code = code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class GenerationRequest:
    """A checked request of either endpoint; None means "not given"."""

    kind: str
    model: str | None = None
    prompt: str | list[int] | None = None  # /v1/completions
    messages: list[dict] | None = None  # /v1/chat/completions: [{"role", "content": str}]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    include_usage: bool = False


# --- parsing ---------------------------------------------------------------


def parse_completion_request(body: bytes) -> GenerationRequest:
    """Check a /v1/completions body; raises RequestError."""
    data = _load_object(body)
    request = _parse_common(data, COMPLETION)
    request.prompt = _parse_prompt(data.get("prompt"))
    return request


def parse_chat_request(body: bytes) -> GenerationRequest:
    """Check a /v1/chat/completions body; raises RequestError."""
    data = _load_object(body)
    request = _parse_common(data, CHAT)
    request.messages = _parse_messages(data.get("messages"))
    # max_completion_tokens replaces max_tokens in OpenAI's current API.
    newer = _optional_int(data, "max_completion_tokens", minimum=1)
    if newer is not None:
        request.max_tokens = newer
    return request


def _load_object(body: bytes) -> dict:
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as error:
        raise RequestError(f"the request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise RequestError(f"the request body must be a JSON object, got {_json_type(data)}")
    return data


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a valid JSON number")


def _parse_common(data: dict, kind: str) -> GenerationRequest:
    _check_field_names(data, kind)
    request = GenerationRequest(kind=kind)
    request.model = _optional(data, "model", str, "a string")
    request.max_tokens = _optional_int(data, "max_tokens", minimum=1)
    request.temperature = _optional_number(data, "temperature", minimum=0.0)
    request.top_p = _optional_number(data, "top_p", minimum=0.0)
    if request.top_p is not None and not 0.0 < request.top_p <= 1.0:
        raise RequestError(f"top_p must be in (0, 1], got {request.top_p}", "top_p")
    request.top_k = _optional_int(data, "top_k", minimum=-1)
    request.seed = _optional_int(data, "seed")
    request.stop = _parse_stop(data.get("stop"))
    request.stop_token_ids = _int_list(data, "stop_token_ids")
    request.ignore_eos = _optional(data, "ignore_eos", bool, "a boolean") or False
    skip = _optional(data, "skip_special_tokens", bool, "a boolean")
    request.skip_special_tokens = True if skip is None else skip
    request.include_stop_str_in_output = _optional(data, "include_stop_str_in_output", bool, "a boolean") or False
    n = _optional_int(data, "n")
    if n not in (None, 1):
        raise RequestError(f"llmopt returns one choice per request: n must be 1, got {n}", "n")
    request.stream = _optional(data, "stream", bool, "a boolean") or False
    request.include_usage = _parse_stream_options(data.get("stream_options"), request.stream)
    return request


def _check_field_names(data: dict, kind: str) -> None:
    for name, value in data.items():
        if name in _FIELDS[kind] or name in _IGNORED_FIELDS:
            continue
        if name in _OFF_VALUES:
            if value is not None and not any(_equal(value, off) for off in _OFF_VALUES[name]):
                raise RequestError(f"{name}={json.dumps(value)} is not supported by llmopt "
                                   f"(only null or {json.dumps(_OFF_VALUES[name][0])})", name)
            continue
        raise RequestError(f"Unrecognized request argument supplied: {name}", name)


def _equal(value, off) -> bool:
    """JSON equality: ``false`` is not ``0``, but ``0.0`` is ``0``."""
    if _is_number(value) and _is_number(off):
        return value == off
    return type(value) is type(off) and value == off


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_prompt(prompt) -> str | list[int]:
    if prompt is None:
        raise RequestError("prompt is required", "prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("prompt is empty", "prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_int(token) for token in prompt):
        return list(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise RequestError(f"llmopt takes one prompt per request, got a list of {len(prompt)}; "
                           "send them as separate requests", "prompt")
    if isinstance(prompt, list) and not prompt:
        raise RequestError("prompt is empty", "prompt")
    raise RequestError("prompt must be a string or a list of token ids", "prompt")


def _parse_messages(messages) -> list[dict]:
    if messages is None:
        raise RequestError("messages is required", "messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects", "messages")
    parsed = []
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{param} must be an object, got {_json_type(message)}", param)
        role = message.get("role")
        if role not in _CHAT_ROLES:
            raise RequestError(f"{param}.role must be one of {', '.join(_CHAT_ROLES)}; got {json.dumps(role)}",
                               f"{param}.role")
        if message.get("tool_calls") or message.get("function_call"):
            raise RequestError(f"{param}: tool calls are not supported by llmopt", param)
        parsed.append({"role": _CHAT_ROLES[role], "content": _message_text(message.get("content"), role, param)})
    return parsed


def _message_text(content, role: str, param: str) -> str:
    """A message's content as one string: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return ""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError(f"{param}.content[{j}]: llmopt takes only text parts "
                                   '({"type": "text", "text": ...})', f"{param}.content")
            texts.append(part["text"])
        return "\n".join(texts)
    raise RequestError(f"{param}.content must be a string or a list of text parts", f"{param}.content")


def _parse_stop(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError("stop must be a string or a list of strings", "stop")
    if any(not s for s in stops):
        raise RequestError("stop strings must not be empty", "stop")
    return list(stops)


def _parse_stream_options(options, stream: bool) -> bool:
    if options is None:
        return False
    if not stream:
        raise RequestError("stream_options is only allowed with stream: true", "stream_options")
    if not isinstance(options, dict):
        raise RequestError("stream_options must be an object", "stream_options")
    unknown = set(options) - {"include_usage", "continuous_usage_stats"}
    if unknown:
        raise RequestError(f"unknown stream_options field: {sorted(unknown)[0]}", "stream_options")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise RequestError("stream_options.include_usage must be a boolean", "stream_options.include_usage")
    return include


def _optional(data: dict, name: str, kind: type, kind_text: str):
    value = data.get(name)
    if value is not None and not isinstance(value, kind):
        raise RequestError(f"{name} must be {kind_text}, got {_json_type(value)}", name)
    return value


def _optional_int(data: dict, name: str, minimum: int | None = None) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise RequestError(f"{name} must be an integer, got {_json_type(value)}", name)
    if minimum is not None and value < minimum:
        raise RequestError(f"{name} must be at least {minimum}, got {value}", name)
    return value


def _optional_number(data: dict, name: str, minimum: float) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name} must be a number, got {_json_type(value)}", name)
    if value < minimum:
        raise RequestError(f"{name} must be at least {minimum:g}, got {value}", name)
    return float(value)


def _int_list(data: dict, name: str) -> list[int]:
    value = data.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(_is_int(v) and v >= 0 for v in value):
        raise RequestError(f"{name} must be a list of token ids (integers >= 0)", name)
    return list(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {json.dumps(value)}"
    if isinstance(value, (int, float)):
        return f"number {value}"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


# --- prompt and sampling -----------------------------------------------------


def prompt_token_ids(request: GenerationRequest, tokenizer, max_model_len: int) -> list[int]:
    """The request's prompt as token ids, checked against the model's context.

    Chat prompts come from the tokenizer's chat template as text, then are
    tokenized without special tokens: the template already writes them (a
    BOS added again would be a second one). Completion prompts given as
    text get the tokenizer's usual special tokens, as in vLLM.
    """
    if request.kind == CHAT:
        ids = _encode(tokenizer, _render_chat(request.messages, tokenizer), add_special_tokens=False)
    elif isinstance(request.prompt, str):
        ids = _encode(tokenizer, request.prompt, add_special_tokens=True)
    else:
        ids = request.prompt
        vocab_size = len(tokenizer)
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the vocabulary (0 to {vocab_size - 1})", "prompt")
    param = "messages" if request.kind == CHAT else "prompt"
    if not ids:
        raise RequestError("the prompt is empty after tokenization", param)
    if len(ids) >= max_model_len:
        raise RequestError(f"This model's maximum context length is {max_model_len} tokens; the prompt has "
                           f"{len(ids)} tokens, which leaves no room for the completion", param)
    if request.max_tokens is not None and len(ids) + request.max_tokens > max_model_len:
        raise RequestError(f"This model's maximum context length is {max_model_len} tokens; you asked for "
                           f"{len(ids) + request.max_tokens} ({len(ids)} in the prompt, {request.max_tokens} "
                           "for the completion). Reduce max_tokens or the prompt.", _max_tokens_param(request))
    return ids


def _max_tokens_param(request: GenerationRequest) -> str:
    return "max_completion_tokens" if request.kind == CHAT else "max_tokens"


def _render_chat(messages: list[dict], tokenizer) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError("this model has no chat template; use /v1/completions", "messages")
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as error:  # jinja2's TemplateError (e.g. "roles must alternate") and kin
        raise RequestError(f"the chat template refused the messages: {error}", "messages") from None


def _encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def sampling_params(request: GenerationRequest, num_prompt_tokens: int, max_model_len: int):
    """The engine's ``SamplingParams`` for a request (OpenAI's defaults where not given).

    Completions default to 16 new tokens (OpenAI's default), cut to what the
    context has room for; chat defaults to the rest of the context.
    """
    from llmopt.runtime.sampling_params import SamplingParams

    room = max_model_len - num_prompt_tokens
    max_tokens = request.max_tokens
    if max_tokens is None:
        max_tokens = min(DEFAULT_COMPLETION_MAX_TOKENS, room) if request.kind == COMPLETION else room
    options: dict[str, Any] = {"max_tokens": max_tokens, "ignore_eos": request.ignore_eos,
                               "skip_special_tokens": request.skip_special_tokens,
                               "include_stop_str_in_output": request.include_stop_str_in_output}
    for name in ("temperature", "top_p", "top_k", "seed"):
        if getattr(request, name) is not None:
            options[name] = getattr(request, name)
    if request.stop:
        options["stop"] = list(request.stop)
    if request.stop_token_ids:
        options["stop_token_ids"] = list(request.stop_token_ids)
    try:
        return SamplingParams(**options)
    except (ValueError, TypeError) as error:
        raise RequestError(str(error)) from None


# --- responses --------------------------------------------------------------


def usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict:
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens}


def completion_response(request_id: str, model: str, created: int, text: str, finish_reason: str | None,
                        usage_: dict) -> dict:
    """A finished /v1/completions answer (``object: text_completion``)."""
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [choice], "usage": usage_}


def chat_response(request_id: str, model: str, created: int, text: str, finish_reason: str | None,
                  usage_: dict) -> dict:
    """A finished /v1/chat/completions answer (``object: chat.completion``)."""
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
              "finish_reason": finish_reason}
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [choice], "usage": usage_}


def stream_chunk(kind: str, request_id: str, model: str, created: int, *, text: str | None = None,
                 role: str | None = None, finish_reason: str | None = None, usage_: dict | None = None,
                 include_usage: bool = False, final_usage: bool = False) -> dict:
    """One server-sent event's object.

    Chat chunks carry a ``delta`` (the first one the role), completion chunks
    the new ``text``. With ``include_usage`` every chunk has ``usage: null``
    and one last chunk with no choices carries the totals (``final_usage``).
    """
    chunk = {"id": request_id, "object": "chat.completion.chunk" if kind == CHAT else "text_completion",
             "created": created, "model": model}
    if final_usage:
        chunk["choices"] = []
    elif kind == CHAT:
        delta = {}
        if role is not None:
            delta["role"] = role
        if text is not None:
            delta["content"] = text
        chunk["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    else:
        chunk["choices"] = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
    if include_usage or final_usage:
        chunk["usage"] = usage_ if final_usage else None
    return chunk


def model_card(name: str, created: int, max_model_len: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "llmopt", "max_model_len": max_model_len}


def model_list(name: str, created: int, max_model_len: int) -> dict:
    return {"object": "list", "data": [model_card(name, created, max_model_len)]}


def now() -> int:
    return int(time.time())
