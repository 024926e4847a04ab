"""One blueprint per provider: ``POST /<provider>/deploy``, ``/<provider>/chat`` (the legacy bare answer)
and ``/<provider>/undeploy``. A deploy that is still loading answers 202 and where to watch it.
"""
from __future__ import annotations

from flask import Blueprint, jsonify

import providers

from . import chat_flow
from .context import current, gw, json_body
from .core_routes import chat_ask
from .renderers import LegacyRenderer
from .schemas import UndeployRequest, validate


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
        return await chat_flow.run(chat_ask(current(), json_body(), provider=provider.name), LegacyRenderer())

    @bp.post("/undeploy")
    def undeploy():
        req = validate(UndeployRequest, json_body())
        return jsonify(gw().endpoints.undeploy(provider, req.chat_name, force=req.force))

    return bp
