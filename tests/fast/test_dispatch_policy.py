"""The dispatcher's policy without Ray: fallbacks, the bulkhead, cooldowns and probes, a caller's limits, how a stream ends.

``Dispatcher`` takes its registry and replica clients injected (``registry=``, ``replicas=``); here they
are in-memory fakes (``FakeRegistry``, ``FakeReplicas``) that record what the dispatcher asked of them,
and the request's key is a ``FakeCaller`` with a ``FakeReservation``. Each test runs on its own event
loop (``asyncio.run``), in milliseconds.
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter
from types import SimpleNamespace
from typing import Any, Optional

import pytest

from contract.calls import ChatCall, ChatResult, Usage
from contract.errors import ErrorInfo, GatewayError
from contract.events import Delta, Failure, Finish
from gateway.config import Settings
from gateway.dispatch import Dispatcher
from gateway.records import EndpointRecord, Health

CALL = ChatCall(request_id="r1", messages=[{"role": "user", "content": "hi"}])


def record(name: str, *fallbacks: str, **fields: Any) -> EndpointRecord:
    return EndpointRecord(chat_name=name, provider="openai", timeout=5, fallbacks=tuple(fallbacks), **fields)


def answer(name: str, tokens: int = 7) -> ChatResult:
    return ChatResult(output=f"from {name}", usage=Usage(prompt_tokens=3, completion_tokens=tokens - 3, total_tokens=tokens))


class FakeRegistry:
    """The registry's records and its shared cooldown state, in memory (``RegistryClient``'s async methods)."""

    def __init__(self, *records: EndpointRecord) -> None:
        self.records = {r.chat_name: r for r in records}
        self.calls: list[tuple] = []
        self.probing: set[str] = set()
        self.failures: Counter = Counter()

    def health(self, name: str, health: Health) -> None:
        self.records[name] = self.records[name].with_health(health)

    async def aget(self, name: str) -> Optional[EndpointRecord]:
        self.calls.append(("get", name))
        return self.records.get(name)

    async def anames(self) -> list[str]:
        return list(self.records)

    async def aclaim_probe(self, name: str, lease_s: float) -> bool:
        self.calls.append(("claim_probe", name))
        if name in self.probing:
            return False
        self.probing.add(name)
        return True

    async def arelease_probe(self, name: str) -> None:
        self.calls.append(("release_probe", name))
        self.probing.discard(name)

    async def arecord_failure(self, name: str, error_type: str, immediate: bool, failures: int, window_s: float,
                              cooldown_s: float) -> Health:
        self.calls.append(("record_failure", name, error_type, immediate))
        self.probing.discard(name)
        self.failures[name] += 1
        n = self.failures[name]
        if immediate or n >= failures:
            health = Health(state="cooling_down", consecutive_failures=n, cooldown_until=time.time() + cooldown_s,
                            last_error=error_type, cooldowns=1)
        else:
            health = Health(state="ok", consecutive_failures=n, last_error=error_type)
        self.health(name, health)
        return health

    def record_success_nowait(self, name: str):
        self.calls.append(("record_success", name))
        self.probing.discard(name)
        self.failures.pop(name, None)
        self.health(name, Health())

        async def recorded() -> Health:
            return Health()

        return recorded()

    def said(self, kind: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == kind]


class FakeStream:
    """A replica's stream: its events in order, then its end (``StopAsyncIteration``); ``cancel`` counted."""

    def __init__(self, events: list) -> None:
        self.events = list(events)
        self.cancelled = 0

    def __aiter__(self) -> "FakeStream":
        return self

    async def __anext__(self):
        if not self.events:
            raise StopAsyncIteration
        event = self.events.pop(0)
        if isinstance(event, asyncio.Event):  # (held here until the test sets it)
            await event.wait()
            return await self.__anext__()
        return event

    def cancel(self) -> None:
        self.cancelled += 1


class FakeReplicas:
    """Replicas that answer what each endpoint's script says (``ReplicaClient``'s methods): a ``ChatResult``,
    a ``GatewayError`` (raised), an ``asyncio.Event`` (held until set, then the default answer) or, for
    streams, a list of events. Without a script: ``answer(name)`` / a short stream ending with ``Finish``."""

    loop = None

    def __init__(self, **script: list) -> None:
        self.script = {name: list(steps) for name, steps in script.items()}
        self.calls: list[str] = []
        self.streams: list[FakeStream] = []

    def _next(self, name: str) -> Any:
        steps = self.script.get(name)
        return steps.pop(0) if steps else None

    async def ingress(self, chat_name: str) -> str:
        return chat_name

    async def handles(self, deployment: str, chat_name: str) -> Any:
        return SimpleNamespace(app=chat_name)

    def close(self, handles: Any) -> None:
        pass

    async def chat(self, endpoint, call: ChatCall, timeout: float) -> ChatResult:
        self.calls.append(endpoint.name)
        step = self._next(endpoint.name)
        if isinstance(step, asyncio.Event):
            await step.wait()
            step = None
        if isinstance(step, GatewayError):
            raise step
        return step or answer(endpoint.name)

    async def open_stream(self, endpoint, call: ChatCall, timeout: float):
        self.calls.append(endpoint.name)
        step = self._next(endpoint.name)
        if isinstance(step, GatewayError):
            raise step
        gen = FakeStream(step if step is not None else [Delta("a"), Delta("b"), Finish("stop", Usage(total_tokens=5))])
        self.streams.append(gen)
        first = await gen.__anext__()
        if isinstance(first, Failure):
            raise GatewayError.from_info(first.error)
        return first, gen

    async def next_event(self, endpoint, gen: FakeStream, timeout: float):
        return await gen.__anext__()


class FakeReservation:
    def __init__(self) -> None:
        self.pieces = 0
        self.ended = False
        self.how: Optional[str] = None
        self.usage: Optional[Usage] = None

    def count(self, event: Any) -> None:
        self.pieces += 1

    async def settle(self, usage: Usage, output: str = "") -> None:
        self.ended, self.how, self.usage = True, "settled", usage

    def charge_streamed(self) -> None:
        self.ended, self.how = True, "charged_streamed"

    def release(self) -> None:
        self.ended, self.how = True, "released"


class FakeCaller:
    """A client key as the dispatcher sees it (``gateway.limits.Caller``): its scope, rate and reservations."""

    name = "key-1"

    def __init__(self, allowed: Optional[set[str]] = None, admit: Optional[GatewayError] = None,
                 reserve: Optional[GatewayError] = None) -> None:
        self.allowed, self._admit, self._reserve = allowed, admit, reserve
        self.admitted = self.refunded = 0
        self.settled: list[tuple[int, int]] = []
        self.reservations: list[FakeReservation] = []

    def allows(self, chat_name: str) -> bool:
        return self.allowed is None or chat_name in self.allowed

    async def admit(self) -> None:
        if self._admit is not None:
            raise self._admit
        self.admitted += 1

    def refund(self) -> None:
        self.refunded += 1

    async def reserve(self, endpoint, call, stream: bool = False) -> FakeReservation:
        if self._reserve is not None:
            raise self._reserve
        self.reservations.append(FakeReservation())
        return self.reservations[-1]

    def settle(self, attempts: int, total_tokens: int = 0) -> None:
        self.settled.append((attempts, total_tokens))


def dispatcher(registry: FakeRegistry, replicas: FakeReplicas, **settings: Any) -> Dispatcher:
    values = {"cooldown_s": 30, "cooldown_failures": 2, "endpoint_queue": 0, "endpoint_queue_s": 0} | settings
    return Dispatcher(None, Settings.from_env({}, **values), registry=registry, replicas=replicas)


def run(coro):
    return asyncio.run(coro)


def failure(type: str, message: str = "boom") -> GatewayError:
    return GatewayError(type, message)


# -- fallbacks ------------------------------------------------------------------------------------------------
def test_the_primary_then_its_fallbacks_in_order_and_what_was_tried():
    registry = FakeRegistry(record("a", "b", "c"), record("b"), record("c"))
    replicas = FakeReplicas(a=[failure("upstream_error")], b=[failure("upstream_timeout")])
    outcome = run(dispatcher(registry, replicas).chat("a", CALL))
    assert outcome.endpoint.name == "c" and outcome.result.output == "from c"
    assert replicas.calls == ["a", "b", "c"]
    assert [(t["chat_name"], t["type"]) for t in outcome.tried] == [("a", "upstream_error"), ("b", "upstream_timeout")]


def test_a_caller_error_never_falls_back():
    registry = FakeRegistry(record("a", "b"), record("b"))
    replicas = FakeReplicas(a=[failure("upstream_bad_request", "no such parameter")])
    with pytest.raises(GatewayError) as caught:
        run(dispatcher(registry, replicas).chat("a", CALL))
    assert caught.value.type == "upstream_bad_request" and replicas.calls == ["a"]
    assert caught.value.info.tried is None  # (one endpoint tried: no list)
    assert registry.said("record_failure") == []  # (the caller's fault says nothing of the endpoint's health)


def test_when_every_endpoint_fails_the_last_failure_carries_the_whole_walk():
    registry = FakeRegistry(record("a", "b"), record("b"))
    replicas = FakeReplicas(a=[failure("upstream_auth")], b=[failure("upstream_rate_limited")])
    with pytest.raises(GatewayError) as caught:
        run(dispatcher(registry, replicas).chat("a", CALL))
    assert caught.value.type == "upstream_rate_limited"
    assert [(t["chat_name"], t["type"]) for t in caught.value.info.tried] == [("a", "upstream_auth"),
                                                                              ("b", "upstream_rate_limited")]


def test_the_requests_fallbacks_replace_the_endpoints_and_the_primary_is_not_tried_twice():
    registry = FakeRegistry(record("a", "b"), record("b"), record("c"))
    replicas = FakeReplicas(a=[failure("upstream_error")])
    outcome = run(dispatcher(registry, replicas).chat("a", CALL, fallbacks=["a", "c"]))
    assert replicas.calls == ["a", "c"] and outcome.endpoint.name == "c"


def test_a_fallback_that_is_not_there_is_tried_as_not_found_and_the_walk_goes_on():
    registry = FakeRegistry(record("a", "ghost", "b"), record("b"))
    replicas = FakeReplicas(a=[failure("upstream_error")])
    outcome = run(dispatcher(registry, replicas).chat("a", CALL))
    assert outcome.endpoint.name == "b"
    assert [(t["chat_name"], t["type"]) for t in outcome.tried] == [("a", "upstream_error"), ("ghost", "not_found")]


def test_another_providers_endpoint_is_not_found():
    registry = FakeRegistry(record("a"))
    with pytest.raises(GatewayError) as caught:
        run(dispatcher(registry, FakeReplicas()).chat("a", CALL, provider="zhipu"))
    assert caught.value.type == "not_found" and "/openai/chat" in caught.value.info.message


def test_a_fallback_outside_the_callers_key_is_skipped_as_forbidden():
    registry = FakeRegistry(record("a", "b", "c"), record("b"), record("c"))
    replicas = FakeReplicas(a=[failure("upstream_error")])
    caller = FakeCaller(allowed={"a", "c"})
    outcome = run(dispatcher(registry, replicas).chat("a", CALL, caller=caller))
    assert replicas.calls == ["a", "c"]
    assert [(t["chat_name"], t["type"]) for t in outcome.tried] == [("a", "upstream_error"), ("b", "forbidden")]
    assert caller.admitted == 2  # (each endpoint called costs one call of the key's rate; b was not called)


# -- the bulkhead -------------------------------------------------------------------------------------------------
def test_a_busy_endpoint_moves_on_to_its_fallback_and_its_seat_comes_back():
    registry = FakeRegistry(record("a", "b"), record("b"))
    hold = asyncio.Event()
    replicas = FakeReplicas(a=[hold])
    d = dispatcher(registry, replicas, endpoint_max_in_flight=1)

    async def scenario():
        first = asyncio.ensure_future(d.chat("a", CALL))
        await asyncio.sleep(0.01)  # (the first call holds a's one seat)
        second = await d.chat("a", CALL)
        hold.set()
        return await first, second

    first, second = run(scenario())
    assert first.endpoint.name == "a" and second.endpoint.name == "b"
    assert [(t["chat_name"], t["type"]) for t in second.tried] == [("a", "endpoint_busy")]
    assert d._bulkhead.held() == 0


def test_busy_without_a_fallback_is_503_with_retry_after_and_the_callers_call_is_given_back():
    registry = FakeRegistry(record("a"))
    hold = asyncio.Event()
    d = dispatcher(registry, FakeReplicas(a=[hold]), endpoint_max_in_flight=1)
    caller = FakeCaller()

    async def scenario():
        first = asyncio.ensure_future(d.chat("a", CALL))
        await asyncio.sleep(0.01)
        try:
            await d.chat("a", CALL, caller=caller)
        finally:
            hold.set()
            await first

    with pytest.raises(GatewayError) as caught:
        run(scenario())
    assert caught.value.type == "endpoint_busy" and caught.value.info.retry_after == 1
    assert "already has 1 calls in flight" in caught.value.info.message
    assert caller.refunded == 1 and caller.reservations[0].how == "released"


def test_a_call_waits_in_the_queue_for_a_seat():
    registry = FakeRegistry(record("a", "b"), record("b"))
    hold = asyncio.Event()
    replicas = FakeReplicas(a=[hold])
    d = dispatcher(registry, replicas, endpoint_max_in_flight=1, endpoint_queue=1, endpoint_queue_s=5)

    async def scenario():
        first = asyncio.ensure_future(d.chat("a", CALL))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(d.chat("a", CALL))
        await asyncio.sleep(0.01)
        assert not second.done()  # (waiting for a's seat, not sent to b)
        hold.set()
        return await first, await second

    first, second = run(scenario())
    assert (first.endpoint.name, second.endpoint.name) == ("a", "a") and replicas.calls == ["a", "a"]


# -- cooldowns and probes -----------------------------------------------------------------------------------------
def test_failures_cool_an_endpoint_down_and_a_cooling_endpoint_is_skipped_with_retry_after():
    registry = FakeRegistry(record("a"))
    replicas = FakeReplicas(a=[failure("upstream_error"), failure("upstream_error")])
    d = dispatcher(registry, replicas)

    async def scenario():
        for _ in range(2):
            with pytest.raises(GatewayError):
                await d.chat("a", CALL)
        return await d.chat("a", CALL)

    with pytest.raises(GatewayError) as caught:
        run(scenario())
    assert caught.value.type == "endpoint_not_ready" and "cooling down" in caught.value.info.message
    assert 29 < caught.value.info.retry_after <= 30
    assert replicas.calls == ["a", "a"]  # (the third call was not sent)
    assert [c[2:] for c in registry.said("record_failure")] == [("upstream_error", False)] * 2


def test_an_auth_failure_starts_a_cooldown_at_once():
    registry = FakeRegistry(record("a"))
    d = dispatcher(registry, FakeReplicas(a=[failure("upstream_auth")]))
    with pytest.raises(GatewayError):
        run(d.chat("a", CALL))
    assert registry.said("record_failure") == [("record_failure", "a", "upstream_auth", True)]
    assert registry.records["a"].health.state == "cooling_down"


def due(registry: FakeRegistry, name: str) -> None:
    """``name``'s cooldown is over: the next caller probes it."""
    registry.health(name, Health(state="probe_due", consecutive_failures=2, cooldown_until=time.time() - 1,
                                 last_error="upstream_error", cooldowns=1))


def test_after_a_cooldown_exactly_one_call_probes_and_its_success_ends_the_cooldown():
    registry = FakeRegistry(record("a"))
    due(registry, "a")
    hold = asyncio.Event()
    replicas = FakeReplicas(a=[hold])
    d = dispatcher(registry, replicas)

    async def scenario():
        probe = asyncio.ensure_future(d.chat("a", CALL))
        await asyncio.sleep(0.01)
        others = await asyncio.gather(*(d.chat("a", CALL) for _ in range(3)), return_exceptions=True)
        hold.set()
        outcome = await probe
        await asyncio.sleep(0)  # (the success is sent without waiting for the registry's answer)
        return outcome, others

    outcome, others = run(scenario())
    assert outcome.endpoint.name == "a" and replicas.calls == ["a"]
    assert all(isinstance(e, GatewayError) and "being probed" in e.info.message and e.info.retry_after == 1
               for e in others), others
    assert len(registry.said("claim_probe")) == 4 and registry.said("record_success") == [("record_success", "a")]
    assert registry.records["a"].health.ok and d.known("a").health.ok


def test_a_probe_that_ends_without_an_upstream_verdict_releases_its_lease():
    registry = FakeRegistry(record("a"))
    due(registry, "a")
    replicas = FakeReplicas(a=[failure("upstream_bad_request")])
    d = dispatcher(registry, replicas)
    with pytest.raises(GatewayError) as caught:
        run(d.chat("a", CALL))
    assert caught.value.type == "upstream_bad_request"
    assert registry.said("release_probe") == [("release_probe", "a")] and registry.probing == set()
    assert registry.said("record_failure") == []
    outcome = run(d.chat("a", CALL))  # (the next caller probes it)
    assert outcome.endpoint.name == "a"


def test_a_probe_that_fails_upstream_starts_the_next_cooldown_without_a_release():
    registry = FakeRegistry(record("a"))
    due(registry, "a")
    d = dispatcher(registry, FakeReplicas(a=[failure("upstream_error")]))
    with pytest.raises(GatewayError):
        run(d.chat("a", CALL))
    assert registry.said("release_probe") == [] and len(registry.said("record_failure")) == 1


# -- a caller's limits ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["admit", "reserve"])
def test_a_callers_refusal_ends_the_walk_before_any_seat_or_call(where):
    registry = FakeRegistry(record("a", "b"), record("b"))
    replicas = FakeReplicas()
    refusal = GatewayError("rate_limited" if where == "admit" else "budget_exceeded", "over", retry_after=3)
    caller = FakeCaller(**{where: refusal})
    d = dispatcher(registry, replicas)
    with pytest.raises(GatewayError) as caught:
        run(d.chat("a", CALL, caller=caller))
    assert caught.value.type == refusal.type and replicas.calls == [] and d._bulkhead.held() == 0
    assert caller.refunded == (1 if where == "reserve" else 0)  # (the call admit took, given back)


def test_a_probe_refused_by_the_callers_limits_releases_its_lease():
    registry = FakeRegistry(record("a"))
    due(registry, "a")
    d = dispatcher(registry, FakeReplicas())
    with pytest.raises(GatewayError):
        run(d.chat("a", CALL, caller=FakeCaller(reserve=GatewayError("budget_exceeded", "spent"))))
    assert registry.said("release_probe") == [("release_probe", "a")]


def test_a_reservation_is_given_back_on_a_failure_and_settled_with_the_answers_usage():
    registry = FakeRegistry(record("a", "b"), record("b"))
    caller = FakeCaller()
    outcome = run(dispatcher(registry, FakeReplicas(a=[failure("upstream_error")])).chat("a", CALL, caller=caller))
    assert [r.how for r in caller.reservations] == ["released", "settled"]
    assert caller.reservations[1].usage == outcome.result.usage and caller.settled == [(1, 7)]


# -- how a stream ends ----------------------------------------------------------------------------------------------
async def drain(stream) -> list:
    try:
        return [event async for event in stream]
    finally:
        await stream.aclose()


def test_a_stream_ends_with_its_finish_settles_the_reservation_and_gives_its_seat_back_when_closed():
    registry = FakeRegistry(record("a"))
    caller = FakeCaller()
    d = dispatcher(registry, FakeReplicas())

    async def scenario():
        stream = await d.stream("a", CALL, caller=caller)
        assert d._bulkhead.in_flight("a") == 1  # (a stream holds its seat until it is closed)
        return await drain(stream)

    events = run(scenario())
    assert [type(e).__name__ for e in events] == ["Delta", "Delta", "Finish"]
    assert d._bulkhead.held() == 0 and caller.settled == [(1, 5)]
    held = caller.reservations[0]
    assert held.how == "settled" and held.pieces == 2 and held.usage.total_tokens == 5


def test_a_failure_mid_stream_is_its_end_counts_for_the_cooldown_and_charges_what_was_streamed():
    registry = FakeRegistry(record("a"))
    caller = FakeCaller()
    cut = Failure(ErrorInfo(type="upstream_error", message="reset"))
    d = dispatcher(registry, FakeReplicas(a=[[Delta("a"), cut, Delta("never")]]))
    events = run(drain_of(d, caller))
    assert events[-1] is cut and len(events) == 2
    assert caller.reservations[0].how == "charged_streamed"
    assert registry.said("record_failure") == [("record_failure", "a", "upstream_error", False)]


async def drain_of(d: Dispatcher, caller: Optional[FakeCaller] = None) -> list:
    return await drain(await d.stream("a", CALL, caller=caller))


def test_a_stream_cut_without_finish_or_failure_ends_in_upstream_error():
    registry = FakeRegistry(record("a"))
    d = dispatcher(registry, FakeReplicas(a=[[Delta("a"), Delta("b")]]))
    events = run(drain_of(d))
    assert [type(e).__name__ for e in events] == ["Delta", "Delta", "Failure"]
    assert events[-1].error.type == "upstream_error" and "ended before it finished" in events[-1].error.message
    assert d._bulkhead.held() == 0


def test_a_stream_whose_first_event_is_a_failure_falls_back():
    registry = FakeRegistry(record("a", "b"), record("b"))
    replicas = FakeReplicas(a=[[Failure(ErrorInfo(type="upstream_timeout", message="slow"))]])
    d = dispatcher(registry, replicas)

    async def scenario():
        stream = await d.stream("a", CALL)
        try:
            return stream.endpoint.name, stream.tried
        finally:
            await stream.aclose()

    name, tried = run(scenario())
    assert name == "b" and [t["type"] for t in tried] == ["upstream_timeout"] and replicas.calls == ["a", "b"]


def test_an_abandoned_stream_is_cancelled_charged_what_was_streamed_and_says_nothing_of_health():
    registry = FakeRegistry(record("a"))
    due(registry, "a")
    caller = FakeCaller()
    replicas = FakeReplicas(a=[[Delta("a"), Delta("b"), asyncio.Event(), Finish("stop")]])
    d = dispatcher(registry, replicas)

    async def scenario():
        stream = await d.stream("a", CALL, caller=caller)
        await stream.__anext__()  # (the caller read one event, then left)
        await stream.aclose()
        await stream.aclose()  # (idempotent)
        return stream

    stream = run(scenario())
    assert replicas.streams[0].cancelled == 1 and d._bulkhead.held() == 0
    assert caller.reservations[0].how == "charged_streamed" and caller.settled == []
    assert registry.said("record_failure") == [] and registry.said("record_success") == []
    assert registry.said("release_probe") == [("release_probe", "a")]  # (the probe had no verdict)
    assert run(_rest(stream)) == []  # (a closed stream yields nothing more)


async def _rest(stream) -> list:
    return [event async for event in stream]
