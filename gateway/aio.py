"""The worker's one event loop: every chat call and every Serve call of a gateway process runs on it.

In a served process (``gateway.server.GatewayWorker``) this is the ASGI server's own loop, which
``gateway.front`` adopts at start (``EventLoop.adopt``): the chat routes run on it from the body's
first byte to the last SSE event, awaiting Serve's responses and the registry's answers there.
Elsewhere (tests, ``Flask`` routes' threads, benches) the loop runs in a daemon thread this process
owns, started on first use; threads hand it coroutines with ``run`` / ``submit``.

Handles are made with Serve's router in this loop (no second loop, no hop between them) and call
replicas over gRPC (``_by_reference=False``); see ``Dispatcher``. Nothing of the gateway's blocks
the loop per call: the registry's and the limits keeper's answers are awaited, and what blocks once
(connecting to Ray, a first look-up of an application) runs in a thread. (Serve's router itself asks
the cluster a few things synchronously when a handle is made and when it first sees a replica: once
per endpoint and per replica, not per call.)
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Awaitable, Callable, Optional, TypeVar

T = TypeVar("T")


class EventLoop:
    """An asyncio loop in a daemon thread this process owns (started on first use)."""

    def __init__(self, name: str = "serve-calls", exception_handler: Optional[Callable[..., Any]] = None) -> None:
        self._name = name
        self._exception_handler = exception_handler
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            with self._lock:
                if self._loop is None:
                    loop = asyncio.new_event_loop()
                    if self._exception_handler is not None:
                        loop.set_exception_handler(self._exception_handler)
                    self._thread = threading.Thread(target=loop.run_forever, name=self._name, daemon=True)
                    self._thread.start()
                    self._loop = loop
        return self._loop

    def adopt(self, loop: asyncio.AbstractEventLoop) -> None:
        """Use ``loop`` (running in this thread: the ASGI server's) instead of a thread of its own."""
        with self._lock:
            if self._loop is not None and self._loop is not loop:
                raise RuntimeError("this process's event loop was started before the server's was adopted")
            if self._exception_handler is not None:
                loop.set_exception_handler(self._exception_handler)
            self._loop, self._thread = loop, threading.current_thread()

    def in_loop(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def submit(self, coro: Awaitable[T]) -> "concurrent.futures.Future[T]":
        """Run ``coro`` on the loop; the future is its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Awaitable[T]) -> T:
        """Run ``coro`` on the loop and wait for it in this thread (never from the loop itself).

        The coroutine bounds its own time; if this thread is interrupted, the coroutine is cancelled.
        """
        if self.in_loop():
            coro.close()
            raise RuntimeError("EventLoop.run on its own loop would wait for itself forever: await the coroutine instead")
        future = self.submit(coro)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop, without waiting (e.g. cancelling a Serve response)."""
        self.loop.call_soon_threadsafe(fn, *args)
