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

``POST /chat/broadcast`` goes through the same steps (``run_broadcast``: check, dispatch to
every endpoint at once, render) and its stream through the same SSE writer (``_sse``).
What a request carries (its id, record, the caller's key) is the ``RequestContext`` made by
the doors (``gateway.context``), passed in ``Ask.ctx`` to the flow and its renderer; a
renderer is made per request, so what it remembers while a stream is written is its own.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Optional, Union

from flask import Response, current_app

from .auth import check_chat_names
from .context import RequestContext, finish, gw
from .dispatch import Outcome
from .endpoint_cache import Endpoint
from .streams import Stream
from contract.errors import GatewayError
from contract.events import Delta, Failure, Finish, ToolCallDelta
from contract.calls import ChatCall

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Ask:
    """One chat request, whatever the route's body looked like."""

    ctx: RequestContext
    chat_name: str
    call: ChatCall
    stream: bool = False
    #: endpoints to try after ``chat_name``, instead of its own fallbacks
    fallbacks: Optional[list[str]] = None
    #: the first endpoint must be this provider's (``POST /<provider>/chat``)
    provider: Optional[str] = None
    #: the route's validated body, for its renderer (stream options, ...)
    request: Any = None


@dataclass
class BroadcastAsk:
    """``POST /chat/broadcast``: one call to every endpoint named, at once."""

    ctx: RequestContext
    chat_names: list[str]
    #: the call for one endpoint (its own request id)
    make_call: Callable[[str], ChatCall]
    stream: bool = False


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
    """How a route writes answers. One instance per request: what it remembers while a stream is
    written (e.g. whether tool calls were seen) is its own."""

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


class BroadcastRenderer(abc.ABC):
    """How ``POST /chat/broadcast`` writes its answers (``gateway.web``)."""

    @abc.abstractmethod
    def answer(self, ask: BroadcastAsk, outcomes: dict[str, Union[Outcome, GatewayError]]) -> Response:
        """Every endpoint's answer (or error), in one response."""

    @abc.abstractmethod
    def event(self, ask: BroadcastAsk, name: str, event: Any, endpoint: Optional[Endpoint], at_ms: float) -> str:
        """SSE text of one endpoint's event (a piece, its end, or its failure)."""


async def run(ask: Ask, renderer: Renderer) -> Response:
    """Answer ``ask``: see the module docstring."""
    ctx, services = ask.ctx, gw()
    key = ctx.client_key
    check_chat_names(key, [ask.chat_name, *(ask.fallbacks or [])])
    primary = await services.dispatcher.resolve(ask.chat_name, visible=key and key.allows)  # the one resolve of this call
    ctx.record.endpoint(primary.name, primary.provider)
    caller = services.limits.caller(key)  # scope on the endpoints' own fallbacks, limits per upstream call
    if ask.stream:
        stream = await services.dispatcher.stream(primary, ask.call, provider=ask.provider, fallbacks=ask.fallbacks,
                                                  caller=caller)
        return _streamed(ask, stream, renderer)
    outcome = await services.dispatcher.chat(primary, ask.call, provider=ask.provider, fallbacks=ask.fallbacks, caller=caller)
    result = outcome.result
    ctx.upstream_ms = result.upstream_ms
    ctx.record.served(outcome.endpoint.name, outcome.endpoint.provider, result.attempts, result.usage.model_dump(),
                      result.upstream_ms, outcome.tried)
    response = renderer.answer(ask, outcome)
    response.headers.update(renderer.headers(outcome.endpoint))
    return response


def _streamed(ask: Ask, stream: Stream, renderer: Renderer) -> EventStream:
    """The SSE response of one endpoint's stream."""
    ctx = ask.ctx
    # The upstream's time to the first event is not the gateway's: the overhead header leaves it out.
    ctx.upstream_ms = stream.first_upstream_ms
    record = ctx.record
    record.first_event_ms = ctx.elapsed_ms()
    record.served(stream.endpoint.name, stream.endpoint.provider, None, None, None, stream.tried)
    return _sse(ctx, _events(ask, stream, renderer), stream.aclose, renderer.headers(stream.endpoint))


async def _events(ask: Ask, stream: Stream, renderer: Renderer) -> AsyncIterator[str]:
    """Every event through the renderer, to exactly one ``finish`` or ``failure``."""
    record = ask.ctx.record
    for text in renderer.stream_start(ask, stream):
        yield text
    async for event in stream:
        if isinstance(event, Finish):
            record.attempts, record.usage, record.upstream_ms = event.attempts, event.usage.model_dump(), event.upstream_ms
            for text in renderer.finish(ask, stream, event):
                yield text
        elif isinstance(event, Failure):
            err = GatewayError.from_info(event.error)
            ask.ctx.error_type = ask.ctx.error_type or err.type
            yield renderer.failure(ask, err)
        else:
            yield renderer.delta(ask, stream, event)


def _sse(ctx: RequestContext, events: AsyncIterator[str], close: Callable[[], Awaitable[None]],
         headers: Optional[dict[str, str]] = None) -> EventStream:
    """The one SSE writer of every streamed route: ``events`` as they come; when the response ends,
    however it ends (``EventStream.aclose``, which ``gateway.front`` always awaits; even if the body
    never started), ``close`` (the dispatcher's stream or streams: a client that hung up cancels
    the upstream) and the request's record is written."""
    ctx.streaming = True  # (its metrics and access-log line are written when it ends, not when it starts)

    async def ended() -> None:
        await close()
        finish(ctx, 200, ctx.error_type)

    return EventStream(events, [ended], headers)


async def run_broadcast(ask: BroadcastAsk, renderer: BroadcastRenderer) -> Response:
    """``POST /chat/broadcast``: every endpoint named, at once, each call costing one of the caller's calls.

    Whole: one response once every endpoint has answered or failed. Streamed: every endpoint's
    events as they come, through the same SSE writer; a comment while all are quiet (proxies
    cut silent streams); nothing starts before the response does; when the client leaves,
    every stream is closed.
    """
    ctx, services = ask.ctx, gw()
    check_chat_names(ctx.client_key, ask.chat_names)
    caller = services.limits.caller(ctx.client_key)
    if not ask.stream:
        return renderer.answer(ask, await services.dispatcher.broadcast(ask.chat_names, ask.make_call, caller=caller))
    merged = services.dispatcher.broadcast_stream(ask.chat_names, ask.make_call, caller=caller)

    async def events() -> AsyncIterator[str]:
        yield ": open\n\n"  # (the headers go out now, whatever the upstreams take)
        async for item in merged:
            if item is None:  # a quiet while: a comment keeps proxies from cutting
                yield ": keep-alive\n\n"
                continue
            name, event, endpoint = item
            if isinstance(event, Failure):
                ctx.error_type = ctx.error_type or event.error.type
            yield renderer.event(ask, name, event, endpoint, round(ctx.elapsed_ms(), 1))
        yield "data: [DONE]\n\n"

    return _sse(ctx, events(), merged.aclose)


def sse_data(payload: Any) -> str:
    """One ``data:`` event of JSON."""
    return "data: " + current_app.json.dumps(payload) + "\n\n"
