"""Validated shapes of what comes in: the bodies of the gateway's routes.

``ChatRequest`` is the legacy HTTP body; it is turned into a provider-neutral
``ChatCall`` (``contract.calls``: what a replica receives), and a replica answers a
``ChatResult`` or an ``ErrorInfo``. Other renderings (the OpenAI-compatible API) build
the same ``ChatCall`` and read the same ``ChatResult``.
"""
from __future__ import annotations

import difflib
from typing import Any, Optional

import annotated_types
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator

from contract.calls import CHAT_NAME_RULE, ChatCall, ChatName, Message, SamplingParams
from contract.errors import GatewayError

CONTENT_OR_MESSAGES = ("content or messages is required: give either 'content' (one user message) "
                       "or 'messages' (a list of {\"role\", \"content\"})")

#: what a missing required field takes, said when it is missing
_REQUIRED = {
    "chat_name": "the endpoint's name (GET /v1/models lists the ones you may use)",
    "chat_names": "a list of endpoint names (GET /v1/models lists the ones you may use)",
    "model": "the endpoint's chat_name (GET /v1/models lists them)",
    "model_name": "the provider's model, e.g. gpt-4o-mini",
    "api_key": "the provider's API key (or api_keys: a list of keys)",
    "messages": "a list of {\"role\", \"content\"}",
    "role": "one of system, user, assistant, tool",
}


class CallBody(SamplingParams):
    """A chat route's body: sampling parameters and messages, which ``to_call`` turns into a ``ChatCall``.

    Each route's body (``ChatInput`` here, ``openai_compat.CompletionRequest``) says only how
    its messages read (``call_messages``); the call is made in one place.
    """

    def call_messages(self) -> list["Message"]:
        raise NotImplementedError

    def to_call(self, request_id: str) -> "ChatCall":
        params = SamplingParams(**self.model_dump(include=set(SamplingParams.model_fields)))
        return ChatCall(request_id=request_id, messages=self.call_messages(), params=params)


class ChatInput(CallBody):
    """What to ask: ``content`` (one user message) or ``messages``, plus sampling parameters."""

    content: Optional[str] = Field(None, min_length=1)
    messages: Optional[list[Message]] = None

    @model_validator(mode="after")
    def _one_input(self) -> "ChatInput":
        if self.content is None and self.messages is None:
            raise ValueError(CONTENT_OR_MESSAGES)
        if self.content is not None and self.messages is not None:
            raise ValueError("give either 'content' (one user message) or 'messages' (a list), not both")
        if self.messages is not None and not self.messages:
            raise ValueError("'messages' is empty: give at least one {\"role\": \"user\", \"content\": ...}")
        return self

    def call_messages(self) -> list[Message]:
        return self.messages or [Message(role="user", content=self.content)]


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
    #: every answer as server-sent events, as it comes (each event names its ``chat_name``)
    stream: bool = False

    @model_validator(mode="after")
    def _unique(self) -> "BroadcastRequest":
        if len(set(self.chat_names)) != len(self.chat_names):
            raise ValueError("chat_names lists an endpoint twice: name each once")
        return self


class UndeployRequest(BaseModel):
    """Body of ``POST /<provider>/undeploy``."""

    model_config = ConfigDict(extra="forbid")

    chat_name: ChatName
    #: undeploy even when other endpoints name it as a fallback (it is taken out of their lists)
    force: bool = False


def validate(model: type[BaseModel], data: Any) -> Any:
    """Validate ``data`` or raise ``invalid_request`` naming the fields.

    Pydantic's own messages echo the input; ours never do (it may hold a key).
    """
    if not isinstance(data, dict):
        raise GatewayError("invalid_request", "the body must be a JSON object of fields: {\"name\": value, ...}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_request_from(exc, model, data) from None


def _names(model: type[BaseModel]) -> list[str]:
    """The field names a body may use (aliases included)."""
    out = []
    for name, info in model.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            out += [c for c in alias.choices if isinstance(c, str)]
        else:
            out.append(alias if isinstance(alias, str) else info.alias or name)
    return list(dict.fromkeys(out))


def _only_value(model: Optional[type[BaseModel]], loc: tuple) -> Any:
    """The one value a field accepts when its bounds allow only one (a parameter the gateway refuses)."""
    if model is None or len(loc) != 1 or loc[0] not in model.model_fields:
        return None
    low = high = None
    for meta in model.model_fields[loc[0]].metadata:
        if isinstance(meta, annotated_types.Ge):
            low = meta.ge
        elif isinstance(meta, annotated_types.Le):
            high = meta.le
    return low if low is not None and low == high else None


def _unknown(field: str, known: list[str]) -> str:
    close = difflib.get_close_matches(field, known, n=2, cutoff=0.6)
    if close:
        return f"'{field}' (did you mean {' or '.join(repr(c) for c in close)}?)"
    return f"'{field}'"


def invalid_request_from(exc: ValidationError, model: Optional[type[BaseModel]] = None, data: Any = None) -> GatewayError:
    """``invalid_request`` naming each field, what it takes, and, for a misspelt one, the close names."""
    problems, fields, unknown = [], [], []
    for err in exc.errors(include_input=False, include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            unknown.append(loc)
            continue
        fields.append(loc or "body")
        msg = err["msg"].removeprefix("Value error, ")
        only = _only_value(model, err["loc"])
        if err["type"] == "string_pattern_mismatch" and loc == "chat_name":
            msg = CHAT_NAME_RULE
        elif err["type"] == "missing":
            what = _REQUIRED.get(str(err["loc"][-1]))
            problems.append(f"{loc} is required" + (f": {what}" if what else ""))
            continue
        elif only is not None:
            problems.append(f"{loc} is not supported by this gateway (leave it out, or send {only})")
            continue
        problems.append(f"{loc}: {msg}" if loc else msg)
    if unknown:
        known = _names(model) if model is not None else []
        listed = ", ".join(_unknown(f, known) for f in unknown)
        hint = "" if "did you mean" in listed or not known else f"; the fields are: {', '.join(known)}"
        problems.insert(0, f"unknown field{'s' if len(unknown) > 1 else ''}: {listed}{hint}")
        fields = unknown + fields
    if (model is not None and issubclass(model, ChatInput) and isinstance(data, dict)
            and "content" not in data and "messages" not in data and CONTENT_OR_MESSAGES not in problems):
        # (an unknown field stops pydantic before the check that says so)
        problems.append(CONTENT_OR_MESSAGES)
        fields.append("content")
    return GatewayError("invalid_request", "; ".join(problems), fields=fields)
