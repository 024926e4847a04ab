"""The OpenAI-compatible rendering: ``/v1/chat/completions`` and ``/v1/models``.

Any OpenAI client (the ``openai`` SDKs, LangChain, Dify's "OpenAI-API-compatible"
provider, curl) uses every endpoint with ``model = chat_name``. The request becomes the
same ``ChatCall`` and goes through the same ``Dispatcher`` as ``/chat`` (retries,
fallbacks, cooldowns, request ids); only the rendering differs. Errors take OpenAI's
shape (``web.render_error`` picks it for ``/v1/`` paths) so clients raise their usual
exception classes.
"""
from __future__ import annotations

import time
from datetime import datetime
from typing import Any, Literal, Optional, Union

from flask import Blueprint, Response, current_app, g, jsonify, stream_with_context
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import GatewayError
from .schemas import ChatCall, ChatName, Message, SamplingParams, validate

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


class CompletionRequest(SamplingParams):
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

    def to_call(self, request_id: str) -> ChatCall:
        params = SamplingParams(**self.model_dump(include=set(SamplingParams.model_fields)))
        return ChatCall(request_id=request_id, messages=[m.plain() for m in self.messages], params=params)


def _created(record: dict) -> int:
    try:
        return int(datetime.fromisoformat(record["created_at"]).timestamp())
    except (KeyError, ValueError):
        return 0


def _model_card(record: dict) -> dict:
    return {"id": record["chat_name"], "object": "model", "created": _created(record), "owned_by": record.get("provider")}


@v1.get("/models")
def list_models():
    from .web import gw

    key = g.client_key
    cards = [_model_card(r) for r in gw().endpoints.list() if r.get("provider") and r.get("status") in ("RUNNING", "UPDATING") and (key is None or key.allows(r["chat_name"]))]
    return jsonify(object="list", data=cards)


@v1.get("/models/<model_id>")
def get_model(model_id: str):
    from .web import gw

    from .auth import check_chat_names

    check_chat_names(g.client_key, [model_id])
    return jsonify(_model_card(gw().endpoints.get(model_id)))


@v1.post("/chat/completions")
def chat_completions():
    from .web import gw, json_body

    from .web import closing_stream, note_endpoint, note_served, start_stream_record, stream_ended

    req = validate(CompletionRequest, json_body())
    call = req.to_call(g.request_id)
    dispatcher = gw().dispatcher
    note_endpoint(req.model, req.fallbacks)
    completion_id = "chatcmpl-" + g.request_id
    created = int(time.time())
    caller = gw().limits.caller(g.client_key)  # scope on the endpoint's own fallbacks, limits per upstream call
    if req.stream:
        outcome, rest = dispatcher.stream(req.model, call, fallbacks=req.fallbacks, caller=caller)
        g.upstream_ms = outcome.result.get("first_event_ms") or 0.0
        return closing_stream(rest, lambda: _stream(req, completion_id, created, outcome, rest,
                                                     start_stream_record(outcome), stream_ended))
    outcome = dispatcher.chat(req.model, call, fallbacks=req.fallbacks, caller=caller)
    result = outcome.result
    g.upstream_ms = result.upstream_ms
    note_served(outcome, result.attempts, result.usage.model_dump(), result.upstream_ms)
    message: dict[str, Any] = {"role": "assistant", "content": result.output if (result.output or not result.tool_calls) else None}
    if result.tool_calls:
        message["tool_calls"] = result.tool_calls
    response = jsonify({
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": req.model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": _finish_reason(result.finish_reason, result.tool_calls)}],
        "usage": result.usage.model_dump(),
        "system_fingerprint": None,
    })
    response.headers["X-Served-By"] = outcome.endpoint.name
    return response


def _finish_reason(reason: Optional[str], tool_calls: Any) -> str:
    if tool_calls and reason in (None, "stop"):
        return "tool_calls"
    if reason in ("stop", "length", "tool_calls", "content_filter", "function_call"):
        return reason
    if reason == "sensitive":  # Zhipu's moderation stop
        return "content_filter"
    return "stop"


def _stream(req: CompletionRequest, completion_id: str, created: int, outcome, rest, record, stream_ended):
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    request_id = g.request_id

    def chunk(choices: list, usage: Any = None, with_usage: bool = include_usage) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": req.model,
                "system_fingerprint": None, "choices": choices}
        if with_usage:
            body["usage"] = usage
        return "data: " + current_app.json.dumps(body) + "\n\n"

    def events():
        from .web import finish_record

        event = outcome.result
        saw_tools = False
        error_type = None
        try:
            yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
            while True:
                if "error" in event:
                    err = GatewayError.from_info(event["error"])
                    error_type = err.type
                    yield "data: " + current_app.json.dumps(openai_error_body(err, request_id)) + "\n\n"
                    return
                if "finish_reason" in event:
                    stream_ended(record, event)
                    reason = _finish_reason(event["finish_reason"], saw_tools)
                    yield chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}])
                    if include_usage:
                        yield chunk([], event["usage"], True)
                    yield "data: [DONE]\n\n"
                    return
                if "tool_calls" in event:
                    saw_tools = True
                    deltas = [{"index": i, **tc} for i, tc in enumerate(event["tool_calls"])]
                    yield chunk([{"index": 0, "delta": {"tool_calls": deltas}, "logprobs": None, "finish_reason": None}])
                else:
                    yield chunk([{"index": 0, "delta": {"content": event["delta"]}, "logprobs": None, "finish_reason": None}])
                event = next(rest, None)
                if event is None:
                    err = GatewayError("upstream_error", "the stream ended before it finished; try again")
                    error_type = err.type
                    yield "data: " + current_app.json.dumps(openai_error_body(err, request_id)) + "\n\n"
                    return
        finally:
            rest.close()
            finish_record(record, 200, error_type)

    response = Response(stream_with_context(events()), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.headers["X-Served-By"] = outcome.endpoint.name
    return response


#: gateway error type -> OpenAI's error ``type``
_OPENAI_TYPES = {
    "invalid_request": "invalid_request_error",
    "not_found": "invalid_request_error",
    "unauthorized": "authentication_error",
    "forbidden": "permission_error",
    "host_not_allowed": "permission_error",
    "origin_not_allowed": "permission_error",
    "unsupported_media_type": "invalid_request_error",
    "rate_limited": "rate_limit_error",
    "upstream_rate_limited": "rate_limit_error",
}


def openai_error_body(err: GatewayError, request_id: Optional[str]) -> dict:
    """The gateway's error in OpenAI's shape; the gateway's own fields ride along."""
    info = err.info
    code = "model_not_found" if info.type == "not_found" else (info.provider_code or info.type)
    body = {
        "message": info.message,
        "type": _OPENAI_TYPES.get(info.type, info.type),
        "param": (info.fields or [None])[0],
        "code": code,
        "gateway_type": info.type,
    }
    if request_id:
        body["request_id"] = request_id
    if info.tried:
        body["tried"] = info.tried
    return {"error": body}
