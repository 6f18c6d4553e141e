"""The OpenAI API's request and response models (pydantic), without HTTP.

``llmopt serve`` (``server.py``: routes; ``serving.py``: requests to the
engine and back) reads a body and hands it to ``parse_completion_request``
or ``parse_chat_request``: they return a ``CompletionRequest`` or a
``ChatCompletionRequest`` or raise a ``RequestError`` (HTTP 400 in OpenAI's
error shape, ``{"error": {"message", "type", "param", "code"}}``).
``prompt_token_ids`` turns a prompt into token ids and checks them against
the model's context; the response models are what the official client reads.

The contract, as in the README's serving section:

* every field OpenAI defines for the two endpoints is either implemented or
  refused with a 400 naming it, unless it is at its "off" value
  (``frequency_penalty: 0``, ``tools: []``, ...): a client never silently
  gets something other than what it asked for;
* names OpenAI does not define are refused as OpenAI itself refuses them,
  except llmopt's extensions (vLLM's names): ``top_k``, ``ignore_eos``,
  ``stop_token_ids``, ``skip_special_tokens``, ``include_stop_str_in_output``;
* the body is checked before any model work: valid UTF-8 JSON, at most
  ``MAX_JSON_DEPTH`` deep, no lone UTF-16 surrogates in strings, finite
  numbers in range, integers where integers are due.
"""

from __future__ import annotations

import json
import math
import time
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr,
                      ValidationError, model_validator)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_JSON_DEPTH = 64  # deeper bodies are refused before they are walked
MAX_CHOICES = 16  # n and best_of, and the choices of one request all prompts together: 64
MAX_SEQUENCES_PER_REQUEST = 64
MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs (completions' logprobs: 5)
# How many characters of a prompt are tokenized to see whether it fits the
# context, per token of context: a longer text that already overflows is
# refused without tokenizing the rest (a 20 MB prompt costs milliseconds).
CHARS_PER_TOKEN_BOUND = 32
_SEED_MIN, _SEED_END = -(2**63), 2**64
_NUMBER_BOUND = 1e9  # |number| above this, for a sampling option, is refused before it becomes a float


class RequestError(Exception):
    """A request the server refuses: becomes ``{"error": {...}}`` with ``status``."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.type = type
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object."""
    return ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code)).model_dump()


# --- request models ----------------------------------------------------------


def _bounded_number(value: Any) -> Any:
    """Refuse a huge integer before pydantic turns it into a float (it would overflow)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _NUMBER_BOUND:
        raise ValueError(f"must be a finite number of at most {_NUMBER_BOUND:g} in size")
    return value


Number = Annotated[float, BeforeValidator(_bounded_number)]
TokenIds = list[Annotated[StrictInt, Field(ge=0)]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # vLLM's name; only false: usage comes at the end only

    @model_validator(mode="after")
    def _check_usage_stats(self):
        if self.continuous_usage_stats:
            raise _FieldError("stream_options.continuous_usage_stats",
                              "continuous_usage_stats=true is not supported by llmopt (usage comes in the last chunk)")
        return self


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, list[TextPart], None] = None
    name: StrictStr | None = None  # handed to the chat template, which may show it (as vLLM)
    # Defined by OpenAI, refused unless empty: llmopt has no tool calling.
    tool_calls: list[Any] | None = None
    function_call: Any = None
    refusal: StrictStr | None = None


# Fields OpenAI defines that llmopt does not implement: allowed only at the
# value that turns them off (None always is).
_OFF_VALUES: dict[str, tuple] = {
    "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},), "suffix": ("",),
    "tools": ([],), "tool_choice": ("none", "auto"), "functions": ([],), "function_call": ("none", "auto"),
    "response_format": ({"type": "text"},), "parallel_tool_calls": (True, False),
    "modalities": (["text"],), "audio": (), "prediction": (), "reasoning_effort": (), "web_search_options": (),
    "prompt_cache_key": (), "safety_identifier": (), "verbosity": (), "max_completion_tokens_per_choice": (),
}
_COMPLETION_UNSUPPORTED = ("frequency_penalty", "presence_penalty", "logit_bias", "suffix")
_CHAT_UNSUPPORTED = tuple(name for name in _OFF_VALUES if name != "suffix")


class _Common(_Strict):
    model: StrictStr | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Number, Field(ge=0.0, le=100.0)] | None = None
    top_p: Annotated[Number, Field(gt=0.0, le=1.0)] | None = None
    seed: Annotated[StrictInt, Field(ge=_SEED_MIN, lt=_SEED_END)] | None = None
    stop: Union[StrictStr, list[StrictStr], None] = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)] | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None  # bookkeeping for the caller: accepted, no effect
    metadata: dict[StrictStr, StrictStr] | None = None
    store: StrictBool | None = None
    service_tier: StrictStr | None = None
    # llmopt's extensions (vLLM's names).
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None
    ignore_eos: StrictBool | None = None
    stop_token_ids: TokenIds | None = None
    skip_special_tokens: StrictBool | None = None
    include_stop_str_in_output: StrictBool | None = None

    @model_validator(mode="after")
    def _check_common(self):
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if any(not s for s in stops):
            raise _FieldError("stop", "stop strings must not be empty")
        if len(stops) > 16:
            raise _FieldError("stop", "at most 16 stop strings")
        if self.stream_options is not None and not self.stream:
            raise _FieldError("stream_options", "stream_options is only allowed with stream: true")
        return self

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def num_choices(self) -> int:
        return self.n or 1


class CompletionRequest(_Common):
    """``POST /v1/completions``."""

    prompt: Union[StrictStr, list[StrictStr], TokenIds, list[TokenIds]]
    echo: StrictBool | None = None
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    best_of: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)] | None = None
    frequency_penalty: Number | None = None
    presence_penalty: Number | None = None
    logit_bias: dict[StrictStr, Number] | None = None
    suffix: StrictStr | None = None

    kind: ClassVar[str] = "completion"

    @model_validator(mode="after")
    def _check_completion(self):
        _check_off(self, _COMPLETION_UNSUPPORTED)
        if self.best_of is not None and self.best_of < self.num_choices:
            raise _FieldError("best_of", f"best_of ({self.best_of}) must be at least n ({self.num_choices})")
        if self.best_of is not None and self.best_of > self.num_choices and self.stream:
            raise _FieldError("best_of", "best_of greater than n cannot be streamed")
        if self.echo and self.logprobs is not None:
            # The engine computes logits only for the rows that sample, never for the prompt's
            # positions, so the prompt's log-probabilities are not there to return.
            raise _FieldError("echo", "echo with logprobs (the prompt's log-probabilities) is not supported by "
                              "llmopt: its engine computes logits only for the tokens it samples; ask for "
                              "echo or logprobs, not both")
        if not self.prompt:
            raise _FieldError("prompt", "prompt is empty")
        if isinstance(self.prompt, list) and any(isinstance(p, (str, list)) and not p for p in self.prompt):
            raise _FieldError("prompt", "a prompt of the list is empty")
        if len(self.prompts) * max(self.num_choices, self.best_of or 1) > MAX_SEQUENCES_PER_REQUEST:
            raise _FieldError("prompt", f"one request makes at most {MAX_SEQUENCES_PER_REQUEST} sequences "
                              "(prompts times best_of or n)")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts of the batch: a string or a list of token ids each."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)

    @property
    def num_sequences(self) -> int:
        """Sequences the engine computes per prompt (best_of may be more than n)."""
        return self.best_of or self.num_choices


class ChatCompletionRequest(_Common):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    frequency_penalty: Number | None = None
    presence_penalty: Number | None = None
    logit_bias: dict[StrictStr, Number] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: Any = None
    parallel_tool_calls: StrictBool | None = None
    modalities: list[StrictStr] | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None
    verbosity: Any = None
    max_completion_tokens_per_choice: Any = None

    kind: ClassVar[str] = "chat"

    @model_validator(mode="after")
    def _check_chat(self):
        _check_off(self, _CHAT_UNSUPPORTED)
        if self.top_logprobs is not None and not self.logprobs:
            raise _FieldError("top_logprobs", "top_logprobs needs logprobs: true")
        for i, message in enumerate(self.messages):
            if message.tool_calls or message.function_call is not None:
                raise _FieldError(f"messages[{i}]", "tool calls are not supported by llmopt")
            if message.content is None and message.role != "assistant":
                raise _FieldError(f"messages[{i}].content", "content is required for this role")
        return self

    @property
    def num_sequences(self) -> int:
        return self.num_choices

    @property
    def logprobs_count(self) -> int | None:
        """Alternatives per token the engine must report; None: no log-probabilities."""
        return (self.top_logprobs or 0) if self.logprobs else None


class _FieldError(ValueError):
    """A check across fields failed; ``param`` names the field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _check_off(request: BaseModel, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(request, name, None)
        if value is None:
            continue
        offs = _OFF_VALUES[name]
        if not any(_equal(value, off) for off in offs):
            allowed = f"only null or {json.dumps(offs[0])}" if offs else "only null"
            raise _FieldError(name, f"{name}={_short_json(value)} is not supported by llmopt ({allowed})")


def _equal(value, off) -> bool:
    """JSON equality: ``false`` is not ``0``, but ``0.0`` is ``0``."""
    numbers = (int, float)
    if isinstance(value, numbers) and isinstance(off, numbers) and not isinstance(value, bool):
        return value == off
    return type(value) is type(off) and value == off


def _short_json(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


# --- parsing -----------------------------------------------------------------------


def parse_completion_request(body: bytes) -> CompletionRequest:
    """Check a /v1/completions body; raises RequestError."""
    return _validate(CompletionRequest, _load_object(body))


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    """Check a /v1/chat/completions body; raises RequestError."""
    request = _validate(ChatCompletionRequest, _load_object(body))
    if request.max_completion_tokens is not None:  # replaces max_tokens in OpenAI's current API
        request.max_tokens = request.max_completion_tokens
    return request


def _load_object(body: bytes) -> dict:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RequestError(f"the request body is not valid UTF-8: {error}") from None
    _check_depth(text)
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError, RecursionError) as error:
        raise RequestError(f"the request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise RequestError(f"the request body must be a JSON object, got {_json_type(data)}")
    _check_strings(data)
    return data


def _check_depth(text: str) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH before the parser recurses into it."""
    depth, in_string, escaped = 0, False, False
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise RequestError(f"the request body is nested deeper than {MAX_JSON_DEPTH} levels")
        elif char in "]}":
            depth -= 1


def _check_strings(data) -> None:
    """Every string (keys too) must be encodable: JSON's \\ud800 escapes can make lone surrogates."""
    stack = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, path)
                stack.append((f"{path}.{key}" if path else key, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError("the request holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), "
                           "which is no character", path or None) from None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a valid JSON number")


def _validate(model: type[BaseModel], data: dict):
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise _request_error(error) from None


def _request_error(error: ValidationError) -> RequestError:
    """The first problem pydantic found, as OpenAI words it."""
    first = error.errors(include_url=False)[0]
    loc = [part for part in first["loc"] if not _is_union_tag(part)]
    param = _param(loc)
    if first["type"] == "extra_forbidden":
        return RequestError(f"Unrecognized request argument supplied: {param}", param)
    if first["type"] in ("value_error", "assertion_error"):
        cause = first.get("ctx", {}).get("error")
        if isinstance(cause, _FieldError):
            return RequestError(str(cause), cause.param)
    if first["type"] == "missing":
        return RequestError(f"{param} is required", param)
    message = first["msg"].removeprefix("Value error, ")
    given = first.get("input")
    shown = "" if isinstance(given, (dict, list)) else f", got {_short_json(given)}"
    return RequestError(f"{param}: {message}{shown}" if param else message, param)


def _is_union_tag(part) -> bool:
    """pydantic names union members in a location (``str``, ``list[str]``, ``constrained-int``...)."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none") or "[" in part
                                       or part.startswith(("constrained-", "function-", "json-")))


def _param(loc: list) -> str | None:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or None


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {json.dumps(value)}"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


# --- prompts and sampling -----------------------------------------------------------


def chat_text(request: ChatCompletionRequest, tokenizer) -> str:
    """The chat prompt as text, from the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError("this model has no chat template; use /v1/completions", "messages")
    messages = []
    for m in request.messages:
        message = {"role": "system" if m.role == "developer" else m.role, "content": _message_text(m.content)}
        if m.name is not None:
            message["name"] = m.name
        messages.append(message)
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as error:  # jinja2's TemplateError (e.g. "roles must alternate") and kin
        raise RequestError(f"the chat template refused the messages: {error}", "messages") from None


def _message_text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(part.text for part in content)


def prompt_token_ids(prompt: str | list[int], tokenizer, max_model_len: int, max_tokens: int | None, *,
                     add_special_tokens: bool = True, param: str = "prompt",
                     max_tokens_param: str = "max_tokens") -> list[int]:
    """A prompt as token ids, checked against the model's context and vocabulary.

    A text far longer than the context could hold is refused after
    tokenizing only its start (``CHARS_PER_TOKEN_BOUND`` characters per token
    of context). Completion prompts given as text get the tokenizer's usual
    special tokens (as in vLLM); chat prompts come from the template, which
    writes its own (``add_special_tokens=False``).
    """
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("the prompt is empty", param)
        bound = max_model_len * CHARS_PER_TOKEN_BOUND
        if len(prompt) > bound:
            head = _encode(tokenizer, prompt[:bound], add_special_tokens)
            if len(head) >= max_model_len:
                raise RequestError(f"This model's maximum context length is {max_model_len} tokens; the prompt "
                                   f"({len(prompt)} characters) is longer", param)
        ids = _encode(tokenizer, prompt, add_special_tokens)
    else:
        ids = list(prompt)
        vocab_size = len(tokenizer)
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the vocabulary (0 to {vocab_size - 1})", param)
    if not ids:
        raise RequestError("the prompt is empty after tokenization", param)
    if len(ids) >= max_model_len:
        raise RequestError(f"This model's maximum context length is {max_model_len} tokens; the prompt has "
                           f"{len(ids)} tokens, which leaves no room for the completion", param)
    if max_tokens is not None and len(ids) + max_tokens > max_model_len:
        raise RequestError(f"This model's maximum context length is {max_model_len} tokens; you asked for "
                           f"{len(ids) + max_tokens} ({len(ids)} in the prompt, {max_tokens} "
                           "for the completion). Reduce max_tokens or the prompt.", max_tokens_param)
    return ids


def _encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def sampling_params(request: _Common, num_prompt_tokens: int, max_model_len: int, *, choice: int = 0,
                    logprobs: int | None = None):
    """The engine's ``SamplingParams`` for one sequence of a request (OpenAI's defaults where not given).

    Completions default to 16 new tokens (OpenAI's default), cut to what the
    context has room for; chat defaults to the rest of the context. With a
    ``seed`` and several choices, choice ``i`` is seeded ``seed + i``: the
    choices differ, and the same request gives the same choices again.
    """
    from llmopt.runtime.sampling_params import SamplingParams

    room = max_model_len - num_prompt_tokens
    max_tokens = request.max_tokens
    if max_tokens is None:
        max_tokens = min(DEFAULT_COMPLETION_MAX_TOKENS, room) if request.kind == "completion" else room
    options: dict[str, Any] = {"max_tokens": max_tokens, "ignore_eos": bool(request.ignore_eos),
                               "skip_special_tokens": request.skip_special_tokens is not False,
                               "include_stop_str_in_output": bool(request.include_stop_str_in_output)}
    for name in ("temperature", "top_p", "top_k"):
        if getattr(request, name) is not None:
            options[name] = getattr(request, name)
    if request.seed is not None:
        seed = request.seed + choice
        options["seed"] = seed if seed < _SEED_END else seed - 2**64
    if request.stops:
        options["stop"] = request.stops
    if request.stop_token_ids:
        options["stop_token_ids"] = list(request.stop_token_ids)
    if logprobs is not None:
        options["logprobs"] = logprobs
    try:
        return SamplingParams(**options)
    except (ValueError, TypeError) as error:
        raise RequestError(str(error)) from None


# --- response models ---------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def usage(num_prompt_tokens: int, num_completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=num_prompt_tokens, completion_tokens=num_completion_tokens,
                 total_tokens=num_prompt_tokens + num_completion_tokens)


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class _ResponseHeader(BaseModel):
    """The fields every completion object and stream chunk carries."""

    id: str
    created: int
    model: str
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(_ResponseHeader):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletion(_ResponseHeader):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_ResponseHeader):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class CompletionChunk(_ResponseHeader):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmopt"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def dump(response: BaseModel, include_usage: bool = True) -> dict:
    """A response as JSON data; stream chunks carry ``usage`` only when the client asked for it."""
    data = response.model_dump()
    if not include_usage:
        data.pop("usage", None)
    return data


def model_list(name: str, created: int, max_model_len: int) -> dict:
    return ModelList(data=[ModelCard(id=name, created=created, max_model_len=max_model_len)]).model_dump()


def model_card(name: str, created: int, max_model_len: int) -> dict:
    return ModelCard(id=name, created=created, max_model_len=max_model_len).model_dump()


def now() -> int:
    return int(time.time())


def finite(value: float) -> float:
    """A log-probability JSON can carry (-inf becomes the most negative float)."""
    return value if math.isfinite(value) else -3.4e38
