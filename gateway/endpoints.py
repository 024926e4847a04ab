"""Deploy, update, undeploy and list endpoints (one Serve application per ``chat_name``)."""
from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Callable, Optional

import ray
from ray import serve

from providers.base import DeploySpec, Provider, SaaSDeploySpec, redact

from .cluster import Cluster
from .config import Settings
from .errors import GatewayError

log = logging.getLogger("gateway.endpoints")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _app_statuses() -> dict:
    return serve.status().applications


def _status(value) -> str:
    return str(getattr(value, "value", value))


def _deployment_view(app_status) -> tuple[Optional[str], int]:
    """(deployment name, running replicas) of an application's single deployment."""
    for name, dep in app_status.deployments.items():
        return name, int(dep.replica_states.get("RUNNING", 0))
    return None, 0


class Endpoints:
    def __init__(self, cluster: Cluster, settings: Settings, on_change: Callable[[str], None] = lambda name: None) -> None:
        self.cluster = cluster
        self.settings = settings
        self._on_change = on_change  # this process's dispatch cache forgets a changed endpoint at once

    # -- deploy -------------------------------------------------------------
    def deploy(self, provider: Provider, spec: DeploySpec) -> dict:
        name = spec.chat_name
        provider.create_adapter(spec)  # fails here, before the cluster, on a spec the adapter refuses
        registry = self.cluster.registry()
        apps = _app_statuses()
        if name in apps:
            running_as, _ = _deployment_view(apps[name])
            if running_as and running_as != provider.name:
                raise self._conflict(name, running_as)
        state, existing = ray.get(registry.begin.remote(name, provider.name, self.settings.deploy_wait_s + 30))
        if state == "conflict":
            raise self._conflict(name, existing["provider"])
        if state == "busy":
            raise GatewayError("conflict", f"another deploy or undeploy of '{name}' is in progress; try again when it ends")
        try:
            self._check_fallbacks(name, spec.fallbacks)
        except GatewayError:
            ray.get(registry.release.remote(name))
            raise
        fresh = existing is None and name not in apps
        record = None
        try:
            app = bind_endpoint(provider, spec, self.settings)
            serve._run(app, name=name, route_prefix=None, _blocking=False)
            self._wait_running(name, spec)
            now = _now()
            record = {
                "chat_name": name,
                "provider": provider.name,
                **spec.public(),
                "config_digest": spec.digest(),
                "created_at": existing["created_at"] if existing else now,
                "updated_at": now,
            }
            log.info("deployed chat_name=%s provider=%s model=%s workers=%d", name, provider.name, spec.model_name, spec.workers)
            return record
        except Exception as exc:
            if fresh:  # nothing half-deploys: a new endpoint that failed leaves nothing behind
                try:
                    # Not blocking: replicas that never started are reaped by Serve after
                    # their graceful-shutdown timeout; the caller need not wait for that.
                    serve.delete(name, _blocking=False)
                except Exception as cleanup_exc:  # noqa: BLE001
                    log.error("cleanup of failed deploy %s: %s", name, type(cleanup_exc).__name__)
            record = existing
            if isinstance(exc, GatewayError):
                raise
            secret = spec.api_key.get_secret_value() if isinstance(spec, SaaSDeploySpec) else ""
            raise GatewayError("internal_error", redact(f"deploy of '{name}' failed: {exc}", secret)[:500]) from None
        finally:
            ray.get(registry.finish.remote(name, record))
            self._on_change(name)

    def _check_fallbacks(self, name: str, fallbacks: list[str]) -> None:
        """Fallbacks must name deployed endpoints and must not lead back to ``name``."""
        if not fallbacks:
            return
        if name in fallbacks:
            raise GatewayError("invalid_request", f"'{name}' cannot be its own fallback", fields=["fallbacks"])
        graph = {r["chat_name"]: list(r.get("fallbacks") or []) for r in ray.get(self.cluster.registry().list.remote())}
        unknown = [f for f in fallbacks if f not in graph]
        if unknown:
            raise GatewayError("invalid_request", f"fallbacks name endpoints that are not deployed: {', '.join(unknown)}",
                               fields=["fallbacks"])
        graph[name] = list(fallbacks)
        path: list[str] = []

        def leads_back(node: str, seen: set) -> bool:
            for nxt in graph.get(node, []):
                path.append(nxt)
                if nxt == name or (nxt not in seen and leads_back(nxt, seen | {nxt})):
                    return True
                path.pop()
            return False

        if leads_back(name, {name}):
            cycle = " -> ".join([name] + path)
            raise GatewayError("invalid_request", f"fallbacks form a cycle: {cycle}", fields=["fallbacks"])

    def _wait_running(self, name: str, spec: DeploySpec) -> None:
        deadline = time.monotonic() + self.settings.deploy_wait_s
        delay = 0.02
        while True:
            app = _app_statuses().get(name)
            status = _status(app.status) if app is not None else None
            if status == "RUNNING":
                return
            if status in ("DEPLOY_FAILED", "UNHEALTHY"):
                secret = spec.api_key.get_secret_value() if isinstance(spec, SaaSDeploySpec) else ""
                message = redact(str(app.message or app.status), secret)
                raise GatewayError("endpoint_not_ready", f"deploy of '{name}' failed: {message[:500]}")
            if time.monotonic() > deadline:
                raise GatewayError(
                    "endpoint_not_ready",
                    f"'{name}' was not running after {self.settings.deploy_wait_s:.0f}s",
                    retry_after=5,
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    @staticmethod
    def _conflict(name: str, other: str) -> GatewayError:
        return GatewayError(
            "conflict",
            f"'{name}' is deployed as a {other} endpoint; undeploy it there first (POST /{other}/undeploy)",
        )

    # -- undeploy -----------------------------------------------------------
    def undeploy(self, provider: Provider, name: str) -> dict:
        registry = self.cluster.registry()
        record = ray.get(registry.get.remote(name))
        apps = _app_statuses()
        owner = record["provider"] if record else (_deployment_view(apps[name])[0] if name in apps else None)
        if owner is None:
            raise GatewayError("not_found", f"no endpoint named '{name}'")
        if owner != provider.name:
            raise GatewayError("not_found", f"'{name}' is a {owner} endpoint; use POST /{owner}/undeploy")
        state, _ = ray.get(registry.begin.remote(name, provider.name, self.settings.deploy_wait_s + 30))
        if state == "busy":
            raise GatewayError("conflict", f"another deploy or undeploy of '{name}' is in progress; try again when it ends")
        try:
            if name in apps:
                serve.delete(name)
        finally:
            ray.get(registry.finish.remote(name, None))
            self._on_change(name)
        log.info("undeployed chat_name=%s provider=%s", name, provider.name)
        return {"ret": "ok", "chat_name": name, "provider": provider.name, "status": "DELETED"}

    # -- listing ------------------------------------------------------------
    def list(self) -> list[dict]:
        records = {r["chat_name"]: r for r in ray.get(self.cluster.registry().list.remote())}
        apps = _app_statuses()
        out = []
        for name in sorted(set(records) | set(apps)):
            record = dict(records.get(name) or {"chat_name": name})
            app = apps.get(name)
            if app is None:
                record.update(status="MISSING", workers_running=0)
            else:
                deployment, running = _deployment_view(app)
                record.setdefault("provider", deployment)
                record.update(status=_status(app.status), workers_running=running)
            out.append(record)
        return out

    def get(self, name: str) -> dict:
        for record in self.list():
            if record["chat_name"] == name:
                return record
        raise GatewayError("not_found", f"no endpoint named '{name}'")


def bind_endpoint(provider: Provider, spec: DeploySpec, settings: Settings):
    """The bound Serve application of one endpoint: the key travels only in ``bind`` args."""
    from .replica import ChatDeployment
    from .retry import RetryPolicy

    policy = RetryPolicy(max_retries=spec.max_retries, deadline_s=spec.timeout, retry_after_cap_s=settings.retry_after_cap_s)
    return ChatDeployment.options(name=provider.name, **provider.replica_options(spec, settings)).bind(provider, spec, policy)
