"""The gateway's one error model, and its one table of error types.

Every non-2xx answer of the gateway is ``{"error": {"type": ..., "message": ..., ...}}``
(``/v1/`` routes answer the same error in OpenAI's shape). The ``type`` is stable; the
table ``TYPES`` below says, for each type, everything the gateway does with it: the HTTP
status, whether the replica retries it, whether dispatch moves on to the next fallback,
whether it counts towards the endpoint's cooldown, whether the caller caused it, and its
OpenAI ``type``/``code``. Retry (``gateway.retry``), dispatch (``gateway.dispatch``), the
metrics (``gateway.metrics``) and both renderers read it; no other module keeps a list of types.

Where errors come from, and the one form they take::

    provider SDK exception                         raised in a replica, by the SDK
      └─ providers.<name>: an exception-class table ({SDK class: mapper}, most specific
         class first), as httpx maps httpcore's exceptions; a test checks that every
         public exception class of the pinned SDK has an entry
          └─ GatewayError(type, message, **details)  raised anywhere (replica or gateway)
               └─ .info -> ErrorInfo             a plain pydantic value: the only form an
                                                 error takes across the Ray boundary (a
                                                 replica answers it, or yields it in a
                                                 stream's ``Failure`` event)
    Ray exception (a lost replica, a lost cluster)  raised in the gateway by a Serve handle
      └─ gateway.replica_client.ray_failure(...) -> GatewayError (cluster_unavailable, ...)
    HTTP-level problem (no route, wrong method)     raised by Flask/werkzeug
      └─ gateway.web                             -> GatewayError (not_found, ...)
    connection-level problem (a late or oversized   seen by the worker's protocol, before any app code
    head, a slow body, unparsable HTTP, the cap)
      └─ gateway.server                          -> GatewayError (request_timeout, header_too_large, ...)

Messages are written for humans and never contain a key (adapters redact).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, field_serializer


@dataclass(frozen=True)
class ErrorType:
    """What the gateway does with one error type."""

    status: int
    #: retried by the replica next to the upstream (``gateway.retry``; backoff, Retry-After)
    retried: bool = False
    #: dispatch moves on to the endpoint's next fallback (caller errors never do)
    falls_back: bool = False
    #: counts towards the endpoint's cooldown: ``"count"`` (N within a window), ``"at_once"``
    cooldown: Optional[Literal["count", "at_once"]] = None
    #: the caller caused it (its body, the name it asked for, its key, its own limits): the same call fails on
    #: every endpoint. Counted apart from the endpoint's failures (``traffic.caller_errors`` of
    #: ``GET /deployments``, ``fault="caller"`` on ``gateway_requests_total``); see ``fault``
    caller: bool = False
    #: the ``type`` an OpenAI client sees on ``/v1/`` (None: the gateway's own type name)
    openai_type: Optional[str] = None
    #: the ``code`` an OpenAI client sees (None: the provider's code, else the gateway's type)
    openai_code: Optional[str] = None


_INVALID, _PERMISSION = "invalid_request_error", "permission_error"
#: the closed list of error types: a new type is added here, nowhere else
TYPES: dict[str, ErrorType] = {
    # the caller's request
    "invalid_request": ErrorType(400, caller=True, openai_type=_INVALID),
    "content_filter": ErrorType(400, caller=True),
    "upstream_bad_request": ErrorType(400, caller=True),
    #: the provider refused the key at deploy (``verify_key``); at chat time it is ``upstream_auth``
    "invalid_key": ErrorType(400, caller=True),
    "unauthorized": ErrorType(401, caller=True, openai_type="authentication_error"),
    "forbidden": ErrorType(403, caller=True, openai_type=_PERMISSION),
    "host_not_allowed": ErrorType(403, caller=True, openai_type=_PERMISSION),
    "origin_not_allowed": ErrorType(403, caller=True, openai_type=_PERMISSION),
    "not_found": ErrorType(404, caller=True, openai_type=_INVALID, openai_code="model_not_found"),
    "method_not_allowed": ErrorType(405, caller=True),
    "conflict": ErrorType(409, caller=True),
    "payload_too_large": ErrorType(413, caller=True),
    "unsupported_media_type": ErrorType(415, caller=True, openai_type=_INVALID),
    #: a request head, or its body, that did not arrive in time (``gateway.server``: ``GATEWAY_HEADER_TIMEOUT_S``,
    #: ``GATEWAY_BODY_MIN_RATE``)
    "request_timeout": ErrorType(408, caller=True, openai_type=_INVALID),
    #: a request head with too many header fields, or too large (``gateway.server``)
    "header_too_large": ErrorType(431, caller=True, openai_type=_INVALID),
    #: (not the caller's: a model that does not fit, a cluster without GPUs, a replica that died ...)
    "deploy_failed": ErrorType(422),
    "rate_limited": ErrorType(429, caller=True, openai_type="rate_limit_error"),  # the caller's own client-key limit
    #: the caller's client key is over a budget (tokens_per_day, tokens_per_month, spend_per_month: ``gateway.budgets``),
    #: until its reset; OpenAI's code for a spent quota, so that its clients stop rather than retry
    "budget_exceeded": ErrorType(429, caller=True, openai_type="rate_limit_error", openai_code="insufficient_quota"),
    # the upstream provider, after the replica's retries
    "upstream_rate_limited": ErrorType(429, retried=True, falls_back=True, cooldown="count", openai_type="rate_limit_error"),
    "upstream_auth": ErrorType(502, falls_back=True, cooldown="at_once"),
    "upstream_quota": ErrorType(502, falls_back=True, cooldown="at_once"),
    "upstream_error": ErrorType(502, retried=True, falls_back=True, cooldown="count"),
    "upstream_timeout": ErrorType(504, retried=True, falls_back=True, cooldown="count"),
    # the gateway and its cluster
    "internal_error": ErrorType(500),
    "cluster_unavailable": ErrorType(503),
    "endpoint_not_ready": ErrorType(503, falls_back=True),
    "endpoint_busy": ErrorType(503, falls_back=True),
    #: the gateway process holds its most open connections (``GATEWAY_MAX_CONNECTIONS``; ``gateway.server``)
    "server_busy": ErrorType(503),
}

#: type -> HTTP status (a view of ``TYPES``)
STATUS: dict[str, int] = {name: t.status for name, t in TYPES.items()}
#: the types the caller caused (a view of ``TYPES``)
CALLER_ERRORS: frozenset[str] = frozenset(name for name, t in TYPES.items() if t.caller)


def fault(error_type: Optional[str]) -> Literal["none", "caller", "endpoint"]:
    """Whose fault an answer is: ``none`` (``None`` or ``"ok"``: served), ``caller`` (``CALLER_ERRORS``), or
    ``endpoint`` (the provider, the endpoint, its cluster or the gateway failed the call; any other type)."""
    if error_type in (None, "ok"):
        return "none"
    return "caller" if error_type in CALLER_ERRORS else "endpoint"


class ErrorInfo(BaseModel):
    """An error as a plain value: picklable, safe to log, safe to show."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    message: str
    provider: Optional[str] = None
    provider_code: Optional[str] = None
    provider_request_id: Optional[str] = None
    upstream_status: Optional[int] = None
    retry_after: Optional[float] = None
    fields: Optional[list[str]] = None
    attempts: Optional[int] = None
    #: why a deploy failed, a stable code: model_not_found, insufficient_gpus, insufficient_resources,
    #: out_of_gpu_memory, bad_engine_argument, engine_missing, load_error, replica_failed, timeout
    reason: Optional[str] = None
    #: the endpoints tried before giving up, and why (fallbacks)
    tried: Optional[list[dict]] = None
    #: the fingerprint of the endpoint's key (of its key pool) that answered this error, when one did
    key: Optional[str] = None

    @field_serializer("retry_after")
    def _whole_seconds(self, value: Optional[float]) -> Optional[int]:
        """Shown as the ``Retry-After`` header says it: whole seconds, rounded up (kept exact for retries)."""
        return None if value is None else whole_seconds(value)


#: OpenAI's SDKs wait out a Retry-After of up to this and try again; a budget spent for longer tells them not to
_SDK_RETRY_AFTER_S = 60.0


def whole_seconds(seconds: float) -> int:
    """A wait as people and ``Retry-After`` read it: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(seconds))


class GatewayError(Exception):
    """The one exception type of the gateway; see the module docstring."""

    def __init__(self, type: str, message: str, **details: Any) -> None:
        if type not in TYPES:
            raise ValueError(f"unknown error type {type!r}")
        self.info = ErrorInfo(type=type, message=message, **details)
        super().__init__(message)

    @classmethod
    def from_info(cls, info: ErrorInfo) -> "GatewayError":
        err = cls.__new__(cls)
        Exception.__init__(err, info.message)
        err.info = info
        return err

    @property
    def type(self) -> str:
        return self.info.type

    @property
    def kind(self) -> ErrorType:
        """This error's row of ``TYPES``: status, retried, falls back, cooldown, OpenAI type."""
        return TYPES[self.info.type]

    @property
    def status(self) -> int:
        return TYPES[self.info.type].status

    def headers(self) -> dict[str, str]:
        if self.info.retry_after is not None and self.status in (429, 503):
            headers = {"Retry-After": str(whole_seconds(self.info.retry_after))}
            if self.info.type == "budget_exceeded" and self.info.retry_after > _SDK_RETRY_AFTER_S:
                headers["x-should-retry"] = "false"  # (OpenAI's SDKs would retry a spent budget: they read this)
            return headers
        return {}

    def body(self, request_id: Optional[str] = None) -> dict:
        error = self.info.model_dump(exclude_none=True)
        if request_id:
            error["request_id"] = request_id
        return {"error": error}

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"GatewayError({self.info.type!r}, {self.info.message!r})"
