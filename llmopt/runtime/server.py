"""``llmopt serve``: an OpenAI-compatible HTTP server over the engine.

Standard library only: a ``ThreadingHTTPServer`` whose handler threads
parse requests (``openai_protocol.py``) and talk to one ``EngineLoop``
thread, the only thread that touches the engine (it is not thread-safe).
The loop takes new requests and aborts from an inbox, steps the engine while
it has work, sleeps when idle, and hands each request's outputs to that
request's own queue. Requests from concurrent clients therefore share the
engine's steps (continuous batching).

Streaming answers are server-sent events (``data: {json}`` ... ``data:
[DONE]``) in chunked transfer encoding, so the connection stays usable. A
client that goes away has its request aborted, which frees its KV blocks.
"""

from __future__ import annotations

import json
import logging
import queue
import select
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from llmopt.runtime import openai_protocol as protocol
from llmopt.runtime.openai_protocol import RequestError

logger = logging.getLogger("llmopt.server")

MAX_BODY_BYTES = 32 * 1024 * 1024
POLL_S = 0.5  # how often a waiting handler checks its client and the loop


# --- the engine loop ------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    """What a request's queue gets instead of outputs when it cannot go on."""

    status: int
    message: str
    type: str = "server_error"


ACCEPTED = object()  # first item of a request's queue once the engine took it


class EngineLoop:
    """The thread that owns the engine; other threads only call ``submit`` and ``abort``.

    Each request's queue receives ``ACCEPTED`` (or a ``Failure`` when the
    engine refuses it), then its cumulative ``RequestOutput``s, the last one
    finished. An exception in ``engine.step`` fails every request in flight
    with a 500 ``Failure`` (they are aborted, so their blocks come back) and
    the loop carries on.
    """

    def __init__(self, engine):
        self.engine = engine
        self._wakeup = threading.Condition()
        self._inbox: list[tuple] = []
        self._stopping = False
        self._queues: dict[str, queue.Queue] = {}  # requests in the engine; loop thread only
        self._thread = threading.Thread(target=self._run, name="llmopt-engine-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, request_id: str, prompt_token_ids: list[int], params) -> queue.Queue:
        results: queue.Queue = queue.Queue()
        self._post(("add", request_id, prompt_token_ids, params, results))
        return results

    def abort(self, request_id: str) -> None:
        self._post(("abort", request_id))

    def _post(self, command: tuple) -> None:
        with self._wakeup:
            self._inbox.append(command)
            self._wakeup.notify()

    def _run(self) -> None:
        try:
            while True:
                busy = self.engine.has_unfinished()
                with self._wakeup:
                    while not (self._inbox or busy or self._stopping):
                        self._wakeup.wait()
                    if self._stopping:
                        break
                    inbox, self._inbox = self._inbox, []
                for command in inbox:
                    self._apply(command)
                if self.engine.has_unfinished():
                    self._step()
        except Exception:  # a bug in the loop itself: say so, and fail everyone waiting
            logger.exception("llmopt serve: the engine loop stopped")
        finally:
            self._fail_all(Failure(HTTPStatus.SERVICE_UNAVAILABLE, "the server is shutting down"))

    def _apply(self, command: tuple) -> None:
        if command[0] == "abort":
            if self._queues.pop(command[1], None) is not None:
                self._abort_in_engine(command[1])
            return
        _, request_id, prompt_token_ids, params, results = command
        try:
            self.engine.add_request(request_id, prompt_token_ids, params)
        except ValueError as error:  # the engine's word on an empty or too-long prompt
            results.put(Failure(HTTPStatus.BAD_REQUEST, str(error), "invalid_request_error"))
            return
        except Exception as error:
            logger.exception("llmopt serve: engine.add_request failed for %s", request_id)
            results.put(Failure(HTTPStatus.INTERNAL_SERVER_ERROR, f"the engine failed to add the request: {error}"))
            return
        self._queues[request_id] = results
        results.put(ACCEPTED)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as error:
            logger.exception("llmopt serve: engine.step failed; failing the %d requests in flight",
                             len(self._queues))
            failure = Failure(HTTPStatus.INTERNAL_SERVER_ERROR, f"the engine failed: {type(error).__name__}: {error}")
            for request_id in list(self._queues):
                self._abort_in_engine(request_id)
            self._fail_all(failure)
            return
        for output in outputs:
            results = self._queues.get(output.request_id)
            if results is None:
                continue  # aborted by its client meanwhile
            results.put(output)
            if output.finished:
                del self._queues[output.request_id]

    def _abort_in_engine(self, request_id: str) -> None:
        try:
            self.engine.abort(request_id)
        except Exception:
            logger.exception("llmopt serve: engine.abort(%r) failed", request_id)

    def _fail_all(self, failure: Failure) -> None:
        queues, self._queues = self._queues, {}
        for results in queues.values():
            results.put(failure)
        with self._wakeup:
            inbox, self._inbox = self._inbox, []
        for command in inbox:
            if command[0] == "add":
                command[-1].put(failure)


# --- HTTP ---------------------------------------------------------------------


class OpenAIServer(ThreadingHTTPServer):
    """The HTTP server: routes to ``_Handler``, holds the engine loop and model facts.

    ``serve_forever()`` serves in the calling thread; ``start()`` in a
    background thread (tests). ``close()`` stops both and the engine loop.
    """

    daemon_threads = True
    request_queue_size = 128  # connections waiting to be accepted (socketserver's default is 5)

    def __init__(self, engine, host: str, port: int, served_model_name: str | None = None):
        super().__init__((host, port), _Handler)
        self.loop = EngineLoop(engine)
        self.tokenizer = engine.tokenizer
        self.tokenizer_lock = threading.Lock()
        self.model_name = served_model_name or engine.model_name
        self.max_model_len = engine.max_model_len
        self.created = protocol.now()
        self._serve_thread: threading.Thread | None = None
        self.loop.start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        host = self.server_address[0]
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def start(self) -> None:
        self._serve_thread = threading.Thread(target=self.serve_forever, args=(0.05,), name="llmopt-http",
                                              daemon=True)
        self._serve_thread.start()

    def handle_error(self, request, client_address) -> None:
        """Log (instead of printing a traceback) what escaped a handler; a client hanging up is no error."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            logger.debug("llmopt serve: connection from %s ended: %s", client_address, error)
        else:
            logger.error("llmopt serve: error while serving %s", client_address, exc_info=True)

    def close(self) -> None:
        if self._serve_thread is not None:  # shutdown() waits for a serve_forever that must be running
            self.shutdown()
            self._serve_thread.join()
        self.server_close()
        self.loop.stop()


def build_server(engine, host: str = "127.0.0.1", port: int = 8000,
                 served_model_name: str | None = None) -> OpenAIServer:
    """An ``OpenAIServer`` bound to ``host:port`` (0: any free port), its engine loop running."""
    return OpenAIServer(engine, host, port, served_model_name)


class _ClientGone(Exception):
    """The client closed the connection while its request ran."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the openai client reuses connections
    server: OpenAIServer
    _streaming = False  # the 200 of an event stream has been sent
    _checked_at = 0.0  # time.monotonic() of the last look at the client's socket
    timeout = 300  # seconds an idle keep-alive connection (or a stalled client) may hold its thread

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/health":
            if self.server.loop.alive:
                self._send_json(HTTPStatus.OK, {"status": "ok"})
            else:
                self._send_error(HTTPStatus.SERVICE_UNAVAILABLE, "the engine loop is not running", "server_error")
        elif path == "/v1/models":
            self._send_json(HTTPStatus.OK, protocol.model_list(self.server.model_name, self.server.created,
                                                               self.server.max_model_len))
        elif path.startswith("/v1/models/"):
            name = path[len("/v1/models/"):]
            if name != self.server.model_name:
                self._send_model_not_found(name)
            else:
                self._send_json(HTTPStatus.OK, protocol.model_card(name, self.server.created, self.server.max_model_len))
        else:
            self._send_unknown_path()

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        parse = {"/v1/completions": protocol.parse_completion_request,
                 "/v1/chat/completions": protocol.parse_chat_request}.get(path)
        if parse is None:
            self._send_unknown_path()
            return
        try:
            self._generate(parse)
        except RequestError as error:
            self._send_json(error.status, error.body())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as error:
            logger.exception("llmopt serve: %s %s failed", self.command, self.path)
            if self._streaming:  # too late for a status line: end the response early
                self.close_connection = True
                return
            self._send_error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(error).__name__}: {error}",
                             "server_error")

    # -- generation --

    def _generate(self, parse) -> None:
        request = parse(self._read_body())
        if request.model is not None and request.model != self.server.model_name:
            self._send_model_not_found(request.model)
            return
        with self.server.tokenizer_lock:
            prompt_ids = protocol.prompt_token_ids(request, self.server.tokenizer, self.server.max_model_len)
        params = protocol.sampling_params(request, len(prompt_ids), self.server.max_model_len)
        prefix = "chatcmpl" if request.kind == protocol.CHAT else "cmpl"
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        results = self.server.loop.submit(request_id, prompt_ids, params)
        try:
            first = self._next(results, request_id)
            if isinstance(first, Failure):
                self._send_error(first.status, first.message, first.type)
            elif request.stream:
                self._stream(request, request_id, results, len(prompt_ids))
            else:
                self._complete(request, request_id, results, len(prompt_ids))
        except (_ClientGone, OSError):  # closed, reset, or stalled past the socket timeout
            logger.info("llmopt serve: client went away; aborting %s", request_id)
            self.server.loop.abort(request_id)
            self.close_connection = True
        except BaseException:
            self.server.loop.abort(request_id)  # nobody will read its outputs (unknown ids are ignored)
            raise

    def _complete(self, request, request_id: str, results: queue.Queue, num_prompt_tokens: int) -> None:
        while True:
            item = self._latest(results, request_id)
            if isinstance(item, Failure):
                self._send_error(item.status, item.message, item.type)
                return
            if item.finished:
                break
        build = protocol.chat_response if request.kind == protocol.CHAT else protocol.completion_response
        usage = protocol.usage(num_prompt_tokens, len(item.token_ids))
        self._send_json(HTTPStatus.OK, build(request_id, self.server.model_name, protocol.now(), item.text,
                                             item.finish_reason, usage))

    def _stream(self, request, request_id: str, results: queue.Queue, num_prompt_tokens: int) -> None:
        created = protocol.now()

        def chunk(**fields) -> None:
            self._send_event(protocol.stream_chunk(request.kind, request_id, self.server.model_name, created,
                                                   include_usage=request.include_usage, **fields))

        self._start_events()
        if request.kind == protocol.CHAT:
            chunk(role="assistant", text="")
        holdback = max((len(stop) for stop in request.stop), default=1) - 1
        sent = ""
        while True:
            item = self._latest(results, request_id)
            if isinstance(item, Failure):
                self._send_event(protocol.error_body(item.message, item.type))
                break
            text = _streamable_text(item.text, item.finished, holdback)
            if not text.startswith(sent):
                logger.warning("llmopt serve: %s: the output changed text already streamed", request_id)
            delta = text[len(sent):]
            if item.finished:
                chunk(text=delta or None, finish_reason=item.finish_reason)  # chat: an empty delta
                if request.include_usage:
                    chunk(final_usage=True, usage_=protocol.usage(num_prompt_tokens, len(item.token_ids)))
                break
            if delta:
                chunk(text=delta)
                sent = text
        self._write_chunk(b"data: [DONE]\n\n")
        self._write_chunk(b"")  # the last, empty chunk of the chunked encoding
        self._streaming = False

    def _latest(self, results: queue.Queue, request_id: str):
        """The next item, or the newest of those waiting: outputs are cumulative."""
        item = self._next(results, request_id)
        while not isinstance(item, Failure) and not item.finished:
            try:
                item = results.get_nowait()
            except queue.Empty:
                break
        return item

    def _next(self, results: queue.Queue, request_id: str):
        """The request's next item; checks every POLL_S that the client is still there."""
        while True:
            if time.monotonic() - self._checked_at > POLL_S:
                self._checked_at = time.monotonic()
                if self._client_gone():
                    raise _ClientGone()
            try:
                return results.get(timeout=POLL_S)
            except queue.Empty:
                if not self.server.loop.alive:
                    return Failure(HTTPStatus.SERVICE_UNAVAILABLE, "the engine loop is not running")

    def _client_gone(self) -> bool:
        """True if the client closed its end (EOF or reset) while we wait on the engine."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except (OSError, ValueError):
            return True

    # -- HTTP plumbing --

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise RequestError("chunked request bodies are not supported; send a Content-Length",
                               status=HTTPStatus.LENGTH_REQUIRED)
        length_text = self.headers.get("Content-Length")
        try:
            length = int(length_text or "0")
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            raise RequestError(f"bad Content-Length: {length_text!r}")
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise RequestError(f"the request body is larger than {MAX_BODY_BYTES} bytes",
                               status=HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        return self.rfile.read(length)

    def _send_model_not_found(self, name: str) -> None:
        self._send_json(HTTPStatus.NOT_FOUND, protocol.error_body(
            f"The model `{name}` does not exist; this server serves `{self.server.model_name}`.",
            "invalid_request_error", "model", "model_not_found"))

    def _send_unknown_path(self) -> None:
        self._send_error(HTTPStatus.NOT_FOUND, f"no route for {self.command} {self.path.split('?', 1)[0]}",
                         "invalid_request_error")

    def _send_error(self, status: int, message: str, type: str) -> None:
        self._send_json(status, protocol.error_body(message, type))

    def _send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _start_events(self) -> None:
        self._streaming = True
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _send_event(self, body: dict) -> None:
        self._write_chunk(f"data: {json.dumps(body)}\n\n".encode())

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def log_message(self, format: str, *args) -> None:
        logger.info("%s %s", self.address_string(), format % args)


def _streamable_text(text: str, finished: bool, holdback: int) -> str:
    """The part of a running output's text that is safe to send.

    Held back: the last ``holdback`` characters (they may be the start of a
    stop string the engine will cut off) and a trailing replacement
    character (half of a multi-byte character whose rest is still to come).
    """
    if finished:
        return text
    if holdback:
        text = text[:max(len(text) - holdback, 0)]
    return text.rstrip("\ufffd")


# --- the CLI's entry point ----------------------------------------------------


class BindError(Exception):
    """The server cannot listen on the address asked for."""


def serve(llm_options: dict, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None) -> None:
    """Load the model (``LLM(**llm_options)``), warm it up, serve until interrupted.

    The address is tried first, so a port in use is reported before the
    model loads rather than after.
    """
    from llmopt.runtime.llm import LLM

    _check_address(host, port)
    llm = LLM(**llm_options)
    _warm_up(llm.engine)
    try:
        server = build_server(llm.engine, host, port, served_model_name)
    except OSError as error:
        raise BindError(f"cannot serve on {host}:{port}: {error.strerror or error}") from None
    print(f"llmopt serve: ready on {server.url}, model {server.model_name}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print(file=sys.stderr)
    finally:
        server.close()


def _check_address(host: str, port: int) -> None:
    try:
        probe = OpenAIServer.address_family, socket.SOCK_STREAM
        with socket.socket(*probe) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
            sock.bind((host, port))
    except OSError as error:
        raise BindError(f"cannot serve on {host}:{port}: {error.strerror or error}") from None


def _warm_up(engine) -> None:
    """Run one tiny request so the first client does not wait for the compile."""
    from llmopt.runtime.sampling_params import SamplingParams

    print("llmopt: warming up (the first steps compile the model) ...", file=sys.stderr, flush=True)
    prompt = engine.tokenizer("Hello", add_special_tokens=True)["input_ids"]
    engine.add_request("llmopt-warm-up", list(prompt), SamplingParams(max_tokens=2, temperature=0.0))
    while engine.has_unfinished():
        engine.step()
