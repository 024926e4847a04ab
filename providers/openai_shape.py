"""Reading OpenAI-shaped answers (the ``openai`` and ``zhipuai`` SDKs, relays): a whole completion, a stream.

Shared by the providers whose upstream answers in OpenAI's shape (``providers.openai_wire``,
``providers.zhipu_provider``); ``end_event`` is how every adapter's stream ends (``ChatAdapter``).
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import ValidationError

from contract.calls import ChatResult, Usage
from contract.errors import GatewayError
from contract.events import Delta, Finish, StreamEvent, ToolCallDelta


def usage_of(usage: Any) -> Usage:
    """An OpenAI-shaped usage object (openai and zhipuai SDKs) in the gateway's shape."""
    return Usage(prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                 completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
                 total_tokens=getattr(usage, "total_tokens", 0) or 0)


def completion_result(data: Any, request_id: Optional[str]) -> ChatResult:
    """An OpenAI-shaped ``chat.completion`` as the wire has it (JSON) as a ``ChatResult``.

    SDK objects (zhipuai) come here as ``model_dump(exclude_none=True)``.
    """
    try:
        if not data["choices"]:
            raise GatewayError("upstream_error", "the provider answered without choices")
        choice = data["choices"][0]
        message = choice["message"]
        usage = data.get("usage") or {}
        return ChatResult(
            output=message.get("content") or "",
            tool_calls=message.get("tool_calls") or None,
            finish_reason=choice.get("finish_reason"),
            usage=Usage(prompt_tokens=usage.get("prompt_tokens") or 0, completion_tokens=usage.get("completion_tokens") or 0,
                        total_tokens=usage.get("total_tokens") or 0),
            upstream_model=data.get("model"),
            provider_request_id=request_id,
        )
    except (KeyError, IndexError, TypeError, AttributeError, ValidationError):
        raise GatewayError("upstream_error", "the provider's answer was malformed") from None


class ChunkReader:
    """Reads an OpenAI-shaped stream (the openai and zhipuai SDKs' chunks): ``events(chunk)`` for each
    chunk as it comes, then ``end()``, the stream's ``Finish`` with the usage its chunks carried."""

    def __init__(self) -> None:
        self.finish: Optional[str] = None
        self.usage = Usage()

    def events(self, chunk: Any) -> list[StreamEvent]:
        if chunk.usage:
            self.usage = usage_of(chunk.usage)
        events: list[StreamEvent] = []
        for choice in chunk.choices:
            if choice.delta and choice.delta.content:
                events.append(Delta(choice.delta.content))
            if choice.delta and choice.delta.tool_calls:
                events.append(ToolCallDelta([tc.model_dump(exclude_none=True) for tc in choice.delta.tool_calls]))
            if choice.finish_reason:
                self.finish = choice.finish_reason
        return events

    def end(self) -> Finish:
        return end_event(self.finish, self.usage)


def end_event(finish_reason: Optional[str], usage: Usage) -> Finish:
    """The last event of a stream; a stream that never said why it ended was cut."""
    if not finish_reason:
        raise GatewayError("upstream_error", "the provider's stream ended before it finished")
    return Finish(finish_reason, usage)
