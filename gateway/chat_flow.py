"""The one chat flow of every chat route: check → resolve once → dispatch → record → render.

``POST /chat``, ``POST /<provider>/chat`` and ``POST /v1/chat/completions`` differ only in
the body they read and the answer they write. Each validates its body into an ``Ask`` and
awaits ``run(ask, renderer)`` with its ``Renderer``; everything between is here, once, on the
worker's event loop (``gateway.front`` runs these views there, never in a thread):

1. the caller's key may use the endpoint and the fallbacks it names (403 otherwise);
2. the endpoint is resolved once (the dispatcher is handed the resolved endpoint) and
   named in the request's metrics;
3. ``Dispatcher.chat`` or ``Dispatcher.stream`` (retries, fallbacks, cooldowns, bulkhead,
   the caller's limits);
4. the request's record: who served, attempts, usage, the upstream's time (so that the
   ``X-Gateway-Overhead-Ms`` header is the gateway's own time: for a stream, its time to
   the first byte less the upstream's time to the first event);
5. the renderer writes the answer, or each stream event as server-sent events. The SSE
   loop is here: a stream always ends with the renderer's ``finish`` or ``failure`` (the
   dispatcher's ``Stream`` turns a cut stream into a ``Failure``), and the stream is closed
   however the response ends (the client hung up: the upstream stream is cancelled). A
   streamed answer is an ``EventStream``: a response whose body ``gateway.front`` writes
   from its async iterator of SSE text, then ``aclose``s.
"""
from __future__ import annotations

import abc
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Optional

from flask import Response, current_app, g

from .auth import check_chat_names
from .context import finish_record, gw
from .dispatch import Endpoint, Outcome, Stream
from .errors import GatewayError
from .events import Delta, Failure, Finish, ToolCallDelta
from .schemas import ChatCall

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Ask:
    """One chat request, whatever the route's body looked like."""

    chat_name: str
    call: ChatCall
    stream: bool = False
    #: endpoints to try after ``chat_name``, instead of its own fallbacks
    fallbacks: Optional[list[str]] = None
    #: the first endpoint must be this provider's (``POST /<provider>/chat``)
    provider: Optional[str] = None
    #: the route's validated body, for its renderer (stream options, ...)
    request: Any = None


class EventStream(Response):
    """A server-sent-events response whose body is ``events`` (SSE text, written by ``gateway.front``
    as it comes); ``aclose`` ends it however the response ends, even if the body never started."""

    def __init__(self, events: AsyncIterator[str], closers: list[Callable[[], Awaitable[None]]],
                 headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(mimetype="text/event-stream", headers={**SSE_HEADERS, **(headers or {})})
        self.events = events
        self._closers = closers

    async def aclose(self) -> None:
        closers, self._closers = self._closers, []
        await self.events.aclose()  # (its ``finally``, if it started)
        for close in closers:
            await close()


class Renderer(abc.ABC):
    """How a route writes answers. One instance per route: what one request needs to remember
    while its stream is written (e.g. whether tool calls were seen) lives in ``flask.g``."""

    @abc.abstractmethod
    def answer(self, ask: Ask, outcome: Outcome) -> Response:
        """The response for a whole answer."""

    def headers(self, endpoint: Endpoint) -> dict[str, str]:
        """Headers of every answer (whole or streamed) that ``endpoint`` served."""
        return {}

    def stream_start(self, ask: Ask, stream: Stream) -> Iterable[str]:
        """SSE text before the first event (e.g. OpenAI's role chunk)."""
        return ()

    @abc.abstractmethod
    def delta(self, ask: Ask, stream: Stream, event: "Delta | ToolCallDelta") -> str:
        """SSE text of one piece of the answer."""

    @abc.abstractmethod
    def finish(self, ask: Ask, stream: Stream, event: Finish) -> Iterable[str]:
        """SSE text of the end (and the terminator)."""

    @abc.abstractmethod
    def failure(self, ask: Ask, err: GatewayError) -> str:
        """SSE text of a failure after the response began (nothing follows it)."""


async def run(ask: Ask, renderer: Renderer) -> Response:
    """Answer ``ask``: see the module docstring."""
    services = gw()
    key = g.client_key
    check_chat_names(key, [ask.chat_name, *(ask.fallbacks or [])])
    primary = await services.dispatcher.resolve(ask.chat_name, visible=key and key.allows)  # the one resolve of this call
    g.record.endpoint(primary.name, primary.provider)
    caller = services.limits.caller(key)  # scope on the endpoints' own fallbacks, limits per upstream call
    if ask.stream:
        stream = await services.dispatcher.stream(primary, ask.call, provider=ask.provider, fallbacks=ask.fallbacks,
                                                  caller=caller)
        return _streamed(ask, stream, renderer)
    outcome = await services.dispatcher.chat(primary, ask.call, provider=ask.provider, fallbacks=ask.fallbacks, caller=caller)
    result = outcome.result
    g.upstream_ms = result.upstream_ms
    g.record.served(outcome.endpoint.name, outcome.endpoint.provider, result.attempts, result.usage.model_dump(),
                    result.upstream_ms, outcome.tried)
    response = renderer.answer(ask, outcome)
    response.headers.update(renderer.headers(outcome.endpoint))
    return response


def _streamed(ask: Ask, stream: Stream, renderer: Renderer) -> EventStream:
    """The SSE response; ``stream`` is closed however it ends, even if the body never started."""
    # The upstream's time to the first event is not the gateway's: the overhead header leaves it out.
    g.upstream_ms = stream.first_upstream_ms
    # A stream's metrics and access-log line are written when it ends, not when it starts.
    g.streaming = True
    record = g.record
    record.first_event_ms = (time.perf_counter() - g.started) * 1000
    record.served(stream.endpoint.name, stream.endpoint.provider, None, None, None, stream.tried)

    async def ended() -> None:
        finish_record(record, 200, None)

    return EventStream(_events(ask, stream, renderer, record), [stream.aclose, ended], renderer.headers(stream.endpoint))


async def _events(ask: Ask, stream: Stream, renderer: Renderer, record) -> AsyncIterator[str]:
    """The SSE loop: every event through the renderer, to exactly one ``finish`` or ``failure``."""
    error_type = None
    try:
        for text in renderer.stream_start(ask, stream):
            yield text
        async for event in stream:
            if isinstance(event, Finish):
                record.attempts, record.usage, record.upstream_ms = event.attempts, event.usage.model_dump(), event.upstream_ms
                for text in renderer.finish(ask, stream, event):
                    yield text
            elif isinstance(event, Failure):
                err = GatewayError.from_info(event.error)
                error_type = err.type
                yield renderer.failure(ask, err)
            else:
                yield renderer.delta(ask, stream, event)
    finally:
        await stream.aclose()
        finish_record(record, 200, error_type)


def run_broadcast_stream(chat_names: list[str], make_call) -> EventStream:
    """``POST /chat/broadcast`` with ``stream``: every endpoint's answer as it comes, in one SSE response.

    Events name their endpoint (``chat_name``): ``{"delta"}`` / ``{"tool_calls"}`` pieces, then
    one end per endpoint, ``{"finish_reason", "usage", "served_by", "provider", "model",
    "attempts", "first_token_ms", "latency_ms"}`` or ``event: error`` with ``{"error",
    "latency_ms"}``; ``data: [DONE]`` once every endpoint has ended. Nothing starts before
    the response does; when the client leaves, every stream is closed.
    """
    services = gw()
    key = g.client_key
    check_chat_names(key, chat_names)
    merged = services.dispatcher.broadcast_stream(chat_names, make_call, caller=services.limits.caller(key))
    g.streaming = True
    record, started = g.record, g.started

    def data(payload: dict) -> str:
        return "data: " + current_app.json.dumps(payload) + "\n\n"

    async def events() -> AsyncIterator[str]:
        first: dict[str, float] = {}
        error_type = None
        try:
            yield ": open\n\n"  # (the headers go out now, whatever the upstreams take)
            async for item in merged:
                if item is None:  # a quiet while: a comment keeps proxies from cutting
                    yield ": keep-alive\n\n"
                    continue
                name, event, endpoint = item
                at = round((time.perf_counter() - started) * 1000, 1)
                if isinstance(event, Failure):
                    error_type = error_type or event.error.type
                    yield "event: error\n" + data({"chat_name": name, **GatewayError.from_info(event.error).body(None),
                                                   "latency_ms": at})
                elif isinstance(event, Finish):
                    yield data({"chat_name": name, "finish_reason": event.reason, "usage": event.usage.model_dump(),
                                "served_by": endpoint.name, "provider": endpoint.provider,
                                "model": endpoint.record.get("model"), "attempts": event.attempts,
                                "first_token_ms": first.get(name, at), "latency_ms": at})
                else:
                    first.setdefault(name, at)
                    yield data({"chat_name": name, **({"tool_calls": event.tool_calls} if isinstance(event, ToolCallDelta)
                                                      else {"delta": event.text})})
            yield "data: [DONE]\n\n"
        finally:
            await merged.aclose()
            finish_record(record, 200, error_type)

    async def ended() -> None:
        await merged.aclose()
        finish_record(record, 200, None)

    return EventStream(events(), [ended])
