"""First token in seconds: answer from an uncompiled model while the engine compiles.

Compiling the engine (Dynamo tracing, llmopt's passes, Inductor) takes tens of
seconds on CPU even with warm caches, far longer than loading the model. So
``llmopt generate`` starts a worker process (:mod:`.quick_start_worker`) that
loads the model and decodes with the plain Hugging Face cache loop at once,
and only then loads and compiles the engine itself. Tokens stream from the
worker until the engine is compiled and warmed up; then the worker is
stopped and the engine continues from the prompt plus every token the worker
produced. A short reply may finish before the engine is ready; the engine's
compile is then abandoned.

Why a process and not a thread: both decoding and compiling need the GIL
(every torch op drops and retakes it), and a thread compiling beside the
decoding loop slows decoding to a crawl. Two processes share the cores
without that.

Greedy replies are the same tokens either way (the engine and the Hugging
Face loop agree in fp32: see the engine's tests). A sampled reply is
reproducible for a given ``seed`` only as long as no switch happens, since
the two processes draw from their own generators.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


class QuickStartFailed(RuntimeError):
    """The worker stopped before its first token (the message says why)."""


@dataclass
class QuickStartStats:
    """Where a reply's tokens came from and when."""

    first_token_s: float | None = None  # from QuickStart() to the first token
    from_worker: int = 0
    from_engine: int = 0
    switched_at_s: float | None = None  # when the engine took over (None: it did not)
    engine_error: str | None = None  # why the engine could not take over
    progress: list[str] = field(default_factory=list)


class _Worker:
    """The worker process and a thread reading its events."""

    def __init__(self, request: dict, say: Callable[[str], None]):
        self.say = say
        self.prompt_ids: list[int] | None = None
        self.tokens: list[tuple[int, str]] = []  # (token id, new text)
        self.done = False
        self.error: str | None = None
        self.changed = threading.Condition()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmopt.runtime.quick_start_worker", json.dumps(request)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            kind, _, rest = line.rstrip("\n").partition(" ")
            with self.changed:
                if kind == "token":
                    token, _, text = rest.partition(" ")
                    self.tokens.append((int(token), json.loads(text)))
                elif kind == "prompt":
                    self.prompt_ids = json.loads(rest)
                elif kind == "progress":
                    self.say(json.loads(rest))
                elif kind == "done":
                    self.done = True
                elif kind == "error":
                    self.error = rest
                self.changed.notify_all()
        with self.changed:
            if not self.done and self.error is None:
                self.error = f"the worker exited (status {self.proc.wait()})"
            self.changed.notify_all()

    def stop(self) -> None:
        """End the worker; every token it wrote before it ended is in ``tokens``."""
        try:
            self.proc.stdin.close()  # it exits at EOF on stdin
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join()


class _EngineBuilder(threading.Thread):
    """Builds the engine (``build()`` loads, compiles and warms it up) beside the worker."""

    def __init__(self, build: Callable[[], Any]):
        super().__init__(daemon=True)
        self.build, self.engine, self.error = build, None, None
        self.ready = threading.Event()

    def run(self) -> None:
        try:
            # Linux sets priorities per thread: the compile yields the cores to the worker's decoding.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        try:
            self.engine = self.build()
        except Exception as error:
            self.error = f"{type(error).__name__}: {error}"
        finally:
            self.ready.set()


def stream(request: dict, build_engine: Callable[[], Any],
           continue_on_engine: Callable[[Any, list[int], int], Iterator[list[int]]],
           say: Callable[[str], None] = lambda message: None,
           stats: QuickStartStats | None = None) -> Iterator[tuple[int, str | None]]:
    """Yield ``(token id, new text or None)`` for one reply, from the worker, then the engine.

    ``request``: the worker's request (``model``, ``prompt``, ``system``,
    ``max_tokens``, ``temperature``, ``top_k``, ``seed``, ``threads``).
    ``build_engine()``: loads, compiles and warms up the engine; it starts
    after the worker's first token, so it does not slow that token down.
    ``continue_on_engine(engine, token_ids, max_tokens)``: continues the
    reply from ``token_ids`` (prompt + tokens so far) and yields the token
    ids the engine adds, cumulatively. Engine tokens come with ``None`` as
    their text: the caller decodes them with the tokens before them.
    Raises :class:`QuickStartFailed` if the worker fails before its first token.
    """
    stats = stats if stats is not None else QuickStartStats()
    start = time.perf_counter()
    worker = _Worker(request, say)
    builder = _EngineBuilder(build_engine)
    sent, engine_failed = 0, False
    try:
        while True:
            with worker.changed:
                worker.changed.wait_for(lambda: len(worker.tokens) > sent or worker.done or worker.error
                                        or (builder.ready.is_set() and not engine_failed), timeout=0.1)
                fresh = worker.tokens[sent:]
                done, error = worker.done, worker.error
            for token, text in fresh:
                if stats.first_token_s is None:
                    stats.first_token_s = time.perf_counter() - start
                    builder.start()
                yield token, text
            sent += len(fresh)
            stats.from_worker = sent
            if done:
                return
            if builder.ready.is_set() and not engine_failed:
                if builder.error is None:
                    break
                engine_failed, stats.engine_error = True, builder.error
                say(f"the compiled engine failed to start ({builder.error}); the reply comes from the "
                    "uncompiled loop")
            if error is not None:
                if sent == 0:
                    raise QuickStartFailed(error)
                if engine_failed:
                    raise QuickStartFailed(f"the quick-start loop stopped ({error}) and the engine failed "
                                           f"({stats.engine_error})")
                say(f"the quick-start loop stopped ({error}); waiting for the compiled engine")
                builder.ready.wait()
        worker.stop()
        for token, text in worker.tokens[sent:]:  # written before it stopped
            yield token, text
        sent = len(worker.tokens)
        stats.from_worker = sent
        remaining = request["max_tokens"] - sent
        if remaining <= 0 or (worker.done and worker.error is None):
            return
        stats.switched_at_s = time.perf_counter() - start
        emitted = 0
        for token_ids in continue_on_engine(builder.engine, worker.prompt_ids + [t for t, _ in worker.tokens],
                                            remaining):
            for token in token_ids[emitted:]:
                yield token, None
            emitted = len(token_ids)
            stats.from_engine = emitted
    finally:
        worker.stop()


def engine_still_building(stats: QuickStartStats) -> bool:
    """Whether the reply ended before the engine took over (its compile may still be running)."""
    return stats.switched_at_s is None
