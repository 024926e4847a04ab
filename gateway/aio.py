"""The worker's one event loop: every Serve call of a gateway process is made on it.

gunicorn's gthread workers run Flask views in threads; a view hands its Serve call to this
loop (``EventLoop.run``) and waits on a future. On the loop, handles are made with Serve's
router in the caller's loop (no second loop, no hop between them) and call replicas over
gRPC (``_by_reference=False``); see ``Dispatcher`` for how calls, streams and cancellation use it.

Nothing of the gateway's blocks on the loop: Ray's ``ray.get`` (the registry, cooldowns) and
every lock stay in the request's thread; the loop awaits Serve responses and sleeps. (Serve's
router itself asks the cluster a few things synchronously when a handle is made and when it
first sees a replica: once per endpoint and per replica, not per call.)
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
