"""The core routes: chat, broadcast, the deployments, the providers, metrics and the health probes.

The chat views (``/chat``, ``/chat/broadcast``, and ``/<provider>/chat`` in ``gateway.provider_routes``)
are coroutines: ``gateway.front`` runs them on the worker's event loop, with this app's request
context, hooks and error handlers around them; every other route is a plain Flask view, served in a
thread through the WSGI adapter. What every route reads of its request (services, body, route kind,
error shape) is ``gateway.context``; how a chat answers, ``gateway.renderers``.
"""
from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify, request

import providers

from . import chat_flow, metrics
from .context import RequestContext, current, gw, json_body, render_error
from contract.errors import GatewayError
from .renderers import BroadcastRenderer, GatewayRenderer
from .schemas import BroadcastRequest, ChatRequest, validate

core = Blueprint("core", __name__)


def chat_ask(ctx: RequestContext, data: dict, provider=None) -> chat_flow.Ask:
    """A chat request's body (``/chat``, ``/<provider>/chat``), checked, as what ``chat_flow`` runs."""
    req = validate(ChatRequest, data)
    return chat_flow.Ask(ctx, req.chat_name, req.to_call(ctx.request_id), stream=req.stream, fallbacks=req.fallbacks,
                         provider=provider, request=req)


@core.post("/chat")
async def chat():
    ctx = current()
    return await chat_flow.run(chat_ask(ctx, json_body()), GatewayRenderer())


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

