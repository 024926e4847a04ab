"""Validated shapes of what comes in and what crosses the Ray boundary.

``ChatRequest`` is the legacy HTTP body; it is turned into a provider-neutral
``ChatCall`` (what a replica receives), and a replica answers a ``ChatResult``
or an ``errors.ErrorInfo``. Other renderings (the OpenAI-compatible API) build
the same ``ChatCall`` and read the same ``ChatResult``.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from .errors import GatewayError

ChatName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")]

CHAT_NAME_RULE = "1-64 letters, digits, '_', '-' or '.', starting with a letter or digit"


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Optional[str] = None
    name: Optional[str] = None
    tool_call_id: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None

    @model_validator(mode="after")
    def _has_content(self) -> "Message":
        if self.content is None and not self.tool_calls:
            raise ValueError("a message needs content")
        return self


class SamplingParams(BaseModel):
    """Generation parameters, in OpenAI's names and ranges; adapters translate them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    max_tokens: Optional[int] = Field(None, ge=1, le=1_000_000)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=1_000_000)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**63 - 1)  # what providers take (int64)
    user: Optional[str] = Field(None, max_length=256)
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[dict[str, Any]]] = Field(None, max_length=128)
    tool_choice: Optional[Union[str, dict[str, Any]]] = None

    def given(self) -> set[str]:
        """The parameters the caller set (what a provider must support)."""
        return {k for k, v in self.model_dump(include=set(SamplingParams.model_fields)).items() if v is not None}

    def max_output(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens

    @model_validator(mode="after")
    def _stop_list(self) -> "SamplingParams":
        if isinstance(self.stop, list) and not 1 <= len(self.stop) <= 4:
            raise ValueError("stop takes 1 to 4 strings")
        return self


class ChatInput(SamplingParams):
    """What to ask: ``content`` (one user message) or ``messages``, plus sampling parameters."""

    content: Optional[str] = Field(None, min_length=1)
    messages: Optional[list[Message]] = None

    @model_validator(mode="after")
    def _one_input(self) -> "ChatInput":
        if (self.content is None) == (self.messages is None):
            raise ValueError("give either 'content' (one user message) or 'messages' (a list)")
        if self.messages is not None and not self.messages:
            raise ValueError("'messages' is empty")
        return self

    def to_call(self, request_id: str) -> "ChatCall":
        messages = self.messages or [Message(role="user", content=self.content)]
        params = SamplingParams(**self.model_dump(include=set(SamplingParams.model_fields)))
        return ChatCall(request_id=request_id, messages=messages, params=params)


class ChatRequest(ChatInput):
    """Body of ``POST /chat`` and ``POST /<provider>/chat``."""

    chat_name: ChatName
    #: answer ``text/event-stream`` instead of one JSON answer
    stream: bool = False
    #: other endpoints to try, in order, instead of the endpoint's own ``fallbacks``
    fallbacks: Optional[list[ChatName]] = Field(None, max_length=8)


class BroadcastRequest(ChatInput):
    """Body of ``POST /chat/broadcast``: the same question to several endpoints at once."""

    chat_names: list[ChatName] = Field(min_length=1, max_length=16)

    @model_validator(mode="after")
    def _unique(self) -> "BroadcastRequest":
        if len(set(self.chat_names)) != len(self.chat_names):
            raise ValueError("chat_names lists an endpoint twice")
        return self


class UndeployRequest(BaseModel):
    """Body of ``POST /<provider>/undeploy``."""

    model_config = ConfigDict(extra="forbid")

    chat_name: ChatName
    #: undeploy even when other endpoints name it as a fallback (it is taken out of their lists)
    force: bool = False


class ChatCall(BaseModel):
    """What a replica is asked to do: provider-neutral, no secrets."""

    model_config = ConfigDict(frozen=True)

    request_id: str
    messages: list[Message]
    params: SamplingParams = SamplingParams()


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatResult(BaseModel):
    """A replica's answer, in the gateway's one shape whatever the provider."""

    output: str
    #: OpenAI's shape: ``[{"id", "type": "function", "function": {"name", "arguments"}}]``
    tool_calls: Optional[list[dict[str, Any]]] = None
    finish_reason: Optional[str] = None
    usage: Usage = Usage()
    upstream_model: Optional[str] = None
    provider_request_id: Optional[str] = None
    attempts: int = 1
    upstream_ms: float = 0.0


def validate(model: type[BaseModel], data: Any) -> Any:
    """Validate ``data`` or raise ``invalid_request`` naming the fields.

    Pydantic's own messages echo the input; ours never do (it may hold a key).
    """
    if not isinstance(data, dict):
        raise GatewayError("invalid_request", "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_request_from(exc) from None


def invalid_request_from(exc: ValidationError) -> GatewayError:
    problems, fields, unknown = [], [], []
    for err in exc.errors(include_input=False, include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            unknown.append(loc)
            continue
        fields.append(loc or "body")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "string_pattern_mismatch" and loc == "chat_name":
            msg = CHAT_NAME_RULE
        problems.append(f"{loc}: {msg}" if loc else msg)
    if unknown:
        problems.insert(0, "unknown field(s): " + ", ".join(unknown))
        fields = unknown + fields
    return GatewayError("invalid_request", "; ".join(problems), fields=fields)
