"""The one chat flow of every chat route: check → resolve once → dispatch → record → render.

``POST /chat``, ``POST /<provider>/chat`` and ``POST /v1/chat/completions`` differ only in
the body they read and the answer they write. Each validates its body into an ``Ask`` and
calls ``run(ask, renderer)`` with its ``Renderer``; everything between is here, once:

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
   however the response ends (the client hung up: the upstream stream is cancelled).
"""
from __future__ import annotations

import abc
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

from flask import Response, g, stream_with_context

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


def run(ask: Ask, renderer: Renderer) -> Response:
    """Answer ``ask``: see the module docstring."""
    services = gw()
    key = g.client_key
    check_chat_names(key, [ask.chat_name, *(ask.fallbacks or [])])
    primary = services.dispatcher.resolve(ask.chat_name, visible=key and key.allows)  # the one resolve of this call
    g.record.endpoint(primary.name, primary.provider)
    caller = services.limits.caller(key)  # scope on the endpoints' own fallbacks, limits per upstream call
    if ask.stream:
        stream = services.dispatcher.stream(primary, ask.call, provider=ask.provider, fallbacks=ask.fallbacks, caller=caller)
        return _streamed(ask, stream, renderer)
    outcome = services.dispatcher.chat(primary, ask.call, provider=ask.provider, fallbacks=ask.fallbacks, caller=caller)
    result = outcome.result
    g.upstream_ms = result.upstream_ms
    g.record.served(outcome.endpoint.name, outcome.endpoint.provider, result.attempts, result.usage.model_dump(),
                    result.upstream_ms, outcome.tried)
    response = renderer.answer(ask, outcome)
    response.headers.update(renderer.headers(outcome.endpoint))
    return response


def _streamed(ask: Ask, stream: Stream, renderer: Renderer) -> Response:
    """The SSE response; ``stream`` is closed however it ends, even if the body never started.

    (The WSGI server closes the response when the client leaves or the body is done; a
    generator that never ran has no ``finally`` to run.)
    """
    try:
        # The upstream's time to the first event is not the gateway's: the overhead header leaves it out.
        g.upstream_ms = stream.first_upstream_ms
        # A stream's metrics and access-log line are written when it ends, not when it starts.
        g.streaming = True
        record = g.record
        record.first_event_ms = (time.perf_counter() - g.started) * 1000
        record.served(stream.endpoint.name, stream.endpoint.provider, None, None, None, stream.tried)
        response = Response(stream_with_context(_events(ask, stream, renderer, record)), mimetype="text/event-stream",
                            headers={**SSE_HEADERS, **renderer.headers(stream.endpoint)})
    except BaseException:
        stream.close()
        raise
    response.call_on_close(stream.close)
    return response


def _events(ask: Ask, stream: Stream, renderer: Renderer, record) -> Iterator[str]:
    """The SSE loop: every event through the renderer, to exactly one ``finish`` or ``failure``."""
    error_type = None
    try:
        yield from renderer.stream_start(ask, stream)
        for event in stream:
            if isinstance(event, Finish):
                record.attempts, record.usage, record.upstream_ms = event.attempts, event.usage.model_dump(), event.upstream_ms
                yield from renderer.finish(ask, stream, event)
            elif isinstance(event, Failure):
                err = GatewayError.from_info(event.error)
                error_type = err.type
                yield renderer.failure(ask, err)
            else:
                yield renderer.delta(ask, stream, event)
    finally:
        stream.close()
        finish_record(record, 200, error_type)
