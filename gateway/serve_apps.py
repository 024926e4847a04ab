"""Serve applications: one per endpoint (named by its ``chat_name``), started, looked at and deleted here.

Every call of ``Endpoints`` to Ray Serve (and to Ray for the live nodes) goes through this module; the
deploy's decisions (``gateway.endpoints``, ``gateway.deploys``) and the views (``gateway.endpoint_views``)
read what it answers. Serve's application status objects are passed through as Serve has them.
"""
from __future__ import annotations

import time
from typing import Optional

import ray
from ray import serve

from providers.base import Provider
from providers.deploy_failure import DeployFailure
from providers.specs import DeploySpec

from .config import Settings
from .placement import placement_options

#: how long a call to Serve's controller (every application's status) may take
CONTROLLER_WAIT_S = 10.0


def _app_statuses() -> dict:
    """Serve's application statuses, by name: the look a deploy or undeploy takes (callers look it up on
    this module at each call, so that a test can make it slow)."""
    return serve_state()[0]


def serve_state(timeout: float = CONTROLLER_WAIT_S) -> tuple[dict, dict[str, list[dict]]]:
    """(Serve's application statuses, as ``serve.status()`` has them; each application's replicas).

    One call to Serve's controller, within ``timeout`` (``GetTimeoutError`` when it does not answer):
    ``serve.status()``'s own, whose details hold every replica too. A replica is
    ``{"state", "node_ip", "node_id"}`` (the full Ray node id; both None while it is not placed on a
    node). No Serve controller running is no applications. The listing and ``python -m gateway status``
    both read it here.
    """
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return {}, {}
    details = ray.get(client._controller.get_serve_instance_details.remote(), timeout=timeout)
    apps = ServeInstanceDetails(**details)._get_status().applications
    replicas = {}
    for name, app in (details.get("applications") or {}).items():
        replicas[name] = [{"state": status_of(r.get("state")), "node_ip": r.get("node_ip"), "node_id": r.get("node_id")}
                          for dep in (app.get("deployments") or {}).values() for r in dep.get("replicas") or []]
    return apps, replicas


def run_app(app, name: str) -> None:
    """Start (or update) ``name``'s application; Serve deploys it in the background (``follow`` watches)."""
    serve._run(app, name=name, route_prefix=None, _blocking=False)


def delete_app_nowait(name: str) -> None:
    """Ask Serve to delete ``name``'s application (it goes in the background)."""
    serve.delete(name, _blocking=False)


def delete_app(name: str, limit: float = 60.0) -> None:
    """Delete a Serve application and wait until it is gone.

    Serve's own blocking delete looks once a second, which made every undeploy take a
    second or more; this looks every 20-200 ms.
    """
    serve.delete(name, _blocking=False)
    deadline, delay = time.monotonic() + limit, 0.02
    while name in _app_statuses():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the application {name!r} was not deleted within {limit:.0f}s")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.2)


def live_nodes() -> list[dict]:
    """The cluster's live nodes, as ``ray.nodes()`` has them (resources, labels, address)."""
    return [n for n in ray.nodes() if n.get("Alive")]


def status_of(value) -> str:
    """A Serve status (an enum, or its string) as its string."""
    return str(getattr(value, "value", value))


def deployment_view(app_status) -> tuple[Optional[str], int]:
    """(deployment name, running replicas) of an application's single deployment."""
    for name, dep in app_status.deployments.items():
        return name, int(dep.replica_states.get("RUNNING", 0))
    return None, 0


def running_as(app_status) -> Optional[str]:
    """The provider an application runs as (its deployment is named after it), or None."""
    return deployment_view(app_status)[0] if app_status is not None else None


def message_of(app) -> str:
    """Serve's own words on an application (its deployment's message first)."""
    for dep in app.deployments.values():
        if dep.message:
            return str(dep.message)
    return str(app.message or status_of(app.status))


def failure_of(app) -> dict:
    """``{"reason", "message"}`` of a failed application, from Serve's message.

    The traceback Serve keeps is not shown; the reason a replica gave is: a replica's
    constructor raises every failure as a ``DeployFailure`` with the spec's secrets redacted
    (``providers.deploy_failure.construction_failure``). Anything else (a replica that died, a failed
    health check) shows the traceback's last line, which Serve wrote, not an SDK.
    """
    text = message_of(app)
    failure = DeployFailure.parse(text)
    if failure is not None:
        return {"reason": failure.reason, "message": failure.message[:500]}
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else "the replicas failed to start"
    return {"reason": "replica_failed", "message": f"a replica failed to start: {last[:400]}"}


def bind_endpoint(provider: Provider, spec: DeploySpec, settings: Settings, options: Optional[dict] = None,
                  generation: Optional[str] = None):
    """The bound Serve application of one endpoint: the key travels only in ``bind`` args.

    ``options``: its Serve options (``placement_options``, as the deploy checked them); default: the
    provider's with the deploy's ``resources``. ``generation``: its key pool's in the keeper
    (``gateway.pool_keeper``); None: each replica keeps a pool of its own.
    """
    from .replica import ChatDeployment
    from .retry import RetryPolicy

    policy = RetryPolicy(max_retries=spec.max_retries, deadline_s=spec.timeout, retry_after_cap_s=settings.retry_after_cap_s)
    if options is None:
        options = placement_options(provider, spec, settings)
    pool = {"generation": generation, "namespace": settings.ray_namespace} if generation else None
    return ChatDeployment.options(name=provider.name, **options).bind(provider, spec, policy, pool)
