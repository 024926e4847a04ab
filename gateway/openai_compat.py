"""The OpenAI-compatible rendering: ``/v1/chat/completions`` and ``/v1/models``.

Any OpenAI client (the ``openai`` SDKs, LangChain, Dify's "OpenAI-API-compatible"
provider, curl) uses every endpoint with ``model = chat_name``. The request becomes the
same ``Ask`` and goes through the same chat flow as ``/chat`` (``gateway.chat_flow``:
retries, fallbacks, cooldowns, request ids); only the rendering differs (``OpenAIRenderer``).
Errors raised on these routes take OpenAI's shape (``openai_error_body``, registered for
this blueprint with ``context.error_shape``; the type mapping is ``errors.TYPES``) so
clients raise their usual exception classes.
"""
from __future__ import annotations

import time
from datetime import datetime
from typing import Any, Iterable, Literal, Optional, Union

from flask import Blueprint, Response, jsonify
from pydantic import BaseModel, ConfigDict, Field, model_validator

from . import chat_flow
from .auth import check_chat_names
from .chat_flow import sse_data
from .context import current, error_shape, gw, json_body
from .dispatch import Outcome
from .streams import Stream
from contract.errors import GatewayError
from contract.events import Finish, ToolCallDelta
from contract.calls import ChatName, Message
from .schemas import CallBody, validate

v1 = Blueprint("openai_v1", __name__, url_prefix="/v1")


class CompatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer", "function"]
    content: Optional[Union[str, list[dict[str, Any]]]] = None
    name: Optional[str] = None
    tool_call_id: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None

    def plain(self) -> Message:
        content = self.content
        if isinstance(content, list):  # content parts: text only
            texts = []
            for part in content:
                if part.get("type") != "text":
                    raise GatewayError("invalid_request", f"content parts of type {part.get('type')!r} are not supported by this gateway; "
                                       f"send text parts (type 'text') or a plain string",
                                       fields=["messages"])
                texts.append(str(part.get("text", "")))
            content = "".join(texts)
        role = "tool" if self.role == "function" else self.role
        return Message(role=role, content=content if content is not None or self.tool_calls else "",
                       name=self.name, tool_call_id=self.tool_call_id, tool_calls=self.tool_calls)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class CompletionRequest(CallBody):
    """OpenAI's Chat Completions request; what the gateway cannot honour is refused, not dropped."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ChatName
    messages: list[CompatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = Field(None, ge=1, le=1)
    presence_penalty: Optional[float] = Field(None, ge=0, le=0)
    frequency_penalty: Optional[float] = Field(None, ge=0, le=0)
    parallel_tool_calls: Optional[bool] = None
    #: gateway extension (``extra_body``): fallbacks for this call
    fallbacks: Optional[list[ChatName]] = Field(None, max_length=8)

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        # Clients send explicit nulls for unset options; null means "not given".
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    def call_messages(self) -> list[Message]:
        return [m.plain() for m in self.messages]


def _created(view: dict) -> int:
    try:
        return int(datetime.fromisoformat(view["created_at"]).timestamp())
    except (KeyError, ValueError):
        return 0


def _model_card(view: dict) -> dict:
    """A model card from an endpoint's listing view (``Endpoints.listing``: the public shape, as GET /deployments)."""
    return {"id": view["chat_name"], "object": "model", "created": _created(view), "owned_by": view.get("provider")}


@v1.get("/models")
def list_models():
    key = current().client_key
    cards = [_model_card(r) for r in gw().endpoints.listing() if r.get("provider") and r.get("status") in ("RUNNING", "UPDATING") and (key is None or key.allows(r["chat_name"]))]
    return jsonify(object="list", data=cards)


@v1.get("/models/<model_id>")
def get_model(model_id: str):
    check_chat_names(current().client_key, [model_id])
    return jsonify(_model_card(gw().endpoints.get(model_id)))


class OpenAIRenderer(chat_flow.Renderer):
    """OpenAI's ``chat.completion`` and ``chat.completion.chunk`` shapes; ``X-Served-By`` names who answered.
    A stream's chunks share one ``created``; its end says ``tool_calls`` when tool calls were seen."""

    def __init__(self) -> None:
        self.created = int(time.time())
        self.saw_tools = False

    def headers(self, endpoint) -> dict[str, str]:
        return {"X-Served-By": endpoint.name}

    def answer(self, ask: chat_flow.Ask, outcome: Outcome) -> Response:
        result = outcome.result
        message: dict[str, Any] = {"role": "assistant", "content": result.output if (result.output or not result.tool_calls) else None}
        if result.tool_calls:
            message["tool_calls"] = result.tool_calls
        return jsonify({
            "id": _completion_id(ask),
            "object": "chat.completion",
            "created": self.created,
            "model": ask.chat_name,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": _finish_reason(result.finish_reason, result.tool_calls)}],
            "usage": result.usage.model_dump(),
            "system_fingerprint": None,
        })

    def stream_start(self, ask: chat_flow.Ask, stream: Stream) -> Iterable[str]:
        yield self._chunk(ask, [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])

    def delta(self, ask: chat_flow.Ask, stream: Stream, event) -> str:
        if isinstance(event, ToolCallDelta):
            self.saw_tools = True
            delta = {"tool_calls": [{"index": i, **tc} for i, tc in enumerate(event.tool_calls)]}
        else:
            delta = {"content": event.text}
        return self._chunk(ask, [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])

    def finish(self, ask: chat_flow.Ask, stream: Stream, event: Finish) -> Iterable[str]:
        reason = _finish_reason(event.reason, self.saw_tools)
        yield self._chunk(ask, [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}])
        if _include_usage(ask):
            yield self._chunk(ask, [], event.usage.model_dump())
        yield "data: [DONE]\n\n"

    def failure(self, ask: chat_flow.Ask, err: GatewayError) -> str:
        return sse_data(openai_error_body(err, ask.ctx.request_id))

    def _chunk(self, ask: chat_flow.Ask, choices: list, usage: Any = None) -> str:
        """One ``chat.completion.chunk``; with ``include_usage`` every chunk has ``usage`` (null but the last)."""
        body = {"id": _completion_id(ask), "object": "chat.completion.chunk", "created": self.created,
                "model": ask.chat_name, "system_fingerprint": None, "choices": choices}
        if _include_usage(ask):
            body["usage"] = usage
        return sse_data(body)


def _completion_id(ask: chat_flow.Ask) -> str:
    return "chatcmpl-" + ask.ctx.request_id


def _include_usage(ask: chat_flow.Ask) -> bool:
    options = ask.request.stream_options
    return bool(options and options.include_usage)


@v1.post("/chat/completions")
async def chat_completions():
    ctx = current()
    req = validate(CompletionRequest, json_body())
    ask = chat_flow.Ask(ctx, req.model, req.to_call(ctx.request_id), stream=req.stream, fallbacks=req.fallbacks, request=req)
    return await chat_flow.run(ask, OpenAIRenderer())


def _finish_reason(reason: Optional[str], tool_calls: Any) -> str:
    if tool_calls and reason in (None, "stop"):
        return "tool_calls"
    if reason in ("stop", "length", "tool_calls", "content_filter", "function_call"):
        return reason
    if reason == "sensitive":  # Zhipu's moderation stop
        return "content_filter"
    return "stop"


def openai_error_body(err: GatewayError, request_id: Optional[str]) -> dict:
    """The gateway's error in OpenAI's shape; the gateway's own fields ride along."""
    info, kind = err.info, err.kind
    body = {
        "message": info.message,
        "type": kind.openai_type or info.type,
        "param": (info.fields or [None])[0],
        "code": kind.openai_code or info.provider_code or info.type,
        "gateway_type": info.type,
    }
    if request_id:
        body["request_id"] = request_id
    if info.tried:
        body["tried"] = info.tried
    return {"error": body}


error_shape(v1, openai_error_body)
