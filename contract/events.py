"""Stream events: the one protocol of a streamed answer, from the adapter to the renderer.

A stream is a sequence of events, the same types at every hop::

    ChatAdapter.stream (providers)   yields   Delta | ToolCallDelta ...  then one Finish
      -> ChatReplica.stream (replica)  yields   the same, and ends with Finish or Failure
         (adds attempts and timings to Finish; the first event carries ``upstream_ms``)
      -> streams.Stream (gateway)      iterates the same, first event included
      -> a renderer (web, openai_compat) writes each as SSE

Rules of the protocol:

- zero or more ``Delta`` (text) and ``ToolCallDelta`` (OpenAI-shaped tool-call pieces), in order;
- then exactly one ``Finish`` (why it ended, usage) or one ``Failure`` (an ``ErrorInfo``), and nothing after;
- an adapter never yields ``Failure``: it raises ``GatewayError``, which the replica turns into
  the ``Failure`` event (after retrying, when nothing was sent yet);
- a stream that stops without either was cut: the gateway ends it with ``upstream_error``.

Events are small slotted dataclasses (they are made per token and pickled across Ray), not
pydantic models.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .errors import ErrorInfo
from .calls import Usage


@dataclass(slots=True)
class Delta:
    """A piece of the answer's text."""

    text: str
    #: set by the replica on a stream's first event: the upstream's time to it (ms), so that
    #: the gateway can tell its own overhead from the upstream's time to first token
    upstream_ms: Optional[float] = None


@dataclass(slots=True)
class ToolCallDelta:
    """Pieces of tool calls, OpenAI's streamed shape: ``[{"index", "id"?, "function": {...}}]``."""

    tool_calls: list[dict[str, Any]]
    upstream_ms: Optional[float] = None


@dataclass(slots=True)
class Finish:
    """The stream's end: why (OpenAI's finish reasons, or the provider's), and the usage."""

    reason: str
    usage: Usage = field(default_factory=Usage)
    #: set by the replica: upstream calls made (retries before the first event included)
    attempts: int = 1
    #: set by the replica: the whole stream's upstream time (ms)
    upstream_ms: Optional[float] = None
    #: set by the replica: the fingerprint of the key that answered (``gateway.keypool``), never the key
    key: Optional[str] = None


@dataclass(slots=True)
class Failure:
    """The stream failed; nothing follows. Made by the replica (or the gateway), never by an adapter."""

    error: ErrorInfo


StreamEvent = Union[Delta, ToolCallDelta, Finish, Failure]
