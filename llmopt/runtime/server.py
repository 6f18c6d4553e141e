"""``llmopt serve``: an OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn).

Three parts, kept apart as in vLLM's OpenAI server:

* ``openai_protocol.py``: the pydantic request and response models and the
  request checks (no HTTP);
* ``serving.py``: a checked request to engine sequences and back (tokenizing,
  admission to the bounded queue, streaming, aborting what is left);
* this module: the routes, HTTP-level checks (API key, body size, content
  type, methods), errors in OpenAI's shape for every failure, ``/metrics``,
  and the process: bind, load, warm up, serve, shut down on SIGTERM.

One ``EngineLoop`` thread (``engine_loop.py``) owns the engine; the event
loop only posts to it. FastAPI, uvicorn, pydantic and prometheus_client are
the ``serve`` extra: ``import llmopt`` and the engine work without them.

Every error is ``{"error": {"message", "type", "param", "code"}}``: 400 a bad
request (malformed line, JSON, field), 401 a missing or wrong API key, 404
an unknown route or model, 405 a method a route does not take, 413 a body
over the limit, 415 a body that is not JSON, 503 (with ``Retry-After``) a
full queue or a server shutting down, 500 only for a bug or an engine failure.
"""


import json
import logging
import signal
import socket
import sys
import threading
import time
from http import HTTPStatus

logger = logging.getLogger("llmopt.server")

MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_WAITING = 256  # sequences waiting beyond the engine's batch, at most; then 503
SHUTDOWN_GRACE_S = 30  # after SIGTERM: how long requests in flight may take to finish


class BindError(Exception):
    """The server cannot listen on the address asked for."""


class MissingServeExtra(ImportError):
    """FastAPI, uvicorn, pydantic or prometheus_client is not installed."""


def _require_extra():
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import pydantic  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise MissingServeExtra(
            f"llmopt serve needs FastAPI, uvicorn, pydantic and prometheus_client ({error.name} is missing): "
            "pip install 'llmopt[serve]'") from None


# --- the application -------------------------------------------------------------


def create_app(engine_loop, tokenizer, model_name: str, max_model_len: int, *, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, max_pending: int = 128 + DEFAULT_MAX_WAITING):
    """The FastAPI app over a running ``EngineLoop``."""
    _require_extra()
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from llmopt.runtime import openai_protocol as protocol
    from llmopt.runtime.openai_protocol import RequestError
    from llmopt.runtime.server_metrics import CONTENT_TYPE_LATEST, ServerMetrics
    from llmopt.runtime.serving import OpenAIServing, _ClientGone

    metrics = ServerMetrics(engine_loop, model_name)
    serving = OpenAIServing(engine_loop, tokenizer, model_name, max_model_len, metrics, max_pending)
    created = protocol.now()
    app = FastAPI(title="llmopt", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serving, app.state.metrics = serving, metrics
    # An oversized body up to this size is read and dropped before the 413 goes out (see drain).
    linger_bytes = 4 * max_body_bytes

    def error_response(status: int, message: str, type: str, param=None, code=None, headers=None):
        metrics.error(status)
        return JSONResponse(protocol.error_body(message, type, param, code), status_code=int(status),
                            headers=headers)

    def error_type(status: int) -> str:
        return "server_error" if status >= 500 else "invalid_request_error"

    async def drain(request: Request, limit: int | None = None) -> dict | None:
        """Read what is left of the body (up to ``limit`` bytes) so the next request parses; close if too big.

        Reading before answering is also what keeps an error response deliverable: a server that
        closes with unread bytes in its receive buffer sends a TCP reset, which can destroy the
        response before the client reads it (nginx's "lingering close" exists for the same reason).
        """
        limit = max_body_bytes if limit is None else limit
        try:
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    return {"Connection": "close"}
        except Exception:
            return {"Connection": "close"}
        return None

    def too_large() -> RequestError:
        return RequestError(f"the request body is larger than {max_body_bytes} bytes",
                            status=HTTPStatus.REQUEST_ENTITY_TOO_LARGE, headers={"Connection": "close"})

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, error: RequestError):
        metrics.error(error.status)
        return JSONResponse(error.body(), status_code=int(error.status), headers=error.headers or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        headers = dict(error.headers or {})
        headers.update(await drain(request) or {})
        path = request.url.path
        if error.status_code == 404:
            message = f"no route for {request.method} {path}"
        elif error.status_code == 405:
            message = f"{request.method} is not allowed on {path}"
        else:
            message = str(error.detail)
        return error_response(error.status_code, message, error_type(error.status_code), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError):
        return error_response(400, str(error), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, error: Exception):
        logger.error("llmopt serve: %s %s failed", request.method, request.url.path, exc_info=error)
        return error_response(500, f"internal error: {type(error).__name__}: {error}", "server_error")

    def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not _same(token.strip(), api_key):
            raise RequestError("Incorrect or missing API key: send it as 'Authorization: Bearer <key>'",
                               status=HTTPStatus.UNAUTHORIZED, code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})

    async def read_body(request: Request) -> bytes:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type and content_type != "application/json" and not content_type.endswith("+json"):
            headers = await drain(request)
            raise RequestError(f"the body must be JSON (Content-Type: application/json), got {content_type!r}",
                               status=HTTPStatus.UNSUPPORTED_MEDIA_TYPE, headers=headers)
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise RequestError(f"bad Content-Length: {length!r}", headers={"Connection": "close"})
            if int(length) > max_body_bytes:
                if int(length) <= linger_bytes:
                    await drain(request, linger_bytes)
                raise too_large()
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                await drain(request, linger_bytes - size)
                raise too_large()
            chunks.append(chunk)
        return b"".join(chunks)

    async def generate(request: Request, parse):
        check_api_key(request)
        parsed = parse(await read_body(request))
        try:
            result = await serving.create(parsed, request)
        except _ClientGone:
            return Response(status_code=499)  # nobody reads it
        if isinstance(result, dict):
            return JSONResponse(result)
        body, release = result
        return _EventStream(body, release)

    @app.get("/health")
    async def health():
        if engine_loop.alive and serving.accepting:
            return {"status": "ok"}
        return error_response(503, "the engine loop is not running", "server_error", headers={"Retry-After": "5"})

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        check_api_key(request)
        return protocol.model_list(model_name, created, max_model_len)

    @app.get("/v1/models/{name:path}")
    async def model(request: Request, name: str):
        check_api_key(request)
        if name != model_name:
            raise RequestError(f"The model `{name}` does not exist; this server serves `{model_name}`.",
                               "model", status=HTTPStatus.NOT_FOUND, code="model_not_found")
        return protocol.model_card(name, created, max_model_len)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, protocol.parse_completion_request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, protocol.parse_chat_request)

    class _EventStream(StreamingResponse):
        """An SSE response whose sequences are released however the response ends.

        Starlette cancels the body iterator when the client disconnects; if
        that happens before the iterator started, its ``finally`` never
        runs, so the release is also tied to the response itself.
        """

        def __init__(self, body, release):
            super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            self._body, self._release = body, release

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                await self._body.aclose()  # runs the generator's finally (release) if it was started
                self._release()  # and if it was not (releasing twice is harmless)

    return app


def _same(given: str, expected: str) -> bool:
    import hmac

    return hmac.compare_digest(given.encode(), expected.encode())


# --- uvicorn --------------------------------------------------------------------


def _protocol_class():
    """uvicorn's h11 protocol, answering a malformed request line or header in OpenAI's error shape."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class OpenAIH11Protocol(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            import h11

            body = json.dumps({"error": {"message": f"malformed HTTP request: {msg}",
                                         "type": "invalid_request_error", "param": None, "code": None}}).encode()
            headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                       (b"content-length", str(len(body)).encode())]
            try:
                self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers,
                                                                 reason=b"Bad Request")))
                self.transport.write(self.conn.send(h11.Data(data=body)))
                self.transport.write(self.conn.send(h11.EndOfMessage()))
            except h11.LocalProtocolError:  # h11 cannot frame a response now: just close
                pass
            self.transport.close()

    return OpenAIH11Protocol


class OpenAIServer:
    """The engine loop, the app and a uvicorn server on a bound socket.

    ``run()`` serves in the calling thread (the CLI: SIGTERM and Ctrl-C shut
    it down gracefully); ``start()`` in a background thread (tests).
    ``close()`` stops both and the engine loop.
    """

    def __init__(self, engine, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None, *,
                 api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
                 max_waiting: int = DEFAULT_MAX_WAITING, sock: socket.socket | None = None,
                 shutdown_grace_s: float = SHUTDOWN_GRACE_S):
        _require_extra()
        import uvicorn

        from llmopt.runtime.engine_loop import EngineLoop

        self.sock = sock if sock is not None else bind_socket(host, port)
        self.loop = EngineLoop(engine)
        self.model_name = served_model_name or engine.model_name
        self.max_model_len = engine.max_model_len
        config = getattr(engine, "config", None)
        max_num_seqs = getattr(config, "max_num_seqs", None) or 128
        self.app = create_app(self.loop, engine.tokenizer, self.model_name, self.max_model_len, api_key=api_key,
                              max_body_bytes=max_body_bytes, max_pending=max_num_seqs + max_waiting)
        self.uvicorn = uvicorn.Server(uvicorn.Config(
            self.app, http=_protocol_class(), lifespan="off", log_level="warning", access_log=False,
            timeout_keep_alive=30, timeout_graceful_shutdown=shutdown_grace_s, h11_max_incomplete_event_size=65536))
        self._thread: threading.Thread | None = None
        self.loop.start()

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    @property
    def url(self) -> str:
        host = self.sock.getsockname()[0]
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def run(self) -> None:
        """Serve until SIGTERM or SIGINT; then stop taking requests, let those in flight finish, stop."""
        serving = self.app.state.serving
        original = signal.getsignal(signal.SIGTERM)

        def stop_accepting(signum, frame):
            serving.accepting = False  # /health says 503 at once; uvicorn stops accepting connections
            self.uvicorn.handle_exit(signum, frame)

        self.uvicorn.install_signal_handlers = lambda: None  # ours, below, and uvicorn's for SIGINT
        signal.signal(signal.SIGTERM, stop_accepting)
        signal.signal(signal.SIGINT, stop_accepting)
        try:
            self.uvicorn.run(sockets=[self.sock])
        finally:
            signal.signal(signal.SIGTERM, original)
            self.close()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.sock]},
                                        name="llmopt-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started and time.monotonic() < deadline:
            if not self._thread.is_alive():
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)

    def close(self) -> None:
        if self._thread is not None:
            self.uvicorn.should_exit = True
            self._thread.join(SHUTDOWN_GRACE_S + 5)
            self._thread = None
        self.loop.stop()
        try:
            self.sock.close()
        except OSError:
            pass


def build_server(engine, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None,
                 **options) -> OpenAIServer:
    """An ``OpenAIServer`` bound to ``host:port`` (0: any free port), its engine loop running."""
    return OpenAIServer(engine, host, port, served_model_name, **options)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; BindError when the address is taken or unknown."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
        sock.set_inheritable(True)
    except OSError as error:
        raise BindError(f"cannot serve on {host}:{port}: {error.strerror or error}") from None
    return sock


# --- the CLI's entry point ------------------------------------------------------------


def serve(llm_options: dict, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None, *,
          api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
          max_waiting: int = DEFAULT_MAX_WAITING) -> None:
    """Bind, load the model (``LLM(**llm_options)``), warm it up, serve until SIGTERM or Ctrl-C.

    The address is bound first, so a port in use is reported before the
    model loads rather than after. On SIGTERM the server stops accepting,
    lets requests in flight finish (``SHUTDOWN_GRACE_S``, then aborts them)
    and returns, so the process exits 0.
    """
    _require_extra()
    from llmopt.runtime.llm import LLM

    sock = bind_socket(host, port)
    try:
        llm = LLM(**llm_options)
        _warm_up(llm.engine)
        server = build_server(llm.engine, host, port, served_model_name, api_key=api_key,
                              max_body_bytes=max_body_bytes, max_waiting=max_waiting, sock=sock)
    except BaseException:
        sock.close()
        raise
    print(f"llmopt serve: ready on {server.url}, model {server.model_name}", flush=True)
    server.run()
    print("llmopt serve: stopped", file=sys.stderr, flush=True)


def _warm_up(engine) -> None:
    """Run one tiny request so the first client does not wait for the compile."""
    from llmopt.runtime.sampling_params import SamplingParams

    print("llmopt: warming up (the first steps compile the model) ...", file=sys.stderr, flush=True)
    prompt = engine.tokenizer("Hello", add_special_tokens=True)["input_ids"]
    engine.add_request("llmopt-warm-up", list(prompt), SamplingParams(max_tokens=2, temperature=0.0))
    while engine.has_unfinished():
        engine.step()

