"""Admin routes of key pools: an endpoint's keys listed, added, reweighted, re-enabled, removed, without a redeploy.

``GET /deployments/<chat_name>/keys``, ``POST /deployments/<chat_name>/keys`` ``{"key", "weight"}``,
``PATCH /deployments/<chat_name>/keys/<fingerprint>`` ``{"weight"}`` and/or ``{"state": "ok"}``,
``DELETE /deployments/<chat_name>/keys/<fingerprint>``. Every answer shows keys as the pool's views
(fingerprint, weight, state, reason, times, calls), never a key. The edits go to the keeper
(``gateway.pool_keeper``); every replica has them within a sync (about a second). A redeploy with a
changed spec replaces the pool with the spec's keys (the states of keys it keeps stay).

Admin only (the admin token; POST and PATCH take JSON bodies only), like deploy and undeploy: ``context.ADMIN``.
"""
from __future__ import annotations

import pickle
from typing import Literal, Optional

from flask import Blueprint, jsonify
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

import providers
from providers.base import indefinite
from providers.keys import key_fingerprint
from providers.specs import SaaSDeploySpec

from .context import gw, json_body
from contract.errors import ErrorInfo, GatewayError
from .schemas import validate

key_pools = Blueprint("key_pools", __name__)


class KeyAdd(BaseModel):
    """Body of ``POST /deployments/<chat_name>/keys``."""

    model_config = ConfigDict(extra="forbid")

    key: SecretStr = Field(min_length=1, max_length=512)
    weight: int = Field(1, ge=0, le=100)


class KeyEdit(BaseModel):
    """Body of ``PATCH /deployments/<chat_name>/keys/<fingerprint>``: a new weight (0 drains it), re-enable it, or both."""

    model_config = ConfigDict(extra="forbid")

    weight: Optional[int] = Field(None, ge=0, le=100)
    state: Optional[Literal["ok"]] = None

    @model_validator(mode="after")
    def _something(self) -> "KeyEdit":
        if self.weight is None and self.state is None:
            raise ValueError('give "weight" (0 to 100; 0 drains the key) and/or "state": "ok" (re-enable it)')
        return self


def _hosted(chat_name: str) -> providers.Provider:
    """The provider of ``chat_name``, a deployed endpoint of a hosted provider (which has keys), or 404."""
    record = gw().endpoints.record(chat_name)
    try:
        provider = providers.get(record.provider)
    except KeyError:
        raise GatewayError("not_found", f"'{chat_name}' is an endpoint of a provider this gateway lacks") from None
    if not issubclass(provider.spec_class, SaaSDeploySpec):
        raise GatewayError("not_found", f"'{chat_name}' is {indefinite(provider.name)} endpoint: it has no keys")
    return provider


def _not_known(chat_name: str) -> GatewayError:
    return GatewayError("cluster_unavailable", f"the key pool of '{chat_name}' is not in the cluster right now (its keeper "
                        f"restarted and no worker of it has synced since, or none runs): try again in a few seconds",
                        retry_after=2)


def _answer(chat_name: str, answer: dict, warning: Optional[str] = None):
    if answer.get("missing"):
        raise _not_known(chat_name)
    if answer.get("error"):
        raise GatewayError.from_info(ErrorInfo(**answer["error"]))
    keys = answer["keys"]
    body = {"ret": "ok", "chat_name": chat_name, "key": answer["key"], "keys": keys}
    if not any(k["weight"] > 0 and k["state"] != "disabled" for k in keys):
        warning = (f"no key of '{chat_name}' is usable now (each is drained or disabled): its calls fail, without "
                   f"asking the provider, until one is" + (f"; {warning}" if warning else ""))
    if warning:
        body["warning"] = warning
    return jsonify(body)


def _edit(chat_name: str, op: str, **args) -> dict:
    return gw().endpoints.key_pools.ask("edit", chat_name, op, **args)


@key_pools.get("/deployments/<chat_name>/keys")
def list_keys(chat_name: str):
    _hosted(chat_name)
    views = gw().endpoints.key_pools.ask("views", [chat_name]).get(chat_name)
    if views is None:
        raise _not_known(chat_name)
    return jsonify(chat_name=chat_name, keys=views)


@key_pools.post("/deployments/<chat_name>/keys")
def add_key(chat_name: str):
    """Add a key: checked first (its form, then the provider's free key check when the endpoint has
    ``verify_key``), refused when the pool has it (or its fingerprint) already."""
    body = validate(KeyAdd, json_body())
    provider = _hosted(chat_name)
    key = body.key.get_secret_value()
    problem = provider.spec_class.key_problem(key)
    if problem:
        raise GatewayError("invalid_request", f"key: {problem}", fields=["key"])
    found = gw().endpoints.key_pools.ask("template", chat_name)
    if found is None:
        raise _not_known(chat_name)
    # (pickled with Ray's cloudpickle, whose ``loads`` is the standard library's: no Ray import here)
    template, fingerprints = pickle.loads(found[0]), found[1]
    if key_fingerprint(key) in fingerprints:
        raise GatewayError("conflict", f"'{chat_name}' has a key with the fingerprint {key_fingerprint(key)} already (the "
                                       f"same key, or one that listings could not tell apart from it)", fields=["key"])
    spec = template.for_key(key)
    warning = None
    if getattr(spec, "verify_key", False):
        try:
            warning = gw().endpoints.check_key(provider, spec)
        except GatewayError as err:
            fields = ["key" if f == "api_key" else f for f in err.info.fields or []] or None
            raise GatewayError.from_info(err.info.model_copy(update={"fields": fields})) from None
    return _answer(chat_name, _edit(chat_name, "add", key=SecretStr(key), weight=body.weight), warning)


@key_pools.patch("/deployments/<chat_name>/keys/<path:fingerprint>")
def edit_key(chat_name: str, fingerprint: str):
    body = validate(KeyEdit, json_body())
    _hosted(chat_name)
    answer: dict = {}
    if body.weight is not None:
        answer = _edit(chat_name, "weight", fingerprint=fingerprint, weight=body.weight)
    if body.state == "ok" and not answer.get("error") and not answer.get("missing"):
        answer = _edit(chat_name, "enable", fingerprint=fingerprint)
    return _answer(chat_name, answer)


@key_pools.delete("/deployments/<chat_name>/keys/<path:fingerprint>")
def remove_key(chat_name: str, fingerprint: str):
    """Remove a key (its replicas stop using it within a sync); the last key of a pool stays (409)."""
    _hosted(chat_name)
    return _answer(chat_name, _edit(chat_name, "remove", fingerprint=fingerprint))
