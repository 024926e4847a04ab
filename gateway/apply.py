"""Declarative endpoints: apply ``deploy/endpoints.yaml`` (idempotent, reported per endpoint).

The file names each endpoint's provider, model, workers, fallbacks and *the name of the
environment variable* that holds its key, never the key::

    endpoints:
      - chat_name: openai_chat
        provider: openai
        model_name: gpt-4o-mini
        api_key_env: OPENAI_API_KEY
        workers: 2
        fallbacks: [zhipu_chat]
      - chat_name: openai_pool           # a key pool: one variable per key (a weight each, if you like)
        provider: openai
        model_name: gpt-4o-mini
        api_keys_env: [OPENAI_KEY_1, {env: OPENAI_KEY_2, weight: 3}]

The gateway applies it on start (``GATEWAY_ENDPOINTS_FILE``) and again after the cluster
was restarted; ``python -m gateway apply FILE`` does the same against a running gateway.
An endpoint whose key variable is missing, or whose deploy fails, is reported and the
others are still deployed. Fallback targets are deployed before the endpoints naming them.
Every entry is sent as a deploy; the gateway answers ``"unchanged": true`` for an endpoint
that already runs that spec with that key (only it can compute the keyed digest). Keys
travel in those deploys, so ``apply_over_http`` refuses plain HTTP beyond this machine.
"""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit
from typing import Annotated, Any, Callable, Mapping, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

import providers

from .doors import is_loopback_host
from contract.errors import STATUS, GatewayError
from contract.calls import ChatName
from .schemas import invalid_request_from


_VARIABLE = r"^[A-Za-z_][A-Za-z0-9_]*$"


class PoolKeyVariable(BaseModel):
    """One key of a pool in an endpoints file: the variable that holds it, and its weight."""

    model_config = ConfigDict(extra="forbid")

    env: str = Field(pattern=_VARIABLE)
    weight: int = Field(1, ge=0, le=100)


class EndpointEntry(BaseModel):
    model_config = ConfigDict(extra="allow")

    chat_name: ChatName
    provider: str
    api_key_env: Optional[str] = Field(None, pattern=_VARIABLE)
    #: a key pool (``api_keys``): the variables of its keys, each a name or ``{env, weight}``
    api_keys_env: Optional[list[Union[Annotated[str, Field(pattern=_VARIABLE)], PoolKeyVariable]]] = Field(
        None, min_length=1, max_length=32)

    @model_validator(mode="after")
    def _one_key_source(self) -> "EndpointEntry":
        if self.api_key_env and self.api_keys_env:
            raise ValueError("give api_key_env (one key) or api_keys_env (a pool), not both")
        return self

    def variables(self) -> list[PoolKeyVariable]:
        """The variables this entry's keys are in (one for ``api_key_env``)."""
        if self.api_key_env:
            return [PoolKeyVariable(env=self.api_key_env)]
        return [v if isinstance(v, PoolKeyVariable) else PoolKeyVariable(env=v) for v in self.api_keys_env or ()]

    def body(self, env: Mapping[str, str]) -> dict[str, Any]:
        """The deploy body: the entry's fields, with the keys read from their variables."""
        body = {k: v for k, v in self.model_dump().items() if k not in ("provider", "api_key_env", "api_keys_env")}
        field = "api_keys_env" if self.api_keys_env else "api_key_env"
        keys = []
        for variable in self.variables():
            key = env.get(variable.env, "")
            if not key:
                raise GatewayError("invalid_request", f"environment variable {variable.env} is not set: set it in the "
                                   f"gateway's environment, or name another in {field}", fields=[field])
            keys.append(key)
        if self.api_key_env:
            body["api_key"] = keys[0]
        elif keys:
            body["api_keys"] = [{"key": key, "weight": v.weight} for key, v in zip(keys, self.variables())]
        return body


def load(path: str) -> list[EndpointEntry]:
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SystemExit(f"cannot read endpoints file {path}: {exc}") from None
    items = raw.get("endpoints") if isinstance(raw, dict) else None
    if not isinstance(items, list):
        raise SystemExit(f"{path}: expected a top-level 'endpoints:' list")
    entries = []
    for i, item in enumerate(items):
        try:
            entries.append(EndpointEntry.model_validate(item))
        except ValidationError as exc:
            raise SystemExit(f"{path}: endpoint #{i + 1}: {invalid_request_from(exc).info.message}") from None
    names = [e.chat_name for e in entries]
    if len(set(names)) != len(names):
        raise SystemExit(f"{path}: a chat_name appears twice")
    return entries


def key_variables(path: Optional[str]) -> set[str]:
    """The environment variables an endpoints file names as provider keys (``api_key_env``);
    nothing when there is no file or it cannot be read (the start reports that on its own)."""
    if not path:
        return set()
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return set()
    items = raw.get("endpoints") if isinstance(raw, dict) else None
    names: set[str] = set()
    for item in items or []:
        if not isinstance(item, dict):
            continue
        if item.get("api_key_env"):
            names.add(str(item["api_key_env"]))
        for variable in item.get("api_keys_env") or [] if isinstance(item.get("api_keys_env"), list) else []:
            name = variable.get("env") if isinstance(variable, dict) else variable
            if name:
                names.add(str(name))
    return names


def ordered(entries: list[EndpointEntry]) -> list[EndpointEntry]:
    """Fallback targets first (entries in a cycle keep file order and fail at deploy)."""
    by_name = {e.chat_name: e for e in entries}
    done: list = []
    visiting: set = set()

    def visit(entry) -> None:
        if entry in done or entry.chat_name in visiting:
            return
        visiting.add(entry.chat_name)
        for target in (entry.model_extra or {}).get("fallbacks") or []:
            if target in by_name:
                visit(by_name[target])
        visiting.discard(entry.chat_name)
        done.append(entry)

    for entry in entries:
        visit(entry)
    return done


def plan(entries: list[EndpointEntry], env: Mapping[str, str]) -> list[tuple[EndpointEntry, Any]]:
    """``(entry, spec or GatewayError)`` in deploy order."""
    out = []
    for entry in ordered(entries):
        try:
            try:
                provider = providers.get(entry.provider)
            except KeyError:
                raise GatewayError("invalid_request", f"unknown provider {entry.provider!r}; one of {providers.names()}") from None
            body = entry.body(env)
            try:
                spec = provider.spec_class.model_validate(body)
            except ValidationError as exc:
                raise invalid_request_from(exc) from None
            out.append((entry, spec))
        except GatewayError as err:
            out.append((entry, err))
    return out


def apply(entries: list[EndpointEntry], env: Mapping[str, str], current: Callable[[str], Optional[dict]],
          deploy: Callable[[str, Any], dict]) -> list[dict]:
    """Deploy every entry; one report per endpoint.

    ``deploy(provider, spec)`` answers the gateway's deploy answer: its ``status``, and
    ``unchanged`` when the endpoint already ran that spec (nothing was redeployed).
    ``current(chat_name)`` (the endpoint's row, or None) only tells "updated" from "deployed".
    """
    reports = []
    for entry, spec in plan(entries, env):
        report = {"chat_name": entry.chat_name, "provider": entry.provider}
        if isinstance(spec, GatewayError):
            reports.append({**report, "status": "error", "error": spec.info.type, "message": spec.info.message})
            continue
        existing = current(entry.chat_name)
        try:
            answer = deploy(entry.provider, spec)
        except GatewayError as err:
            reports.append({**report, "status": "error", "error": err.info.type, "message": err.info.message})
            continue
        if answer.get("unchanged"):
            status = "unchanged"
        elif answer["status"] != "RUNNING":  # still loading; GET /deployments/<chat_name> tells when it runs
            status = "deploying"
        else:
            status = "updated" if existing and existing.get("status") != "DEPLOY_FAILED" else "deployed"
        reports.append({**report, "status": status})
    return reports


def apply_in_process(gateway, path: str, env: Optional[Mapping[str, str]] = None) -> list[dict]:
    """Used by a gateway process on start: deploys through its own ``Endpoints``."""
    endpoints = gateway.endpoints

    def current(name: str) -> Optional[dict]:
        try:
            return endpoints.get(name)
        except GatewayError:
            return None

    return apply(load(path), os.environ if env is None else env, current,
                 lambda provider, spec: endpoints.deploy(providers.get(provider), spec))


def check_transport(base_url: str) -> None:
    """Keys travel in the deploy bodies: https://, or plain HTTP only to this machine.

    Exits (``SystemExit``, with what to do) before anything is sent or even resolved.
    """
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SystemExit("the gateway URL must start with https:// (or http:// for 127.0.0.1, ::1 or localhost)")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise SystemExit(
            f"refusing to send provider keys over plain HTTP to {parts.hostname}: anyone on the way could read them. "
            f"Use https:// (serve the gateway with TLS: GATEWAY_CERTFILE and GATEWAY_KEYFILE), or run the apply on "
            f"the gateway's host against http://127.0.0.1:<port>"
        )


def apply_over_http(base_url: str, path: str, admin_token: Optional[str], env: Optional[Mapping[str, str]] = None) -> list[dict]:
    """``python -m gateway apply FILE``: the same, against a running gateway (https://, or loopback)."""
    import httpx

    check_transport(base_url)
    entries = load(path)
    headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
    # Environment proxies only for https:// (tunnelled, still encrypted end to end); plain HTTP
    # to loopback must not be handed to an HTTP_PROXY. SSL_CERT_FILE counts for https://.
    trust_env = urlsplit(base_url).scheme == "https"
    with httpx.Client(base_url=base_url, headers=headers, timeout=300, trust_env=trust_env) as http:
        listing = http.get("/deployments")
        if listing.status_code != 200:
            raise SystemExit(f"GET /deployments answered {listing.status_code}: {listing.text[:300]}")
        rows = {r["chat_name"]: r for r in listing.json()["deployments"]}

        def deploy(provider: str, spec) -> dict:
            body = spec.model_dump(mode="json", exclude_none=True)
            if getattr(spec, "api_keys", None):  # (a pool: its keys, not the dump's masks)
                body.pop("api_key", None)
                body["api_keys"] = [{"key": item.key.get_secret_value(), "weight": item.weight} for item in spec.api_keys]
            else:
                body["api_key"] = spec.api_key.get_secret_value() if hasattr(spec, "api_key") else None
            r = http.post(f"/{provider}/deploy", json={k: v for k, v in body.items() if v is not None})
            if r.status_code not in (200, 202):
                err = r.json().get("error", {}) if r.headers.get("content-type", "").startswith("application/json") else {}
                raise GatewayError(err.get("type") if err.get("type") in STATUS else "internal_error",
                                   err.get("message", r.text[:300]))
            return r.json()

        return apply(entries, os.environ if env is None else env, rows.get, deploy)
