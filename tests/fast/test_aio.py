"""The worker's one event loop (gateway/aio.py) and how the dispatcher waits on it (``ReplicaClient.wait``).

What the dispatcher relies on when it hands every Serve call to the loop: calls from many threads
run together on one thread, errors come back as themselves, a call that runs out of time or meets a
lost cluster is cancelled, and nothing is left for asyncio to complain about. No Ray here: the
"Serve call" is a coroutine, and the Dispatcher's cluster is never connected.
"""
import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from gateway.aio import EventLoop
from gateway.config import Settings
from contract.errors import GatewayError


def test_calls_from_many_threads_all_run_on_the_one_loop_thread_at_once():
    loop = EventLoop()
    seen: set = set()
    waiting = [0, 0]  # now, most at once
    all_in = asyncio.Event()

    async def call(i):
        seen.add(threading.current_thread().name)
        waiting[0] += 1
        waiting[1] = max(waiting[1], waiting[0])
        if waiting[0] == 64:
            all_in.set()
        await asyncio.wait_for(all_in.wait(), 30)  # every call waits until all 64 wait together
        waiting[0] -= 1
        return i

    loop.run(asyncio.sleep(0))  # (the loop exists before the Event is used on it)
    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(lambda i: loop.run(call(i)), range(64)))
    assert results == list(range(64))
    assert waiting[1] == 64 and seen == {"serve-calls"}


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
        loop.submit(outer()).result(timeout=10)


def test_call_soon_runs_on_the_loop_without_waiting():
    loop = EventLoop()
    done = threading.Event()
    where = []
    loop.call_soon(lambda: (where.append(threading.current_thread().name), done.set()))
    assert done.wait(10) and where == ["serve-calls"]


class Pending:
    """A Serve call that never answers by itself; cancelling it ends it as Serve does (with an exception)."""

    def __init__(self):
        self.future = None
        self.cancelled = 0

    async def wait(self):
        self.future = asyncio.get_running_loop().create_future()
        try:
            return await self.future
        except asyncio.CancelledError:
            raise RuntimeError("cancelled by the caller") from None  # (Serve: RequestCancelledError)

    def cancel(self):
        self.cancelled += 1


@pytest.fixture
def dispatcher():
    from gateway.cluster import Cluster
    from gateway.dispatch import Dispatcher

    return Dispatcher(Cluster(Settings.from_env({})), Settings.from_env({}))


@pytest.fixture
def asyncio_errors():
    """What asyncio logs as errors (e.g. "Task exception was never retrieved")."""
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("asyncio").addHandler(handler)
    yield seen
    logging.getLogger("asyncio").removeHandler(handler)


def test_a_call_past_its_deadline_is_cancelled_and_its_end_read(dispatcher, asyncio_errors):
    import gc

    call = Pending()
    with pytest.raises(TimeoutError):
        dispatcher.loop.run(dispatcher.replicas.wait(call.wait(), 0.2, call.cancel))
    assert call.cancelled == 1
    dispatcher.loop.run(asyncio.sleep(0.05))  # (the cancelled task ends)
    gc.collect()
    assert not [m for m in asyncio_errors if "never retrieved" in m]


def test_a_waiting_call_meets_a_lost_cluster_as_cluster_unavailable_and_is_cancelled(dispatcher, monkeypatch):
    import gateway.replica_client as dispatch

    monkeypatch.setattr(dispatch, "_POLL_S", 0.05)  # (looks at the cluster every 50 ms instead of 2 s)
    call = Pending()
    threading.Timer(0.2, lambda: setattr(dispatcher.cluster, "lost", True)).start()
    with pytest.raises(GatewayError) as caught:
        dispatcher.loop.run(dispatcher.replicas.wait(call.wait(), 60, call.cancel))
    assert caught.value.type == "cluster_unavailable" and call.cancelled == 1


def test_an_answer_in_time_is_returned_and_nothing_is_cancelled(dispatcher):
    async def answer():
        await asyncio.sleep(0.01)
        return "ok"

    cancelled = []
    assert dispatcher.loop.run(dispatcher.replicas.wait(answer(), 5, lambda: cancelled.append(1))) == "ok"
    assert cancelled == []
