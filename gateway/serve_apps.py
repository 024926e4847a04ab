"""Serve applications: one per endpoint (named by its ``chat_name``), started, looked at and deleted here.

Every call of ``Endpoints`` to Ray Serve (and to Ray for the live nodes) goes through this module; the
deploy's decisions (``gateway.endpoints``, ``gateway.deploys``) and the views (``gateway.endpoint_views``)
read what it answers. Serve's application status objects are passed through as Serve has them.

The replica's side of Serve is here too, so that the replica (``gateway.replica.ChatReplica``) imports
no Ray: the Serve deployment made of it (``chat_deployment``), its Ray metrics (``ReplicaMetrics``) and
the patch that keeps its gRPC server on a loopback node's address (``keep_replica_grpc_on_loopback``;
the rule and its wrapper are ``gateway.loopback``'s).
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Optional

import ray
from ray import serve
from ray.util import metrics as ray_metrics

from providers.base import Provider
from providers.deploy_failure import DeployFailure
from providers.specs import DeploySpec

from .config import Settings
from .loopback import loopback_bind_address, rewrite_bind_once
from .placement import placement_options

log = logging.getLogger("ray.serve")

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
    from .retry import RetryPolicy

    policy = RetryPolicy(max_retries=spec.max_retries, deadline_s=spec.timeout, retry_after_cap_s=settings.retry_after_cap_s)
    if options is None:
        options = placement_options(provider, spec, settings)
    pool = {"generation": generation, "namespace": settings.ray_namespace} if generation else None
    # (one at a time in a process: building a deployment's config serializes Serve's request router between
    # cloudpickle's process-wide register_pickle_by_value and unregister_pickle_by_value, so two deploys
    # building at once failed one with "... is not registered for pickle by value")
    with _BUILDING:
        return chat_deployment().options(name=provider.name, **options).bind(provider, spec, policy, pool)


#: held while a deployment is built (``bind_endpoint``)
_BUILDING = threading.Lock()


@functools.cache
def chat_deployment():
    """The Serve deployment of every endpoint (``gateway.replica.ChatReplica``, one class for every
    provider); per-endpoint options are set with ``.options`` at deploy time. (Made under ``_BUILDING``.)"""
    from .replica import ChatReplica

    return serve.deployment(ChatReplica)


# -- the replica's side: what runs in each replica's process ------------------------------------------
class ReplicaMetrics:
    """Ray's own metrics of one replica (dashboard, Prometheus via Ray): per endpoint, no user input in tags."""

    def __init__(self, chat_name: str, provider: str) -> None:
        tags = {"chat_name": chat_name, "provider": provider}
        self._latency = ray_metrics.Histogram(
            "gateway_replica_upstream_latency_seconds", description="Upstream call time in the replica, retries included",
            boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60], tag_keys=("chat_name", "provider"))
        self._errors = ray_metrics.Counter(
            "gateway_replica_upstream_errors_total", description="Upstream failures by gateway error type",
            tag_keys=("chat_name", "provider", "type"))
        self._retries = ray_metrics.Counter(
            "gateway_replica_upstream_retries_total", description="Upstream calls beyond the first",
            tag_keys=("chat_name", "provider"))
        for metric in (self._latency, self._errors, self._retries):
            metric.set_default_tags(tags)

    def observe(self, seconds: float, attempts: int, error_type: Optional[str] = None) -> None:
        """One upstream call of ``seconds`` in ``attempts`` attempts; ``error_type``: how it failed, if it did."""
        self._latency.observe(seconds)
        if attempts > 1:
            self._retries.inc(attempts - 1)
        if error_type is not None:
            self.failed(error_type)

    def failed(self, error_type: str) -> None:
        """One upstream failure, by its gateway error type."""
        self._errors.inc(1, tags={"type": error_type})


#: Ray's call ``gateway.loopback`` rewrites, exactly as Ray 2.60.0 has it in ``Replica._on_initialized``
UPSTREAM_CALL = 'add_port_to_grpc_server(self._server, "[::]:0")'


def _node_ip() -> str:
    return ray.util.get_node_ip_address()  # what the replica reports, so what the router dials


def keep_replica_grpc_on_loopback() -> bool:
    """Call in a replica's constructor. True: this replica's gRPC server will bind on its loopback
    node address. False: nothing changed (a networked node, or a Ray whose code differs). The rule and
    the wrapper: ``gateway.loopback``."""
    try:
        node_ip = _node_ip()
    except Exception as exc:  # noqa: BLE001 - never fail a replica over this: Ray's own bind stands
        log.warning("no node address (%s): this replica's gRPC server listens where Ray puts it", type(exc).__name__)
        return False
    bind = loopback_bind_address(node_ip)
    if bind is None:
        return False
    from ray.serve._private import replica as serve_replica

    return rewrite_bind_once(serve_replica, bind, UPSTREAM_CALL, ray.__version__)
