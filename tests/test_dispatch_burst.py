"""A burst of calls on a cold endpoint: one look-up per endpoint, shared (``Dispatcher.resolve`` is single-flight).

Each test takes a gateway process of its own (``create_app`` on the session's cluster), so the endpoint
is cold in it, and counts what its ``resolve`` asked the cluster (``Dispatcher.lookups``).
"""
from __future__ import annotations

import asyncio

import pytest
from ray import serve

from gateway import Settings, create_app
from contract.errors import GatewayError
from contract.calls import ChatCall, Message


def cold_dispatcher(ray_head, **settings):
    return create_app(Settings.from_env(ray_address=ray_head.address, cooldown_s=0, **settings)).extensions["gateway"].dispatcher


def call(i: int) -> ChatCall:
    return ChatCall(request_id=f"burst-{i}", messages=[Message(role="user", content="hi")])


def test_a_burst_on_a_cold_endpoint_makes_one_handle_and_one_registry_read(ray_head, ep):
    chat_name, _ = ep()
    # (no cache: every call of the second burst looks again, and still they share one look-up)
    dispatcher = cold_dispatcher(ray_head, endpoint_cache_s=0)

    async def burst(first: int):
        return await asyncio.gather(*(dispatcher.chat(chat_name, call(first + i)) for i in range(50)))

    try:
        outcomes = dispatcher.loop.run(burst(0))
        assert [o.result.output for o in outcomes] == ["echo: hi"] * 50
        assert dict(dispatcher.lookups) == {"registry": 1, "controller": 1, "handles": 1}
        # the entry has expired: the next burst reads the registry once more, and keeps its handle
        outcomes = dispatcher.loop.run(burst(50))
        assert [o.result.output for o in outcomes] == ["echo: hi"] * 50
        assert dict(dispatcher.lookups) == {"registry": 2, "controller": 1, "handles": 1}
        assert len({id(o.endpoint.handle) for o in outcomes}) == 1
    finally:
        dispatcher.cache.drop_handles(chat_name)


def test_a_waiter_that_leaves_does_not_end_the_look_up_of_the_others(ray_head, ep):
    chat_name, _ = ep()
    dispatcher = cold_dispatcher(ray_head)

    async def burst():
        waiters = [asyncio.ensure_future(dispatcher.resolve(chat_name)) for _ in range(10)]
        await asyncio.sleep(0)  # every waiter is waiting on the one look-up now, the first one began it
        waiters[0].cancel()
        waiters[3].cancel()
        return await asyncio.gather(*waiters, return_exceptions=True)

    try:
        answers = dispatcher.loop.run(burst())
        assert isinstance(answers[0], asyncio.CancelledError) and isinstance(answers[3], asyncio.CancelledError)
        endpoints = [a for i, a in enumerate(answers) if i not in (0, 3)]
        assert len(endpoints) == 8 and all(e is endpoints[0] for e in endpoints) and endpoints[0].name == chat_name
        assert dict(dispatcher.lookups) == {"registry": 1, "controller": 1, "handles": 1}
        assert dispatcher.known(chat_name) is endpoints[0]  # (the look-up filled the cache)
    finally:
        dispatcher.cache.drop_handles(chat_name)


def test_a_failed_look_up_reaches_every_waiter_and_is_not_kept(ray_head, ep):
    chat_name, _ = ep()
    serve.delete(chat_name)  # (registered, but Serve has no such application: endpoint_not_ready)
    dispatcher = cold_dispatcher(ray_head)

    async def burst():
        return await asyncio.gather(*(dispatcher.resolve(chat_name) for _ in range(20)), return_exceptions=True)

    errors = dispatcher.loop.run(burst())
    assert all(isinstance(e, GatewayError) and e.type == "endpoint_not_ready" for e in errors), errors
    assert len({id(e) for e in errors}) == 20  # (each its own copy)
    assert dict(dispatcher.lookups) == {"registry": 1, "controller": 1}
    errors = dispatcher.loop.run(burst())  # not kept: the next burst asks again, once
    assert all(isinstance(e, GatewayError) and e.type == "endpoint_not_ready" for e in errors)
    assert dict(dispatcher.lookups) == {"registry": 2, "controller": 2}


def test_a_burst_on_a_missing_name_reads_the_registry_once(ray_head, ep, name):
    dispatcher = cold_dispatcher(ray_head)
    chat_name, _ = ep()
    missing = chat_name + "x"  # (close to a deployed name: the hint names it)

    async def burst():  # (the last caller's key may see no endpoint: its hint names none)
        return await asyncio.gather(*(dispatcher.resolve(missing) for _ in range(19)),
                                    dispatcher.resolve(missing, visible=lambda n: False), return_exceptions=True)

    for round_ in (1, 2):
        *errors, hidden = dispatcher.loop.run(burst())
        assert all(isinstance(e, GatewayError) and e.type == "not_found" and repr(chat_name) in e.info.message
                   for e in errors), errors
        assert hidden.type == "not_found" and "did you mean" not in hidden.info.message
        # one read of the record and one of the names for the hint, per burst; no handle
        assert dict(dispatcher.lookups) == {"registry": round_, "names": round_}
