"""The gateway's one error model.

Every non-2xx answer of the gateway is ``{"error": {"type": ..., "message": ..., ...}}``.
The ``type`` is stable and decides the HTTP status::

    GatewayError(type, message, **details)        raised anywhere in the gateway process
      └─ .info -> ErrorInfo                       a plain pydantic value; the only form an
                                                  error takes when it crosses the Ray boundary

Provider SDK exceptions never leave a replica: each adapter maps them onto a
``GatewayError`` (see ``providers.base.map_errors``), the replica returns its
``ErrorInfo`` as a value, and the gateway raises it again on its side.
Messages are written for humans and never contain a key (adapters redact).
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict

#: type -> HTTP status. The list is closed: a new type is added here, nowhere else.
STATUS: dict[str, int] = {
    "invalid_request": 400,
    "content_filter": 400,
    "upstream_bad_request": 400,
    #: the provider refused the key at deploy (``verify_key``); at chat time it is ``upstream_auth``
    "invalid_key": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "host_not_allowed": 403,
    "origin_not_allowed": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "conflict": 409,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "deploy_failed": 422,
    "upstream_rate_limited": 429,
    "rate_limited": 429,
    "internal_error": 500,
    "upstream_auth": 502,
    "upstream_quota": 502,
    "upstream_error": 502,
    "cluster_unavailable": 503,
    "endpoint_not_ready": 503,
    "endpoint_busy": 503,
    "upstream_timeout": 504,
}


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


class GatewayError(Exception):
    """The one exception type of the gateway; see the module docstring."""

    def __init__(self, type: str, message: str, **details: Any) -> None:
        if type not in STATUS:
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
    def status(self) -> int:
        return STATUS[self.info.type]

    def headers(self) -> dict[str, str]:
        if self.info.retry_after is not None and self.status in (429, 503):
            return {"Retry-After": str(max(1, int(round(self.info.retry_after))))}
        return {}

    def body(self, request_id: Optional[str] = None) -> dict:
        error = self.info.model_dump(exclude_none=True)
        if request_id:
            error["request_id"] = request_id
        return {"error": error}

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"GatewayError({self.info.type!r}, {self.info.message!r})"
