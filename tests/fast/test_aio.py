"""The worker's one event loop (gateway/aio.py): what the dispatcher relies on when it hands calls to it."""
import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from gateway.aio import EventLoop
from gateway.errors import GatewayError


def test_calls_from_many_threads_all_run_on_the_one_loop_thread_and_wait_together():
    loop = EventLoop()
    seen: set = set()

    async def call(i):
        seen.add(threading.current_thread().name)
        await asyncio.sleep(0.3)  # 64 of these at once: together, not one after another
        return i

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(lambda i: loop.run(call(i)), range(64)))
    assert results == list(range(64))
    assert seen == {"serve-calls"}


def test_an_error_raised_on_the_loop_reaches_the_caller_as_itself():
    async def fail():
        raise GatewayError("upstream_timeout", "no answer")

    with pytest.raises(GatewayError) as caught:
        EventLoop().run(fail())
    assert caught.value.type == "upstream_timeout"


def test_run_from_the_loop_itself_fails_at_once_instead_of_waiting_forever():
    loop = EventLoop()

    async def inner():
        return 1

    async def outer():
        return loop.run(inner())

    with pytest.raises(RuntimeError, match="wait for itself"):
        loop.run(outer())


def test_call_soon_runs_on_the_loop_without_waiting():
    loop = EventLoop()
    done = threading.Event()
    where = []
    loop.call_soon(lambda: (where.append(threading.current_thread().name), done.set()))
    assert done.wait(5) and where == ["serve-calls"]
