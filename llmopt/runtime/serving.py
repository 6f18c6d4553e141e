"""The OpenAI endpoints' work for ``llmopt serve``: requests to engine sequences and back.

``server.py`` routes and checks HTTP; this module takes a checked request
(``openai_protocol.py``), tokenizes its prompts off the event loop, admits
its sequences (one per prompt and choice; ``best_of`` of them per prompt
where asked) against the bounded queue, submits them to the ``EngineLoop``
and builds the answer: one JSON object, or server-sent events. Every
sequence it submitted is aborted when the request ends early (the client
left, an error), so its KV blocks come back.

Text streams as the engine's detokenizer hands it out: the detokenizer
already holds back a possible start of a stop string and an unfinished
character, so the server sends each output's new text as it is.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from http import HTTPStatus

from starlette.concurrency import run_in_threadpool

from llmopt.runtime import openai_protocol as protocol
from llmopt.runtime.engine_loop import ACCEPTED, EngineLoop, Failure
from llmopt.runtime.openai_protocol import RequestError

logger = logging.getLogger("llmopt.server")

POLL_S = 0.25  # how often a non-streaming request looks whether its client is still there


@dataclass
class _Sequence:
    index: int  # position among the sequences of the request
    prompt_index: int
    request_id: str
    prompt_ids: list[int]
    params: object
    prompt_text: str = ""  # for echo
    output: object = None  # the latest RequestOutput
    done: bool = False
    submitted_at: float = 0.0
    first_token_at: float | None = None
    sent_text: str = ""  # streaming: text already sent
    sent_tokens: int = 0  # streaming: tokens whose log-probabilities were sent
    text_offset: int = 0  # streaming, completions: characters of text before the next token


@dataclass
class _Batch:
    kind: str
    request_id: str
    created: int
    sequences: list[_Sequence]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


class OpenAIServing:
    def __init__(self, loop: EngineLoop, tokenizer, model_name: str, max_model_len: int, metrics,
                 max_pending: int):
        self.loop = loop
        self.tokenizer = tokenizer
        self.tokenizer_lock = threading.Lock()
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.metrics = metrics
        self.max_pending = max_pending  # sequences admitted and unfinished, at most
        self.accepting = True

    # --- entry points ------------------------------------------------------------

    async def create(self, request, http_request):
        """A dict (the whole answer), or (an async iterator of SSE bytes, the release to call when it ends)."""
        if request.model is not None and request.model != self.model_name:
            raise RequestError(f"The model `{request.model}` does not exist; this server serves "
                               f"`{self.model_name}`.", "model", status=HTTPStatus.NOT_FOUND,
                               code="model_not_found")
        if not self.accepting:
            raise RequestError("the server is shutting down", status=HTTPStatus.SERVICE_UNAVAILABLE,
                               type="server_error", headers={"Retry-After": "5"})
        batch = await run_in_threadpool(self._prepare, request)
        self._admit(batch)
        try:
            self._submit(batch)
        except BaseException:
            self._release(batch)
            raise
        if request.stream:
            return self._stream(request, batch, http_request), lambda: self._release(batch)
        try:
            return await self._complete(request, batch, http_request)
        finally:
            self._release(batch)

    # --- preparing ------------------------------------------------------------------

    def _prepare(self, request) -> _Batch:
        """Tokenize and build each sequence's parameters (in a worker thread: tokenizing can take a while)."""
        chat = request.kind == "chat"
        if chat:
            with self.tokenizer_lock:
                text = protocol.chat_text(request, self.tokenizer)
            prompts = [text]
        else:
            prompts = request.prompts
        max_param = "max_completion_tokens" if chat and request.max_completion_tokens else "max_tokens"
        param = "messages" if chat else "prompt"
        logprobs = request.logprobs_count if chat else request.logprobs
        if not chat and (request.best_of or 1) > request.num_choices and logprobs is None:
            logprobs = 0  # best_of ranks the candidates by their log-probability
        prefix = "chatcmpl" if chat else "cmpl"
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        sequences = []
        for p, prompt in enumerate(prompts):
            with self.tokenizer_lock:
                ids = protocol.prompt_token_ids(prompt, self.tokenizer, self.max_model_len, request.max_tokens,
                                                add_special_tokens=not chat, param=param,
                                                max_tokens_param=max_param)
                prompt_text = ""
                if not chat and request.echo:
                    prompt_text = prompt if isinstance(prompt, str) else self.tokenizer.decode(ids)
            for i in range(request.num_sequences):
                params = protocol.sampling_params(request, len(ids), self.max_model_len, choice=i,
                                                  logprobs=logprobs)
                sequences.append(_Sequence(len(sequences), p, f"{request_id}-{len(sequences)}", ids, params,
                                           prompt_text))
        return _Batch(request.kind, request_id, protocol.now(), sequences)

    def _admit(self, batch: _Batch) -> None:
        n = len(batch.sequences)
        if self.metrics.pending + n > self.max_pending:
            raise RequestError(f"the server's queue is full ({self.metrics.pending} sequences in flight, at most "
                               f"{self.max_pending}); retry later", status=HTTPStatus.SERVICE_UNAVAILABLE,
                               type="server_error", code="queue_full", headers={"Retry-After": "1"})
        self.metrics.pending += n

    def _release(self, batch: _Batch) -> None:
        """The request is over: abort what still runs, give its places in the queue back."""
        for seq in batch.sequences:
            if not seq.done:
                seq.done = True
                self.loop.abort(seq.request_id)
                self.metrics.finished("abort")
        self.metrics.pending -= len(batch.sequences)
        batch.sequences = []

    def _submit(self, batch: _Batch) -> None:
        event_loop = asyncio.get_running_loop()
        queue = batch.queue
        for seq in batch.sequences:
            def deliver(item, index=seq.index):
                event_loop.call_soon_threadsafe(queue.put_nowait, (index, item))

            seq.submitted_at = time.perf_counter()
            self.loop.submit(seq.request_id, seq.prompt_ids, seq.params, deliver)
            self.metrics.prompt_tokens.inc(len(seq.prompt_ids))

    # --- receiving --------------------------------------------------------------------

    async def _receive(self, batch: _Batch, timeout: float | None = None):
        """The next (sequence, item); updates the sequence and the metrics. TimeoutError after ``timeout``."""
        if timeout is None:
            index, item = await batch.queue.get()
        else:
            index, item = await asyncio.wait_for(batch.queue.get(), timeout)
        seq = batch.sequences[index]
        if item is ACCEPTED or isinstance(item, Failure):
            if isinstance(item, Failure):
                seq.done = True
            return seq, item
        now = time.perf_counter()
        if seq.first_token_at is None and item.token_ids:
            seq.first_token_at = now
            self.metrics.ttft.observe(now - seq.submitted_at)
            hits = getattr(item.metrics, "num_prefix_hit_tokens", None)
            if hits is not None:
                self.metrics.prefix_hit_tokens += hits
                self.metrics.prefix_query_tokens += len(seq.prompt_ids)
        seq.output = item
        if item.finished:
            seq.done = True
            num = len(item.token_ids)
            self.metrics.generation_tokens.inc(num)
            self.metrics.finished(item.finish_reason or "stop")
            self.metrics.e2e.observe(now - seq.submitted_at)
            if num > 1 and seq.first_token_at is not None:
                self.metrics.tpot.observe((now - seq.first_token_at) / (num - 1))
        return seq, item

    async def _complete(self, request, batch: _Batch, http_request) -> dict:
        checked = time.monotonic()
        while not all(seq.done for seq in batch.sequences):
            item = None
            try:
                _, item = await self._receive(batch, POLL_S)
            except (asyncio.TimeoutError, TimeoutError):
                pass
            if time.monotonic() - checked >= POLL_S:
                checked = time.monotonic()
                if await http_request.is_disconnected():
                    logger.info("llmopt serve: client went away; aborting %s", batch.request_id)
                    raise _ClientGone() from None
            if isinstance(item, Failure):
                raise RequestError(item.message, status=item.status, type=item.type)
        return self._response(request, batch)

    def _response(self, request, batch: _Batch) -> dict:
        sequences = _chosen(request, batch.sequences)
        num_prompt = sum(len(seq.prompt_ids) for seq in batch.sequences if seq.index % request.num_sequences == 0)
        num_out = sum(len(seq.output.token_ids) for seq in batch.sequences)
        usage = protocol.usage(num_prompt, num_out)
        if request.kind == "chat":
            choices = [protocol.ChatChoice(index=i, message=protocol.ChatMessageOut(content=seq.output.text),
                                           logprobs=self._chat_logprobs(seq.output.outputs[0].logprobs)
                                           if request.logprobs else None,
                                           finish_reason=seq.output.finish_reason)
                       for i, seq in enumerate(sequences)]
            answer = protocol.ChatCompletion(id=batch.request_id, created=batch.created, model=self.model_name,
                                             choices=choices, usage=usage)
        else:
            choices = []
            for i, seq in enumerate(sequences):
                logprobs = None
                if request.logprobs is not None:
                    logprobs = self._completion_logprobs(seq.output.outputs[0].logprobs, len(seq.prompt_text))
                choices.append(protocol.CompletionChoice(index=i, text=seq.prompt_text + seq.output.text,
                                                         logprobs=logprobs, finish_reason=seq.output.finish_reason))
            answer = protocol.Completion(id=batch.request_id, created=batch.created, model=self.model_name,
                                         choices=choices, usage=usage)
        return protocol.dump(answer)

    # --- streaming ------------------------------------------------------------------------

    async def _stream(self, request, batch: _Batch, http_request) -> AsyncIterator[bytes]:
        """Server-sent events: ``data: {chunk}`` per new text, ``data: [DONE]`` at the end.

        Starlette cancels this generator when the client goes away; the
        ``finally`` then aborts every sequence still running.
        """
        chat = request.kind == "chat"

        def event(choices, usage=None) -> bytes:
            model = protocol.ChatCompletionChunk if chat else protocol.CompletionChunk
            chunk = model(id=batch.request_id, created=batch.created, model=self.model_name, choices=choices,
                          usage=usage)
            return b"data: " + json.dumps(protocol.dump(chunk, request.include_usage)).encode() + b"\n\n"

        try:
            for seq in batch.sequences:
                if chat:
                    yield event([protocol.ChatChunkChoice(index=seq.index, delta=protocol.DeltaMessage(
                        role="assistant", content=""))])
                elif seq.prompt_text:
                    yield event([protocol.CompletionChoice(index=seq.index, text=seq.prompt_text)])
                    seq.text_offset = len(seq.prompt_text)
            while not all(seq.done for seq in batch.sequences):
                seq, item = await self._receive(batch)
                if item is ACCEPTED:
                    continue
                if isinstance(item, Failure):
                    yield b"data: " + json.dumps(protocol.error_body(item.message, item.type)).encode() + b"\n\n"
                    break
                text = item.text
                if not text.startswith(seq.sent_text):
                    logger.warning("llmopt serve: %s: the output changed text already streamed", seq.request_id)
                delta = text[len(seq.sent_text):]
                entries = item.outputs[0].logprobs
                new_entries = entries[seq.sent_tokens:] if entries is not None else None
                if not (delta or item.finished):
                    continue
                seq.sent_text, seq.sent_tokens = text, len(item.token_ids)
                if chat:
                    logprobs = self._chat_logprobs(new_entries) if request.logprobs else None
                    choice = protocol.ChatChunkChoice(index=seq.index, delta=protocol.DeltaMessage(
                        content=delta if delta or not item.finished else None), logprobs=logprobs,
                        finish_reason=item.finish_reason)
                else:
                    logprobs = None
                    if request.logprobs is not None and new_entries is not None:
                        logprobs = self._completion_logprobs(new_entries, seq.text_offset)
                        seq.text_offset += sum(len(t) for t in logprobs.tokens)
                    choice = protocol.CompletionChoice(index=seq.index, text=delta, logprobs=logprobs,
                                                       finish_reason=item.finish_reason)
                yield event([choice])
            else:
                if request.include_usage:
                    num_prompt = sum(len(s.prompt_ids) for s in batch.sequences if s.index % request.num_sequences == 0)
                    num_out = sum(len(s.output.token_ids) for s in batch.sequences if s.output is not None)
                    yield event([], protocol.usage(num_prompt, num_out))
            yield b"data: [DONE]\n\n"
        finally:
            if any(not seq.done for seq in batch.sequences):
                logger.info("llmopt serve: stream of %s ended early; aborting it", batch.request_id)
            self._release(batch)

    # --- log-probabilities -------------------------------------------------------------

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _completion_logprobs(self, entries, offset: int) -> protocol.CompletionLogprobs:
        result = protocol.CompletionLogprobs()
        for token, logprob, top in entries or []:
            text = self._token_text(token)
            result.tokens.append(text)
            result.token_logprobs.append(protocol.finite(logprob))
            alternatives = {}
            for alt, alt_logprob in top:
                alternatives.setdefault(self._token_text(alt), protocol.finite(alt_logprob))
            result.top_logprobs.append(alternatives if top else None)
            result.text_offset.append(offset)
            offset += len(text)
        return result

    def _chat_logprobs(self, entries) -> protocol.ChatLogprobs:
        content = []
        for token, logprob, top in entries or []:
            text = self._token_text(token)
            content.append(protocol.ChatTokenLogprob(
                token=text, logprob=protocol.finite(logprob), bytes=list(text.encode()),
                top_logprobs=[protocol.TopLogprob(token=self._token_text(alt), logprob=protocol.finite(lp),
                                                  bytes=list(self._token_text(alt).encode())) for alt, lp in top]))
        return protocol.ChatLogprobs(content=content)


class _ClientGone(Exception):
    """The client closed the connection while its request ran."""


def _chosen(request, sequences: list[_Sequence]) -> list[_Sequence]:
    """The sequences returned as choices: all, or per prompt the n most likely of best_of."""
    per_prompt = request.num_sequences
    if per_prompt == request.num_choices:
        return sequences
    chosen = []
    for start in range(0, len(sequences), per_prompt):
        group = sequences[start:start + per_prompt]
        group.sort(key=lambda s: -sum(lp for _, lp, _ in (s.output.outputs[0].logprobs or [])))
        chosen.extend(group[:request.num_choices])
    return chosen
