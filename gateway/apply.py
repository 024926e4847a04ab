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
from typing import Any, Callable, Mapping, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

import providers

from .doors import is_loopback_host
from .errors import STATUS, GatewayError
from .schemas import ChatName, invalid_request_from


class EndpointEntry(BaseModel):
    model_config = ConfigDict(extra="allow")

    chat_name: ChatName
    provider: str
    api_key_env: Optional[str] = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")

    def body(self, env: Mapping[str, str]) -> dict[str, Any]:
        """The deploy body: the entry's fields, with the key read from its variable."""
        body = {k: v for k, v in self.model_dump().items() if k not in ("provider", "api_key_env")}
        if self.api_key_env:
            key = env.get(self.api_key_env, "")
            if not key:
                raise GatewayError("invalid_request", f"environment variable {self.api_key_env} is not set: set it in the "
                                   f"gateway's environment, or name another in api_key_env", fields=["api_key_env"])
            body["api_key"] = key
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
    return {str(i["api_key_env"]) for i in items or [] if isinstance(i, dict) and i.get("api_key_env")}


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
            body["api_key"] = spec.api_key.get_secret_value() if hasattr(spec, "api_key") else None
            r = http.post(f"/{provider}/deploy", json={k: v for k, v in body.items() if v is not None})
            if r.status_code not in (200, 202):
                err = r.json().get("error", {}) if r.headers.get("content-type", "").startswith("application/json") else {}
                raise GatewayError(err.get("type") if err.get("type") in STATUS else "internal_error",
                                   err.get("message", r.text[:300]))
            return r.json()

        return apply(entries, os.environ if env is None else env, rows.get, deploy)
