"""LLM gateway for legacy applications: named chat endpoints on Ray Serve behind plain HTTP."""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

# Before anything imports Ray (Ray reads it once, at import): a Ray call made while this process is not
# connected must fail, never connect by itself. Ray's ``.remote()`` and ``ray.get`` call ``ray.init()`` with
# its defaults when they find no connection; a thread still running after ``Cluster.disconnect`` (a lease
# renewal, a deploy being followed) then made the process a driver again (another namespace, the driver's log
# on), and one whose head then stopped exited with code 1. The gateway connects in one place:
# ``Cluster.connect``.
os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"

from .config import Settings  # noqa: E402

if TYPE_CHECKING:  # Flask is imported where the app is built: replicas import this package too
    from flask import Flask

    from .auth import Auth
    from .cluster import Cluster
    from .dispatch import Dispatcher
    from .endpoints import Endpoints
    from .limits import Limits

__all__ = ["Gateway", "Settings", "create_app"]


@dataclass
class Gateway:
    """Per-app services, kept in ``app.extensions['gateway']``."""

    settings: Settings
    cluster: "Cluster"
    endpoints: "Endpoints"
    dispatcher: "Dispatcher"
    auth: "Auth"
    #: client-key limits for the whole cluster (a keeper actor, made only once a limited key calls)
    limits: "Limits"

    # startup state: set by ``start_in_background``; read by /readyz
    starting: bool = field(default=False, init=False)
    started: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    startup_problem: Optional[str] = field(default=None, init=False)
    _dashboard_url: Optional[str] = field(default=None, init=False, repr=False)
    _node_gone_since: Optional[float] = field(default=None, init=False, repr=False)

    def start_in_background(self) -> threading.Thread:
        """Run ``startup`` in a daemon thread; /readyz answers 503 until it is done."""
        self.starting = True
        thread = threading.Thread(target=self.startup, name="gateway-startup", daemon=True)
        thread.start()
        return thread

    def startup(self) -> None:
        """Connect to Ray, then deploy ``GATEWAY_ENDPOINTS_FILE``; tried again with backoff until done.

        Runs in each fresh gateway process (gunicorn worker, ``python app.py``), so endpoints come
        back without an operator: when the gateway starts before the Ray head, and after a cluster
        restart (which restarts the gunicorn workers). Each attempt is cheap to repeat: the file
        is applied by one process at a time, and an unchanged endpoint is left alone.
        """
        from tenacity import Retrying, retry_if_exception_type, wait_exponential_jitter

        log = logging.getLogger("gateway.startup")

        def failed(state) -> None:
            exc = state.outcome.exception()
            self.startup_problem = _say(exc)
            (log.info if isinstance(exc, _ApplyBusy) else log.warning)(
                "startup attempt %d: %s; trying again in %.1fs", state.attempt_number, self.startup_problem,
                state.next_action.sleep)

        for attempt in Retrying(wait=wait_exponential_jitter(initial=0.5, max=_STARTUP_BACKOFF_MAX_S, jitter=0.5),
                                retry=retry_if_exception_type((Exception, SystemExit)), before_sleep=failed):
            with attempt:
                self._start_once()
        self.startup_problem = None
        self.started.set()
        log.info("started (pid %d): connected to the Ray cluster at %s%s", os.getpid(), self.cluster.address,
                 f"; endpoints file {self.settings.endpoints_file} applied" if self.settings.endpoints_file else "")

    def _start_once(self) -> None:
        from .apply import apply_in_process
        from contract.errors import GatewayError
        from .leases import APPLY_LEASE, Lease

        self.cluster.ensure_up()  # connect (fails at once while a lost cluster is away)
        self.endpoints.list()  # settles deploys whose watcher died with an earlier process
        path = self.settings.endpoints_file
        if not path:
            return
        # One process applies the file at a time, under a lease it renews while it applies: when it
        # dies mid-apply (kill -9, OOM), the lease is free again within ``lease_ttl_s``.
        lease = Lease(self.endpoints.registry, APPLY_LEASE, self.settings.lease_ttl_s)
        holder = lease.claim()
        if holder is not None:
            raise _ApplyBusy(f"another gateway process (pid {holder['pid']} on {holder['host']}) is applying {path}; "
                             f"waiting for it")
        log = logging.getLogger("gateway.apply")
        log.info("applying the endpoints file %s (pid %d holds the apply lease)", path, os.getpid())
        try:
            reports = apply_in_process(self, path)
        finally:
            lease.release()
        unreachable = [r["chat_name"] for r in reports if r.get("error") == "cluster_unavailable"]
        if unreachable:  # not applied: the cluster went away under it
            raise GatewayError("cluster_unavailable", f"{path}: the cluster did not answer for {', '.join(unreachable)}")
        for report in reports:
            (log.error if report["status"] == "error" else log.info)("endpoints file %s: %s", path, json.dumps(report))

    def readiness(self) -> tuple[bool, dict]:
        """What ``/readyz`` reports: not ready until this process's startup is done (when it runs
        one: served processes do, an app built for tests does not); then the cluster's readiness."""
        if self.starting and not self.started.is_set():
            path = self.settings.endpoints_file
            what = f"the endpoints file {path} is not applied yet" if path else "it is not connected to the Ray cluster yet"
            last = f" (last attempt: {self.startup_problem})" if self.startup_problem else ""
            return False, {"ray_address": self.cluster.address, "reason": "starting",
                           "problem": f"this gateway process is starting: {what}{last}"}
        return self.cluster.readiness()

    def dashboard_url(self) -> Optional[str]:
        """The Ray dashboard's URL: ``GATEWAY_DASHBOARD_URL``, else where the dashboard registered itself
        in the GCS (what ``ray job submit`` reads too), read once per process, within 2 s."""
        if self.settings.dashboard_url:
            return self.settings.dashboard_url
        if self._dashboard_url is None and self.cluster.connected and not self.cluster.lost:
            from .actors import dashboard_address
            from .cluster_answers import _CALL_TIMEOUT_S, _bounded

            found = _bounded(dashboard_address, _CALL_TIMEOUT_S)  # (a link only: None when it cannot tell)
            if found:
                host, _, port = found.rpartition(":")
                host = f"[{host}]" if ":" in host and not host.startswith("[") else host  # (an IPv6 head)
                self._dashboard_url = f"http://{host}:{port}" if "://" not in found else found
        return self._dashboard_url

    def liveness(self) -> tuple[bool, dict]:
        """What ``/healthz`` reports: (alive, details); details has ``problem`` when not alive.

        Not alive once this process's Ray node has been gone for ``liveness_grace_s`` while the
        cluster answers (see ``Cluster.node_gone``): only a restart helps then (in Kubernetes, of
        the pod, whose ``ray start`` joins again). A cluster that does not answer, or a head that
        restarts, leaves the process alive: it reconnects by itself when the cluster is back.
        """
        gone, now = self.cluster.node_gone(), time.monotonic()
        if gone is False:
            self._node_gone_since = None
        elif gone and self._node_gone_since is None:
            self._node_gone_since = now
        since = self._node_gone_since
        if since is None or now - since < self.settings.liveness_grace_s:
            return True, {}
        return False, {
            "problem": f"the Ray cluster at {self.cluster.address} answers, but this host's Ray node has been gone for "
                       f"{now - since:.0f}s: restart this process (in Kubernetes the pod: its ray start joins again)",
            "ray_address": self.cluster.address, "node_gone_for_s": round(now - since, 1),
        }


#: the longest pause between two startup attempts
_STARTUP_BACKOFF_MAX_S = 5.0


class _ApplyBusy(Exception):
    """Another gateway process holds the endpoints file: wait for it, then apply (cheaply) too."""


def _say(exc: BaseException) -> str:
    """A startup failure in words that carry no secret: the gateway's own messages, else the type."""
    from contract.errors import GatewayError

    if isinstance(exc, GatewayError):
        return exc.info.message
    if isinstance(exc, (SystemExit, _ApplyBusy)):  # (an unreadable endpoints file: its path and why)
        return str(exc)
    return type(exc).__name__


def create_app(settings: Optional[Settings] = None) -> "Flask":
    """Build the Flask app and its ASGI front (``app.extensions["front"]``, what gunicorn serves:
    ``gateway.front``); ``app.test_client()`` goes through that front. Nothing here touches Ray:
    each process connects on first use."""
    from flask import Flask

    from .auth import Auth, load_keys
    from .front import Front, FrontClient
    from .cluster import Cluster
    from .dispatch import Dispatcher
    from .endpoints import Endpoints
    from .limits import Limits
    from .web import register_routes

    settings = settings or Settings.from_env()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    access = logging.getLogger("gateway.access")
    if not access.handlers:  # one JSON object per line, nothing around it
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)
        access.propagate = False
    app = Flask("gateway", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.ensure_ascii = False  # legacy callers get the reply text as written
    app.json.sort_keys = False
    cluster = Cluster(settings)
    dispatcher = Dispatcher(cluster, settings)
    app.extensions["gateway"] = Gateway(
        settings=settings,
        cluster=cluster,
        endpoints=Endpoints(cluster, settings, on_change=dispatcher.forget),
        dispatcher=dispatcher,
        limits=Limits(cluster, settings),
        auth=Auth(
            settings.admin_token.get_secret_value() if settings.admin_token else None,
            load_keys(settings.api_keys.get_secret_value() if settings.api_keys else None, settings.api_keys_file),
            settings.metrics_token.get_secret_value() if settings.metrics_token else None,
        ),
    )
    gateway = app.extensions["gateway"]
    if settings.endpoints_file:  # until the file is applied, an endpoint missing from the cluster is "not yet"
        dispatcher.applying = lambda: gateway.starting and not gateway.started.is_set()
    register_routes(app)
    app.extensions["front"] = Front(app)
    app.test_client_class = FrontClient
    return app
