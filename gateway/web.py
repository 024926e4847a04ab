"""HTTP routes: the core routes and one blueprint per provider, in the gateway's own shape.

The chat routes hand their body to ``gateway.chat_flow`` with a renderer of this module
(``/chat``: the full JSON answer; ``/<provider>/chat``: the legacy bare answer); the
OpenAI-compatible routes live in ``gateway.openai_compat``. What every route reads of its
request (services, body, route kind, error shape) is ``gateway.context``.

The chat views (``/chat``, ``/<provider>/chat``, ``/chat/broadcast``, ``/v1/chat/completions``)
are coroutines: ``gateway.front`` runs them on the worker's event loop, with this app's request
context, hooks and error handlers around them; every other route is a plain Flask view, served
in a thread through the WSGI adapter.
"""
from __future__ import annotations

import difflib
import logging
import re
import traceback
import uuid
from typing import Iterable

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from ray.exceptions import RayError
from werkzeug.exceptions import HTTPException

import providers

from . import chat_flow, metrics
from .bodies import legacy_text
from .chat_flow import sse_data
from .context import OPEN, READERS, RequestContext, begin, current, finish, gw, is_admin_route, json_body, render_error
from .dispatch import Outcome, Stream, ray_failure
from .doors import Doors
from contract.errors import GatewayError
from contract.events import Failure, Finish, ToolCallDelta
from .openai_compat import v1
from .schemas import BroadcastRequest, ChatRequest, UndeployRequest, validate
from .ui import ui

log = logging.getLogger("gateway.web")

_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

core = Blueprint("core", __name__)


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
    if isinstance(exc, RayError):
        return render_error(ray_failure(exc))
    # The traceback's places, not its messages: a message could carry user input.
    where = "; ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in traceback.extract_tb(exc.__traceback__)[-4:])
    ctx = current()
    log.error("unhandled %s request_id=%s at %s", type(exc).__name__, ctx.request_id if ctx else None, where)
    return render_error(GatewayError("internal_error", "the gateway failed; see its log"))


# -- core routes ---------------------------------------------------------------
class GatewayRenderer(chat_flow.Renderer):
    """``POST /chat``: the gateway's full JSON answer; streams as ``data: {"delta"}``... events."""

    def answer(self, ask: chat_flow.Ask, outcome: Outcome) -> Response:
        return jsonify(_result_body(ask.ctx, ask.chat_name, outcome))

    def delta(self, ask: chat_flow.Ask, stream: Stream, event) -> str:
        return sse_data({"tool_calls": event.tool_calls} if isinstance(event, ToolCallDelta) else {"delta": event.text})

    def finish(self, ask: chat_flow.Ask, stream: Stream, event: Finish) -> Iterable[str]:
        endpoint = stream.endpoint
        yield sse_data({
            "finish_reason": event.reason, "usage": event.usage.model_dump(),
            "chat_name": ask.chat_name, "served_by": endpoint.name, "provider": endpoint.provider,
            "model": endpoint.record.get("model"), "attempts": event.attempts,
            "tried": stream.tried, "request_id": ask.ctx.request_id,
        })
        yield "data: [DONE]\n\n"

    def failure(self, ask: chat_flow.Ask, err: GatewayError) -> str:
        """An ``event: error`` with the error object (nothing follows it)."""
        return "event: error\n" + sse_data(err.body(ask.ctx.request_id))


class LegacyRenderer(GatewayRenderer):
    """``POST /<provider>/chat``: the answer as a JSON string, or bare text to ``Accept: text/plain``."""

    def answer(self, ask: chat_flow.Ask, outcome: Outcome) -> Response:
        return legacy_text(outcome.result.output) or jsonify(outcome.result.output)


class BroadcastRenderer(chat_flow.BroadcastRenderer):
    """``POST /chat/broadcast``: ``{"results": {chat_name: answer or error}}``; streamed, events that name
    their endpoint (``chat_name``): ``{"delta"}`` / ``{"tool_calls"}`` pieces, then one end per endpoint,
    ``{"finish_reason", "usage", "served_by", "provider", "model", "attempts", "first_token_ms",
    "latency_ms"}`` or ``event: error`` with ``{"error", "latency_ms"}``; ``data: [DONE]`` once every
    endpoint has ended."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}  # (each endpoint's first piece, ms)

    def answer(self, ask: chat_flow.BroadcastAsk, outcomes: dict) -> Response:
        results = {name: outcome.body(None) if isinstance(outcome, GatewayError) else _result_body(ask.ctx, name, outcome)
                   for name, outcome in outcomes.items()}
        return jsonify(results=results, request_id=ask.ctx.request_id)

    def event(self, ask: chat_flow.BroadcastAsk, name: str, event, endpoint, at_ms: float) -> str:
        if isinstance(event, Failure):
            return "event: error\n" + sse_data({"chat_name": name, **GatewayError.from_info(event.error).body(None),
                                                "latency_ms": at_ms})
        if isinstance(event, Finish):
            return sse_data({"chat_name": name, "finish_reason": event.reason, "usage": event.usage.model_dump(),
                             "served_by": endpoint.name, "provider": endpoint.provider,
                             "model": endpoint.record.get("model"), "attempts": event.attempts,
                             "first_token_ms": self.first.get(name, at_ms), "latency_ms": at_ms})
        self.first.setdefault(name, at_ms)
        return sse_data({"chat_name": name, **({"tool_calls": event.tool_calls} if isinstance(event, ToolCallDelta)
                                               else {"delta": event.text})})


def _ask(ctx: RequestContext, data: dict, provider=None) -> chat_flow.Ask:
    req = validate(ChatRequest, data)
    return chat_flow.Ask(ctx, req.chat_name, req.to_call(ctx.request_id), stream=req.stream, fallbacks=req.fallbacks,
                         provider=provider, request=req)


@core.post("/chat")
async def chat():
    ctx = current()
    return await chat_flow.run(_ask(ctx, json_body()), GatewayRenderer())


def _result_body(ctx: RequestContext, chat_name: str, outcome: Outcome) -> dict:
    result, endpoint = outcome.result, outcome.endpoint
    return {
        "chat_name": chat_name,
        "provider": endpoint.provider,
        "model": endpoint.record.get("model"),
        "output": result.output,
        "finish_reason": result.finish_reason,
        "usage": result.usage.model_dump(),
        "attempts": result.attempts,
        "latency_ms": round(ctx.elapsed_ms(), 1),
        "request_id": ctx.request_id,
        "served_by": endpoint.name,
        "tried": outcome.tried,
        **({"tool_calls": result.tool_calls} if result.tool_calls else {}),
    }


@core.get("/metrics")
def prometheus_metrics():
    cluster = gw().cluster
    snapshot = gw().endpoints.list if (cluster.connected and not cluster.lost) else (lambda: [])
    return Response(metrics.render(snapshot), mimetype="text/plain; version=0.0.4")


@core.post("/chat/broadcast")
async def broadcast():
    ctx = current()
    req = validate(BroadcastRequest, json_body())
    ask = chat_flow.BroadcastAsk(ctx, req.chat_names, lambda name: req.to_call(f"{ctx.request_id}.{name}"), stream=req.stream)
    return await chat_flow.run_broadcast(ask, BroadcastRenderer())


@core.get("/deployments")
def deployments():
    traffic = metrics.traffic()
    return jsonify(deployments=[_with_traffic(row, traffic) for row in gw().endpoints.list()])


@core.get("/deployments/<chat_name>")
def deployment(chat_name: str):
    return jsonify(_with_traffic(gw().endpoints.get(chat_name), metrics.traffic()))


def _with_traffic(row: dict, traffic: dict) -> dict:
    """An endpoint's row with what this gateway has served of it (``metrics.traffic``)."""
    return {**row, "traffic": traffic.get(row["chat_name"]) or metrics.no_traffic()}


@core.get("/providers")
def provider_list():
    """The providers and what their deploy takes: each spec's JSON schema (what the console's forms are made of)."""
    out = []
    for name in providers.names():
        provider = providers.get(name)
        out.append({"name": name, "kind": provider.kind, "model_types": list(provider.spec_class.MODEL_TYPES),
                    "schema": provider.spec_class.model_json_schema()})
    return jsonify(providers=out)


@core.get("/healthz")
def healthz():
    """Liveness: 200 while this process can serve; 503 when it should be restarted (see ``Gateway.liveness``)."""
    ok, report = gw().liveness()
    if ok:
        return jsonify(status="ok", **report)
    if not gw().auth.may_read(request.headers.get("Authorization")):  # no Ray address for strangers
        report = {"problem": "this process's Ray node is gone while the cluster answers: restart this process"}
    response = render_error(GatewayError("cluster_unavailable", report.pop("problem"), retry_after=5))
    body = response.get_json()
    body["checks"] = report
    response.set_data(current_app.json.dumps(body))
    return response


#: what /readyz says of why it is not ready to a caller without the admin or metrics token
#: (no Ray address, no versions: those are for operators)
_NOT_READY = {
    "starting": "this gateway process is starting: it connects to the Ray cluster and applies its endpoints file",
    "cluster_unavailable": "the Ray cluster does not answer",
    "version_mismatch": "the gateway's and the Ray cluster's Ray or Python versions differ",
}


@core.get("/readyz")
def readyz():
    """Readiness: 200 or 503 and why; the details (address, versions) only to the admin or metrics token."""
    ok, report = gw().readiness()
    if not gw().auth.may_read(request.headers.get("Authorization")):
        reason = report.get("reason", "cluster_unavailable")
        report = {} if ok else {"reason": reason, "problem": _NOT_READY.get(reason, _NOT_READY["cluster_unavailable"])}
    if ok:
        return jsonify(status="ready", **report)
    err = GatewayError("cluster_unavailable", report.pop("problem"), retry_after=2)
    response = render_error(err)
    body = response.get_json()
    body["checks"] = report
    response.set_data(current_app.json.dumps(body))
    return response


# -- one blueprint per provider -------------------------------------------------
def provider_blueprint(provider: "providers.Provider") -> Blueprint:
    bp = Blueprint(provider.name, __name__, url_prefix=f"/{provider.name}")

    @bp.post("/deploy")
    def deploy():
        spec = validate(provider.spec_class, json_body())
        view = gw().endpoints.deploy(provider, spec)
        body = {"ret": "ok", "chat_name": view["chat_name"], "provider": provider.name,
                "model": spec.model_name, "workers": spec.workers, "status": view["status"]}
        if view.get("unchanged"):  # the same spec (key included) already runs: nothing was redeployed
            body["unchanged"] = True
        if view["status"] == "RUNNING":
            return jsonify(body)
        # Still loading (weights take minutes): 202, and where to watch it.
        body["progress"] = view.get("progress")
        response = jsonify(body)
        response.status_code = 202
        response.headers["Location"] = f"/deployments/{view['chat_name']}"
        response.headers["Retry-After"] = "5"
        return response

    @bp.post("/chat")
    async def chat():
        return await chat_flow.run(_ask(current(), json_body(), provider=provider.name), LegacyRenderer())

    @bp.post("/undeploy")
    def undeploy():
        req = validate(UndeployRequest, json_body())
        return jsonify(gw().endpoints.undeploy(provider, req.chat_name, force=req.force))

    return bp


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
