"""The thread that owns the engine, for ``llmopt serve`` (standard library only).

The engine is not thread-safe, so one ``EngineLoop`` thread is the only one
that touches it. Other threads (the server's event loop) call ``submit`` and
``abort``: they post to an inbox. The loop takes new requests and aborts
from it, steps the engine while it has work, sleeps when idle, and hands
each request's outputs to that request's ``deliver`` callback. Requests from
concurrent clients therefore share the engine's steps (continuous batching).
After every change the loop publishes a ``LoopStats`` snapshot (running and
waiting sequences, KV blocks) that ``/metrics`` reads without touching the engine.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus

logger = logging.getLogger("llmopt.server")


@dataclass(frozen=True)
class Failure:
    """What a request gets instead of outputs when it cannot go on."""

    status: int
    message: str
    type: str = "server_error"


ACCEPTED = object()  # first item delivered once the engine took the request


@dataclass(frozen=True)
class LoopStats:
    running: int = 0
    waiting: int = 0
    blocks_total: int = 0
    blocks_free: int = 0
    steps: int = 0


Deliver = Callable[[object], None]


class EngineLoop:
    """Owns the engine; other threads only call ``submit``, ``abort`` and ``stop``.

    Each request's ``deliver`` receives ``ACCEPTED`` (or a ``Failure`` when
    the engine refuses it), then its cumulative ``RequestOutput``s, the last
    one finished. An exception in ``engine.step`` fails every request in
    flight with a 500 ``Failure`` (they are aborted, so their blocks come
    back) and the loop carries on.
    """

    def __init__(self, engine):
        self.engine = engine
        self._wakeup = threading.Condition()
        self._inbox: list[tuple] = []
        self._stopping = False
        self._delivers: dict[str, Deliver] = {}  # requests in the engine; loop thread only
        self.stats = LoopStats()
        self._thread = threading.Thread(target=self._run, name="llmopt-engine-loop", daemon=True)

    def start(self) -> None:
        self._publish()
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort what is left, fail those waiting with a 503, end the thread."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, request_id: str, prompt_token_ids: list[int], params, deliver: Deliver) -> None:
        self._post(("add", request_id, prompt_token_ids, params, deliver))

    def abort(self, request_id: str) -> None:
        self._post(("abort", request_id))

    def _post(self, command: tuple) -> None:
        with self._wakeup:
            if self._stopping and command[0] == "add":
                _safe(command[-1], Failure(HTTPStatus.SERVICE_UNAVAILABLE, "the server is shutting down"))
                return
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
                self._publish()
        except Exception:  # a bug in the loop itself: say so, and fail everyone waiting
            logger.exception("llmopt serve: the engine loop stopped")
        finally:
            for request_id in list(self._delivers):
                self._abort_in_engine(request_id)
            self._fail_all(Failure(HTTPStatus.SERVICE_UNAVAILABLE, "the server is shutting down"))
            self._publish()

    def _apply(self, command: tuple) -> None:
        if command[0] == "abort":
            if self._delivers.pop(command[1], None) is not None:
                self._abort_in_engine(command[1])
            return
        _, request_id, prompt_token_ids, params, deliver = command
        try:
            self.engine.add_request(request_id, prompt_token_ids, params)
        except ValueError as error:  # the engine's word on an empty or too-long prompt
            _safe(deliver, Failure(HTTPStatus.BAD_REQUEST, str(error), "invalid_request_error"))
            return
        except Exception as error:
            logger.exception("llmopt serve: engine.add_request failed for %s", request_id)
            _safe(deliver, Failure(HTTPStatus.INTERNAL_SERVER_ERROR, f"the engine failed to add the request: {error}"))
            return
        self._delivers[request_id] = deliver
        _safe(deliver, ACCEPTED)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as error:
            logger.exception("llmopt serve: engine.step failed; failing the %d requests in flight",
                             len(self._delivers))
            failure = Failure(HTTPStatus.INTERNAL_SERVER_ERROR, f"the engine failed: {type(error).__name__}: {error}")
            for request_id in list(self._delivers):
                self._abort_in_engine(request_id)
            self._fail_all(failure)
            return
        for output in outputs:
            deliver = self._delivers.get(output.request_id)
            if deliver is None:
                continue  # aborted by its client meanwhile
            if output.finished:
                del self._delivers[output.request_id]
            _safe(deliver, output)

    def _abort_in_engine(self, request_id: str) -> None:
        try:
            self.engine.abort(request_id)
        except Exception:
            logger.exception("llmopt serve: engine.abort(%r) failed", request_id)

    def _fail_all(self, failure: Failure) -> None:
        delivers, self._delivers = self._delivers, {}
        for deliver in delivers.values():
            _safe(deliver, failure)
        with self._wakeup:
            inbox, self._inbox = self._inbox, []
        for command in inbox:
            if command[0] == "add":
                _safe(command[-1], failure)

    def _publish(self) -> None:
        engine = self.engine
        scheduler = getattr(engine, "scheduler", None)
        running = len(getattr(scheduler, "running", ())) if scheduler is not None else len(self._delivers)
        waiting = len(getattr(scheduler, "waiting", ())) if scheduler is not None else 0
        self.stats = LoopStats(running=running, waiting=waiting,
                               blocks_total=int(getattr(engine, "num_total_blocks", 0)),
                               blocks_free=int(getattr(engine, "num_free_blocks", 0)),
                               steps=self.stats.steps + 1)


def _safe(deliver: Deliver, item) -> None:
    try:
        deliver(item)
    except Exception:  # the receiver is gone (its event loop closed): nothing to tell
        logger.debug("llmopt serve: could not deliver to a finished request", exc_info=True)
