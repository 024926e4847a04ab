"""The call a replica is asked to make and the answer it gives: what crosses the Ray boundary.

The gateway builds a ``ChatCall`` from whatever body it was sent (the legacy ``/chat`` body, OpenAI's
``/v1/chat/completions``); a provider's adapter answers a ``ChatResult`` (or streams the events of
``contract.events``). Provider-neutral, no secrets.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

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
            raise ValueError("a message needs content (or tool_calls)")
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
            raise ValueError("stop takes 1 to 4 strings (or one string)")
        return self


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
    #: the fingerprint of the key that answered (an endpoint's key pool: ``gateway.keypool``), never the key
    key: Optional[str] = None
