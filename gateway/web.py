"""The gateway's Flask app put together: the request hooks, the error handlers and the blueprints.

Every request first gets its context (``gateway.context``), then the doors (Host, Origin, an admin
route's Content-Type) and authorization; every answer gets its request id and, for a chat, the
gateway's overhead. Errors of any kind answer in the gateway's shape (``render_error``); a path no
route matches names the close routes. The routes are blueprints: the core routes
(``gateway.core_routes``), one per provider (``gateway.provider_routes``), the OpenAI-compatible
ones (``gateway.openai_compat``), the console, usage and key pools.
"""
from __future__ import annotations

import difflib
import logging
import re
import traceback
import uuid

from flask import Flask, current_app, request
from werkzeug.exceptions import HTTPException

import providers

from .context import OPEN, READERS, begin, current, finish, gw, is_admin_route, render_error
from .core_routes import core
from .replica_client import as_gateway_error
from .doors import Doors
from contract.errors import GatewayError
from .openai_compat import v1
from .provider_routes import provider_blueprint
from .ui import ui

log = logging.getLogger("gateway.web")

_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


# -- request bookkeeping and errors ------------------------------------------
def _before() -> None:
    """The request's context (``gateway.context.RequestContext``): the first thing made of a request."""
    rid = request.headers.get("X-Request-Id", "")
    begin(rid if _SANE_REQUEST_ID.match(rid) else uuid.uuid4().hex,
          request.url_rule.rule if request.url_rule is not None else "_unmatched", request.endpoint)


def _doors_for(app: Flask):
    """Host, Origin and (admin routes) Content-Type, before anything else reads the request."""
    settings = app.extensions["gateway"].settings
    doors = Doors(settings.allowed_hosts, settings.allowed_origins, settings.public_url)

    def check() -> None:
        doors.check(request.headers.get("Host"), request.headers.get("Origin"), request.scheme)
        if request.method in ("POST", "PATCH") and is_admin_route(request.endpoint):
            doors.check_json(request.content_type)

    return check


def _authorize() -> None:
    auth = gw().auth
    endpoint = request.endpoint
    if not (auth.enabled or endpoint in READERS) or endpoint is None or endpoint in OPEN:
        return
    header = request.headers.get("Authorization")
    if endpoint in READERS:
        auth.reader(header)
    elif is_admin_route(endpoint):
        auth.admin(header)
    else:
        current().client_key = auth.client(header)


def _after(response):
    ctx = current()
    response.headers["X-Request-Id"] = ctx.request_id if ctx is not None else ""
    # a browser never guesses another type than the one said (an error's JSON read as HTML, say)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    if ctx is None:
        return response
    if ctx.chat_route:
        response.headers["X-Gateway-Overhead-Ms"] = f"{max(0.0, ctx.elapsed_ms() - (ctx.upstream_ms or 0.0)):.2f}"
    if not ctx.streaming:
        finish(ctx, response.status_code, ctx.error_type)
    return response


_HTTP_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 400: "invalid_request"}


#: the main routes, named when a path matches none
_MAIN_ROUTES = ("POST /chat", "POST /chat/broadcast", "POST /<provider>/deploy|chat|undeploy", "GET /deployments",
                "GET /providers", "GET /ui",
                "POST /v1/chat/completions", "GET /v1/models", "GET /healthz")


def _no_route() -> str:
    """What to call instead of a path no route matches: the providers there are, or the close routes."""
    said = f"no route {request.method} {request.path}"
    parts = request.path.strip("/").split("/")
    names = providers.names()
    if len(parts) == 2 and parts[1] in ("deploy", "chat", "undeploy"):
        close = difflib.get_close_matches(parts[0], names, n=1, cutoff=0.6)
        hint = f" (did you mean POST /{close[0]}/{parts[1]}?)" if close else ""
        return (f"{said}: '{parts[0]}' is not a provider of this gateway{hint}; "
                f"the providers are {', '.join(names)} (POST /<provider>/{parts[1]})")
    paths = sorted({r.rule for r in current_app.url_map.iter_rules() if "<" not in r.rule and r.endpoint != "static"})
    close = difflib.get_close_matches(request.path, paths, n=2, cutoff=0.6)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return f"{said}{hint}; the routes are {', '.join(_MAIN_ROUTES)}, with <provider> one of {', '.join(names)}"


def _http_error(exc: HTTPException):
    kind = _HTTP_TYPES.get(exc.code or 500, "internal_error")
    if kind == "not_found":
        message = _no_route()
    elif kind == "method_not_allowed":
        allowed = [m for m in (getattr(exc, "valid_methods", None) or []) if m not in ("HEAD", "OPTIONS")]
        message = f"{request.method} is not allowed on {request.path}" + (f": use {' or '.join(allowed)}" if allowed else "")
    else:
        message = {
            "payload_too_large": f"the body is larger than {current_app.config['MAX_CONTENT_LENGTH']} bytes: send a "
                                 f"smaller one (the gateway's GATEWAY_MAX_BODY_BYTES sets the limit)",
            "invalid_request": "the request could not be read: send a JSON object (Content-Type: application/json) "
                               "or a form",
            "internal_error": "the gateway failed; see its log (the request_id names the call there)",
        }[kind]
    return render_error(GatewayError(kind, message))


def _unexpected(exc: Exception):
    ray_error = as_gateway_error(exc)
    if ray_error is not None:
        return render_error(ray_error)
    # The traceback's places, not its messages: a message could carry user input.
    where = "; ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in traceback.extract_tb(exc.__traceback__)[-4:])
    ctx = current()
    log.error("unhandled %s request_id=%s at %s", type(exc).__name__, ctx.request_id if ctx else None, where)
    return render_error(GatewayError("internal_error", "the gateway failed; see its log"))


def register_routes(app: Flask) -> None:
    app.before_request(_before)
    app.before_request(_doors_for(app))
    app.before_request(_authorize)
    app.after_request(_after)
    app.register_error_handler(GatewayError, render_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
    app.register_blueprint(core)
    app.register_blueprint(v1)
    app.register_blueprint(ui)
    from .usage import usage  # GET /usage: client keys' usage and budgets (admin)
    app.register_blueprint(usage)
    for name in providers.names():
        app.register_blueprint(provider_blueprint(providers.get(name)))
    from .key_routes import key_pools  # /deployments/<chat_name>/keys: an endpoint's key pool (admin)
    app.register_blueprint(key_pools)
