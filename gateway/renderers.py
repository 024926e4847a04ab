"""How the gateway's own chat routes write their answers (``gateway.chat_flow`` calls them).

``POST /chat``: the full JSON answer, or ``data: {"delta"}``... events; ``POST /<provider>/chat``: the
legacy bare answer; ``POST /chat/broadcast``: every endpoint's answer or error, by name. The
OpenAI-compatible shape is ``gateway.openai_compat``'s.
"""
from __future__ import annotations

from typing import Iterable

from flask import Response, jsonify

from . import chat_flow
from .bodies import legacy_text
from .chat_flow import sse_data
from .context import RequestContext
from .dispatch import Outcome
from .streams import Stream
from contract.errors import GatewayError
from contract.events import Failure, Finish, ToolCallDelta


class GatewayRenderer(chat_flow.Renderer):
    """``POST /chat``: the gateway's full JSON answer; streams as ``data: {"delta"}``... events."""

    def answer(self, ask: chat_flow.Ask, outcome: Outcome) -> Response:
        return jsonify(_result_body(ask.ctx, ask.chat_name, outcome))

    def delta(self, ask: chat_flow.Ask, stream: Stream, event) -> str:
        return sse_data({"tool_calls": event.tool_calls} if isinstance(event, ToolCallDelta) else {"delta": event.text})

    def finish(self, ask: chat_flow.Ask, stream: Stream, event: Finish) -> Iterable[str]:
        endpoint = stream.endpoint
        yield sse_data({
            "finish_reason": event.reason, "usage": event.usage.model_dump(),
            "chat_name": ask.chat_name, "served_by": endpoint.name, "provider": endpoint.provider,
            "model": endpoint.record.spec.get("model"), "attempts": event.attempts,
            "tried": stream.tried, "request_id": ask.ctx.request_id,
        })
        yield "data: [DONE]\n\n"

    def failure(self, ask: chat_flow.Ask, err: GatewayError) -> str:
        """An ``event: error`` with the error object (nothing follows it)."""
        return "event: error\n" + sse_data(err.body(ask.ctx.request_id))


class LegacyRenderer(GatewayRenderer):
    """``POST /<provider>/chat``: the answer as a JSON string, or bare text to ``Accept: text/plain``."""

    def answer(self, ask: chat_flow.Ask, outcome: Outcome) -> Response:
        return legacy_text(outcome.result.output) or jsonify(outcome.result.output)


class BroadcastRenderer(chat_flow.BroadcastRenderer):
    """``POST /chat/broadcast``: ``{"results": {chat_name: answer or error}}``; streamed, events that name
    their endpoint (``chat_name``): ``{"delta"}`` / ``{"tool_calls"}`` pieces, then one end per endpoint,
    ``{"finish_reason", "usage", "served_by", "provider", "model", "attempts", "first_token_ms",
    "latency_ms"}`` or ``event: error`` with ``{"error", "latency_ms"}``; ``data: [DONE]`` once every
    endpoint has ended."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}  # (each endpoint's first piece, ms)

    def answer(self, ask: chat_flow.BroadcastAsk, outcomes: dict) -> Response:
        results = {name: outcome.body(None) if isinstance(outcome, GatewayError) else _result_body(ask.ctx, name, outcome)
                   for name, outcome in outcomes.items()}
        return jsonify(results=results, request_id=ask.ctx.request_id)

    def event(self, ask: chat_flow.BroadcastAsk, name: str, event, endpoint, at_ms: float) -> str:
        if isinstance(event, Failure):
            return "event: error\n" + sse_data({"chat_name": name, **GatewayError.from_info(event.error).body(None),
                                                "latency_ms": at_ms})
        if isinstance(event, Finish):
            return sse_data({"chat_name": name, "finish_reason": event.reason, "usage": event.usage.model_dump(),
                             "served_by": endpoint.name, "provider": endpoint.provider,
                             "model": endpoint.record.spec.get("model"), "attempts": event.attempts,
                             "first_token_ms": self.first.get(name, at_ms), "latency_ms": at_ms})
        self.first.setdefault(name, at_ms)
        return sse_data({"chat_name": name, **({"tool_calls": event.tool_calls} if isinstance(event, ToolCallDelta)
                                               else {"delta": event.text})})


def _result_body(ctx: RequestContext, chat_name: str, outcome: Outcome) -> dict:
    result, endpoint = outcome.result, outcome.endpoint
    return {
        "chat_name": chat_name,
        "provider": endpoint.provider,
        "model": endpoint.record.spec.get("model"),
        "output": result.output,
        "finish_reason": result.finish_reason,
        "usage": result.usage.model_dump(),
        "attempts": result.attempts,
        "latency_ms": round(ctx.elapsed_ms(), 1),
        "request_id": ctx.request_id,
        "served_by": endpoint.name,
        "tried": outcome.tried,
        **({"tool_calls": result.tool_calls} if result.tool_calls else {}),
    }

