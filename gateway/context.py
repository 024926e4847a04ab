"""What every route reads of its request, in one place: the gateway's services, the body,
the kind of route, the request's context, and how its errors are written.

The request's context (``RequestContext``: its id, record, caller's key, ...) is made once by
the first hook (``begin``), filled in by the doors and auth, and passed explicitly from the
view on: ``chat_flow.Ask.ctx``, the renderers, the SSE writer. ``current()`` is the one read of
it from Flask's per-request storage, for what Flask calls without arguments (hooks, error
handlers, the front when a client leaves).

The blueprints (``gateway.core_routes``, ``gateway.provider_routes``, ``gateway.openai_compat``'s
``/v1``) import this module and ``gateway.chat_flow``, never each other.

Error shapes: a blueprint says how its errors are written with ``error_shape(bp, body)``;
``render_error`` writes any ``GatewayError`` raised while a route of that blueprint serves
(in its view, or in the checks before it: doors, auth) in that shape. When no route matched
(a misspelt path, a wrong method) no blueprint serves: the shape is that of the blueprint
whose URL prefix the path is under (``/v1/...``: OpenAI's), else the gateway's own
``{"error": {"type", "message", ...}}``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from flask import Blueprint, after_this_request, current_app, g, jsonify, request

from . import bodies, metrics
from contract.errors import CALLER_ERRORS, GatewayError

#: how a blueprint writes an error: ``(error, request_id) -> body``
ErrorBody = Callable[[GatewayError, Optional[str]], dict]

_SHAPES: dict[str, ErrorBody] = {}
#: (url prefix + "/", shape) of the blueprints that have a prefix: for paths no route matched
_PREFIXES: list[tuple[str, ErrorBody]] = []

#: routes anyone may call; admin routes; readers of /metrics; everything else is a chat (client) route
OPEN = frozenset({"core.healthz", "core.readyz", "ui.index", "ui.asset", "ui.config"})  # (the console's page holds no data)
ADMIN = frozenset({"core.deployments", "core.deployment", "core.provider_list", "key_pools.list_keys", "key_pools.add_key",
                   "key_pools.edit_key", "key_pools.remove_key", "usage.usage_report"})
READERS = frozenset({"core.prometheus_metrics"})


@dataclass(eq=False)
class RequestContext:
    """What one request carries from the doors to the renderer (and its record to the access log)."""

    request_id: str
    #: the request's metrics and access-log line (``finish``)
    record: "metrics.RequestRecord"
    #: a chat route (``is_chat_route``): its answers carry ``X-Gateway-Overhead-Ms``
    chat_route: bool = False
    #: the caller's client key (``gateway.auth``), when client keys are on
    client_key: Any = None
    #: the upstream's part of the time to the answer's first byte (left out of the overhead header)
    upstream_ms: Optional[float] = None
    #: the body's fields (the endpoint a refused chat body names: ``finish``)
    body_fields: Optional[dict] = None
    #: a stream's record is written when it ends, not when its headers go
    streaming: bool = False
    #: the type of the error answered (or, in a stream, of its first failure)
    error_type: Optional[str] = None

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.record.started) * 1000


def begin(request_id: str, route: str, endpoint: Optional[str]) -> RequestContext:
    """The request's context, made by the first hook (``gateway.web``) and kept for ``current``."""
    ctx = RequestContext(request_id, metrics.RequestRecord(route, request_id), chat_route=is_chat_route(endpoint))
    metrics.IN_FLIGHT.labels(route).inc()  # (until ``finish``)
    g.gateway_request = ctx
    return ctx


def current() -> Optional[RequestContext]:
    """This request's context (``None`` only if the first hook never ran)."""
    return g.get("gateway_request")


def gw():
    """The gateway's services for this app (see ``gateway.create_app``)."""
    return current_app.extensions["gateway"]


def is_admin_route(endpoint: Optional[str]) -> bool:
    return endpoint is not None and (endpoint in ADMIN or endpoint.rpartition(".")[2] in ("deploy", "undeploy"))


def is_chat_route(endpoint: Optional[str]) -> bool:
    """``POST /chat``, ``/<provider>/chat`` and ``/v1/chat/completions``: one call to one endpoint, whose
    answers carry ``X-Gateway-Overhead-Ms`` (the gateway's own time on the call)."""
    return endpoint is not None and endpoint.rpartition(".")[2] in ("chat", "chat_completions")


def json_body() -> dict:
    """The body's fields however an old application sent them: charsets, forms, limits (``gateway.bodies``).

    Form bodies only on chat routes: the admin routes take JSON alone (``gateway.doors``).
    A caller whose body was not UTF-8 gets its answers, errors included, in ASCII-only JSON.
    """
    body = bodies.read(bodies.request_bytes(), request.headers.get("Content-Type"),
                       forms=not is_admin_route(request.endpoint))
    if not body.utf8:
        after_this_request(bodies.escape_non_ascii)
    ctx = current()
    if ctx is not None:
        ctx.body_fields = body.data
    return body.data


def finish(ctx: RequestContext, status: int, error_type: Optional[str]) -> None:
    """The request's metrics and access-log line, written once (a stream's when it ends)."""
    record = ctx.record
    if not record.done:
        metrics.IN_FLIGHT.labels(record.route).dec()
        if record.chat_name == metrics.UNKNOWN and error_type in CALLER_ERRORS and error_type != "not_found" \
                and ctx.chat_route:
            _name_the_endpoint(ctx)
        record.finish(status, error_type)


def _name_the_endpoint(ctx: RequestContext) -> None:
    """A chat call refused for the caller's error before its endpoint was resolved (a bad body, a key that may
    not use it) counts on the endpoint its body names, as a caller's error, when this process knows that
    endpoint (it served it before: no lookup while a refusal is written); any other name stays ``_unknown``
    (user input is never a label)."""
    fields = ctx.body_fields or {}
    asked = fields.get("chat_name", fields.get("model"))  # (/v1 names it model)
    endpoint = gw().dispatcher.known(asked) if isinstance(asked, str) else None
    if endpoint is not None:
        ctx.record.endpoint(endpoint.name, endpoint.provider)


def error_shape(blueprint: Blueprint, body: ErrorBody) -> None:
    """Errors raised while a route of ``blueprint`` serves are written with ``body``."""
    _SHAPES[blueprint.name] = body
    if blueprint.url_prefix:
        _PREFIXES.append((blueprint.url_prefix.rstrip("/") + "/", body))


def shape_for(path: str) -> ErrorBody:
    """The error shape of a path no route serves: that of the blueprint whose URL prefix it is under
    (``/v1/...``: OpenAI's), else the gateway's own (also what ``gateway.server`` writes itself)."""
    return next((body for prefix, body in _PREFIXES if path.startswith(prefix)), GatewayError.body)


def _shape() -> ErrorBody:
    if request.blueprint is not None:
        return _SHAPES.get(request.blueprint, GatewayError.body)
    return shape_for(request.path)


def render_error(err: GatewayError):
    """The response for ``err``, in the shape of the blueprint serving the request."""
    ctx = current()
    if ctx is not None:
        ctx.error_type = err.type
        ctx.record.tried = err.info.tried or ctx.record.tried
        ctx.record.attempts = err.info.attempts or ctx.record.attempts
    response = jsonify(_shape()(err, ctx.request_id if ctx is not None else None))
    response.status_code = err.status
    response.headers.update(err.headers())
    return response
