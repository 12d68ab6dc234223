"""A request's handle: what the engine thread sends, for a thread or an event loop to consume.

    gen = engine.submit(...)
    for piece in gen: ...                      # text pieces, blocking this thread
    async for delta in gen.stream(): ...       # Deltas (text + token ids), in an event loop
    gen.wait(); gen.text, gen.token_ids        # complete once done, iterated or not

Only the engine thread writes a Generation (engine/engine.py); consumers read. Events travel
through a thread-safe queue; an asyncio consumer is woken with call_soon_threadsafe, so the
event loop never blocks on the engine.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edgelora_np.errors import EngineError

if TYPE_CHECKING:
    from edgelora_np.engine.engine import Engine

_DONE = object()


@dataclass(frozen=True)
class Delta:
    """New output of one request: text ready to show, and the tokens generated since the last."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(eq=False)
class Generation:
    """One request's stream. Iterate for text pieces; afterwards the fields describe it all.

    Written only by the engine thread; `text` and `token_ids` are complete once `done`,
    whether or not anyone iterated. Times are time.perf_counter() values.
    """

    prompt_tokens: int
    cached_tokens: int = 0             # prompt positions served from the prefix cache
    adapter: str | None = None
    adapter_scale: float = 1.0
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None   # "stop", "length", "context", "cancelled" or "error"
    stopping_word: str = ""            # the stop string that ended it ("stop" without one: EOS)
    route: object | None = None        # with adapter="auto": the router's Route (router/router.py)
    error: BaseException | None = None
    submitted: float = field(default_factory=time.perf_counter)
    admitted: float | None = None      # left the queue for the batch
    first_token: float | None = None   # its first token was sampled
    finished: float | None = None
    _events: queue.Queue = field(default_factory=queue.Queue, repr=False)
    _finished: threading.Event = field(default_factory=threading.Event, repr=False)
    _notify: Callable[[], None] | None = field(default=None, repr=False)
    _engine: Engine | None = field(default=None, repr=False)
    _cancelled: bool = field(default=False, repr=False)

    # --- consuming ---------------------------------------------------------------------------

    def __iter__(self) -> Iterator[str]:
        for delta in self.deltas():
            yield delta.text

    def deltas(self) -> Iterator[Delta]:
        """The stream as Deltas (text and token ids), blocking this thread between them."""
        manual = self._engine is not None and not self._engine.background
        while True:
            try:
                event = self._events.get(block=not manual)
            except queue.Empty:
                raise EngineError("this request is not finished and nothing runs its engine's "
                                  "steps: call engine.step() (background=False)") from None
            if event is _DONE:
                if self.error is not None:
                    raise self.error
                return
            yield event

    async def stream(self) -> AsyncIterator[Delta]:
        """The stream as Deltas, for an asyncio consumer: never blocks the event loop."""
        # Imported here, not at the top: it costs 3 MB of RSS, which an engine with no event
        # loop does not need (the single-stream memory figure, issue #14).
        import asyncio

        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        self._notify = lambda: loop.call_soon_threadsafe(ready.set)
        try:
            while True:
                try:
                    event = self._events.get_nowait()
                except queue.Empty:
                    await ready.wait()
                    ready.clear()
                    continue
                if event is _DONE:
                    if self.error is not None:
                        raise self.error
                    return
                yield event
        finally:
            self._notify = None

    def run(self) -> Generation:
        """Consume the whole stream (for callers that do not stream); raises its error."""
        for _ in self.deltas():
            pass
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request has ended (without consuming the stream); False on timeout."""
        return self._finished.wait(timeout)

    def cancel(self) -> None:
        """Stop generating; the sequence is retired at the next step."""
        self._cancelled = True
        if self._engine is not None:
            self._engine._wake.set()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def queue_seconds(self) -> float:
        return (self.admitted or self.finished or self.submitted) - self.submitted

    @property
    def prefill_seconds(self) -> float:
        """From admission to the first token: the prompt's processing."""
        if self.admitted is None or self.first_token is None:
            return 0.0
        return self.first_token - self.admitted

    @property
    def decode_seconds(self) -> float:
        """From the first token to the end."""
        if self.first_token is None or self.finished is None:
            return 0.0
        return self.finished - self.first_token

    # --- the engine thread's side --------------------------------------------------------------

    def _push(self, event) -> None:
        self._events.put(event)
        notify = self._notify
        if notify is not None:
            try:
                notify()
            except RuntimeError:        # the consumer's event loop is closed: nobody listens
                pass

    def _end(self, reason: str, error: BaseException | None) -> None:
        self.finish_reason, self.error = reason, error
        self.finished = time.perf_counter()
        self._finished.set()
        self._push(_DONE)
