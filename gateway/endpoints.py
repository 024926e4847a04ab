"""Deploy, update, undeploy and list endpoints (one Serve application per ``chat_name``)."""
from __future__ import annotations

import logging
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Callable, Optional

import ray
from ray import serve

from providers.base import DeployFailure, DeploySpec, Provider, construction_failure, indefinite

from .cluster import Cluster, SharedAnswer, serve_status
from .config import Settings
from .errors import GatewayError
from .registry import Lease, endpoint_lease

log = logging.getLogger("gateway.endpoints")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


#: how long a call to Serve's controller (every application's status) or the registry's listing may take
_CONTROLLER_WAIT_S = 10.0
#: ``Endpoints.listing``: one listing is reused this long, and a caller waits at most this long for one
_LISTING_FRESH_S = 1.0
_LISTING_WAIT_S = 1.5


#: how long an undeploy waits for a deploy or undeploy of the same name to end (then 409)
_UNDEPLOY_WAIT_S = 10.0
#: how long the cleanup of a failed deploy's application waits for the name's lease in the background
_CLEANUP_WAIT_S = 120.0


def _app_statuses() -> dict:
    return serve_status(_CONTROLLER_WAIT_S).applications


def _delete_app(name: str, limit: float = 60.0) -> None:
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


def _status(value) -> str:
    return str(getattr(value, "value", value))


def _deployment_view(app_status) -> tuple[Optional[str], int]:
    """(deployment name, running replicas) of an application's single deployment."""
    for name, dep in app_status.deployments.items():
        return name, int(dep.replica_states.get("RUNNING", 0))
    return None, 0


def fallback_cycle(name: str, fallbacks: list[str], graph: dict[str, list[str]]) -> Optional[list[str]]:
    """The first path by which ``name``'s new ``fallbacks`` lead back to ``name`` (``['a', 'b', 'a']``), or None.

    ``graph`` maps the deployed endpoints to their fallbacks (it is not changed); ``name``'s own
    entry is replaced by ``fallbacks``. Names the graph lacks lead nowhere. Pure: no cluster.
    """
    graph = {**graph, name: list(fallbacks)}
    path: list[str] = []
    seen = {name}  # a node looked at once need not be again: the search stops at the first way back

    def leads_back(node: str) -> bool:
        for nxt in graph.get(node, []):
            path.append(nxt)
            if nxt == name:
                return True
            if nxt not in seen:
                seen.add(nxt)
                if leads_back(nxt):
                    return True
            path.pop()
        return False

    return [name] + path if leads_back(name) else None


class Endpoints:
    def __init__(self, cluster: Cluster, settings: Settings, on_change: Callable[[str], None] = lambda name: None) -> None:
        self.cluster = cluster
        self.settings = settings
        #: ``listing``: the model list, shared by this process's callers
        self._listing = SharedAnswer(self.list, "the endpoint registry or Serve's controller",
                                     fresh_s=_LISTING_FRESH_S, wait_s=_LISTING_WAIT_S)

        def changed(name: str) -> None:  # this process's dispatch cache and listing forget a changed endpoint at once
            self._listing.forget()
            on_change(name)

        self._on_change = changed
        self._digest_secret: Optional[bytes] = None  # the cluster's, fetched once (see ``_digest``)

    # -- deploy -------------------------------------------------------------
    def deploy(self, provider: Provider, spec: DeploySpec) -> dict:
        """Start a deploy and wait up to ``deploy_wait_s`` for it.

        Answers the endpoint's view: ``status`` is ``RUNNING``, or ``DEPLOYING``/``UPDATING``
        when it is still loading (a watcher thread, or the next reader, settles it). A deploy
        that fails within the wait raises ``deploy_failed`` with a ``reason``; a new endpoint
        that fails leaves nothing behind in the cluster. The spec of a running endpoint again
        (same digest, key included) changes nothing and answers its view with ``unchanged``.
        """
        name = spec.chat_name
        self._check(provider, spec, provider.check_deploy)  # fails here, before the cluster, on a spec the adapter refuses
        registry = self.cluster.registry()
        apps = _app_statuses()
        if name in apps:
            running_as, _ = _deployment_view(apps[name])
            if running_as and running_as != provider.name:
                raise self._conflict(name, running_as)
        digest = self._digest(spec)
        unchanged = self._unchanged(provider, spec, digest, apps.get(name))
        if unchanged is not None:
            return unchanged
        # the key check costs a provider call: not for an unchanged endpoint (every worker's start
        # applies the endpoints file again), only for what is about to be deployed; a wrong key
        # fails here, not at the first caller's chat
        if getattr(spec, "verify_key", False):
            self._check(provider, spec, provider.verify_key)
        # The name's lease, renewed while this deploy holds it: the records and Serve's applications
        # are read again under it (a deploy or undeploy may have changed them since the looks above).
        lease = Lease(registry, endpoint_lease(name))
        state, existing = ray.get(registry.begin.remote(name, provider.name, lease.owner, lease.ttl_s))
        if state == "conflict":
            raise self._conflict(name, existing["provider"])
        if state == "busy":
            raise GatewayError("conflict", f"another deploy or undeploy of '{name}' is in progress; try again when it ends")
        lease.hold()
        try:
            started = self._start(provider, spec, digest, lease, existing)
        finally:
            lease.stop()  # (released by now: by ``finish``, or as it failed)
        if isinstance(started, dict):  # the same deploy again: the view of the one under way
            return started
        deploy_id, deadline = started
        log.info("deploying chat_name=%s provider=%s model=%s workers=%d", name, provider.name, spec.model_name, spec.workers)
        status = self._follow(name, deploy_id, deadline, self.settings.deploy_wait_s)
        if status is None:  # still loading: keep watching in the background
            threading.Thread(target=self._follow, args=(name, deploy_id, deadline, None),
                             name=f"deploy-{name}", daemon=True).start()
        view = self.get(name)
        if status in ("DEPLOY_FAILED", "UPDATE_FAILED"):
            failure = view.get("failure") or view.get("last_update_failure") or {}
            raise GatewayError("deploy_failed", failure.get("message", f"deploy of '{name}' failed"),
                               reason=failure.get("reason", "replica_failed"), provider=provider.name)
        return view

    def _start(self, provider: Provider, spec: DeploySpec, digest: str, lease: Lease,
               existing: Optional[dict]):
        """Under the name's lease: check, start the application and record the pending deploy.

        Answers (deploy id, deadline), or the endpoint's view when the same deploy is under way
        already. Releases the lease on every way out (``finish`` releases it with the record).
        """
        name, registry = spec.chat_name, self.cluster.registry()
        try:
            apps = _app_statuses()
            if name in apps:
                running_as, _ = _deployment_view(apps[name])
                if running_as and running_as != provider.name:
                    raise self._conflict(name, running_as)
            pending = (existing or {}).get("pending")
            if pending and pending["deadline"] > time.time():
                if pending["digest"] == digest:  # the same deploy again: report on the one under way
                    lease.release()
                    return self._view(existing, apps.get(name))
                raise GatewayError("conflict", f"'{name}' is still deploying; wait for it (GET /deployments/{name}) "
                                               f"or undeploy it first")
            self._check_fallbacks(name, spec.fallbacks)
            self._check_resources(provider, spec)
        except BaseException as err:
            if isinstance(err, GatewayError) and err.type == "deploy_failed" \
                    and (existing is None or existing.get("status") == "DEPLOY_FAILED") \
                    and name not in apps:  # nothing was started; GET /deployments/<name> still says why
                now = _now()
                lease.stop()  # (before ``finish`` releases it: no renewal takes it again)
                ray.get(registry.finish.remote(name, {
                    "chat_name": name, "provider": provider.name, **spec.public(), "status": "DEPLOY_FAILED",
                    "failure": {"reason": err.info.reason, "message": err.info.message}, "created_at": now, "updated_at": now,
                }, lease.owner))
                self._on_change(name)
            else:
                lease.release()
            raise
        # An update keeps the serving replicas until the new ones run; anything else starts anew.
        fresh = not (name in apps and (existing is None or existing.get("status") == "RUNNING"))
        now = _now()
        deploy_id = uuid.uuid4().hex
        public = {**spec.public(), "provider": provider.name}
        pending = {"id": deploy_id, "fresh": fresh, "public": public, "digest": digest,
                   "started": time.time(), "deadline": time.time() + spec.deploy_timeout}
        if fresh:
            record = {"chat_name": name, **public, "config_digest": digest, "status": "DEPLOYING",
                      "created_at": now, "updated_at": now, "pending": pending}
        else:  # (no record: an application the registry forgot, e.g. after the registry restarted)
            record = {**(existing or {"chat_name": name, **public, "config_digest": "", "status": "RUNNING",
                                      "created_at": now, "updated_at": now}), "pending": pending}
        try:
            app = bind_endpoint(provider, spec, self.settings)
            if fresh and name in apps:  # what a failed deploy left: start from nothing
                _delete_app(name)
            # Nothing starts without the lease: renewed (for its whole TTL from now) just before.
            held = lease.renew()
            if held:
                serve._run(app, name=name, route_prefix=None, _blocking=False)
        except BaseException as exc:
            if fresh:  # nothing half-deploys: no application runs without its record (and with its key)
                try:
                    if name in _app_statuses():
                        serve.delete(name, _blocking=False)
                except Exception as cleanup:  # noqa: BLE001
                    log.error("cleanup of failed deploy %s: %s", name, type(cleanup).__name__)
            lease.stop()
            ray.get(registry.finish.remote(name, existing if not fresh else None, lease.owner))
            self._on_change(name)
            if not isinstance(exc, Exception):
                raise
            raise GatewayError("internal_error", spec.scrub(f"deploy of '{name}' failed: {exc}")[:500]) from None
        if not held:  # another deploy or undeploy holds the name now (this process stalled): leave it to that one
            raise GatewayError("conflict", f"another deploy or undeploy of '{name}' took it over; try again when it ends")
        lease.stop()
        if not ray.get(registry.finish.remote(name, record, lease.owner)):  # (the same: its lease was taken)
            log.error("deploy of %s: its lease was taken while it started the application", name)
        self._on_change(name)
        return deploy_id, pending["deadline"]

    def _check(self, provider: Provider, spec: DeploySpec, check: Callable[[DeploySpec], Optional[str]]) -> None:
        """Run a deploy-time ``check(spec)`` of the provider; its failures without the spec's secrets.

        ``provider.check_deploy`` builds a SaaS adapter, so an SDK constructor that puts the key
        in its error fails here as it would in the replica (422 ``deploy_failed``, the same scrubbed
        message). ``provider.verify_key`` asks the provider about the key: a rejected key is a 400
        ``invalid_key`` and nothing is deployed; a check that could not tell (unreachable, 5xx, a
        timeout) returns a warning, which is logged, and the deploy goes on.
        """
        failure = warning = None
        try:
            warning = check(spec)
        except GatewayError as err:
            failure = GatewayError.from_info(err.info.model_copy(update={"message": spec.scrub(err.info.message)}))
        except Exception as exc:  # noqa: BLE001 - whatever an SDK raises
            scrubbed = construction_failure(exc, spec, provider.name)
            failure = GatewayError("deploy_failed", scrubbed.message, reason=scrubbed.reason, provider=provider.name)
        if failure is not None:
            raise failure from None  # outside the except block: the original is not chained to it
        if warning:
            log.warning("deploy of %s: %s", spec.chat_name, spec.scrub(warning))

    def _digest(self, spec: DeploySpec) -> str:
        """``spec``'s ``config_digest``: an HMAC keyed with the cluster's secret, read once per process.

        A process outlives no cluster (a restarted cluster restarts its gateway processes), so
        the cached secret is always the current cluster's.
        """
        if self._digest_secret is None:
            from .registry import cluster_digest_secret

            self._digest_secret = cluster_digest_secret(self.settings.ray_namespace)
        return spec.digest(self._digest_secret)

    def _unchanged(self, provider: Provider, spec: DeploySpec, digest: str, app) -> Optional[dict]:
        """The view of ``spec``'s endpoint (with ``"unchanged": True``) when it already runs as asked.

        That is: its record is this provider's, settled ``RUNNING`` with this digest (the key
        included) and these fallbacks (a forced undeploy may have taken one out), and Serve runs
        it. Decided here, not by a client: only the gateway can compute the digest. Read-only,
        so it takes no lease.
        """
        if app is None or _status(app.status) != "RUNNING":
            return None
        record = ray.get(self.cluster.registry().get.remote(spec.chat_name))
        if not record or record.get("pending") or record.get("status") != "RUNNING" \
                or record.get("provider") != provider.name or record.get("config_digest") != digest \
                or list(record.get("fallbacks") or []) != list(spec.fallbacks):
            return None
        return {**self._view(record, app), "unchanged": True}

    def _follow(self, name: str, deploy_id: str, deadline: float, wait: Optional[float]) -> Optional[str]:
        """Poll Serve until the deploy ends (or ``wait`` runs out: None); settle it once."""
        until = time.monotonic() + wait if wait is not None else float("inf")  # settles by the deadline anyway
        delay = 0.02
        try:
            while True:
                app = _app_statuses().get(name)
                settled = self._settle_if_done(name, deploy_id, app, deadline)
                if settled is not False:
                    return settled
                if time.monotonic() >= until:
                    return None
                time.sleep(delay)
                delay = min(delay * 1.5, 0.5 if wait is not None else 2.0)
        except Exception as exc:  # noqa: BLE001 - a watcher never dies loudly; readers settle too
            log.warning("watching the deploy of %s stopped: %s", name, type(exc).__name__)
            return None

    def _settle_if_done(self, name: str, deploy_id: str, app, deadline: float):
        """Settle the pending deploy when Serve says it ended or its time is up.

        Answers the settled status, None when someone else settled it (or it was
        undeployed), or False while it is still under way.
        """
        status = _status(app.status) if app is not None else None
        if status == "RUNNING":
            outcome = ray.get(self.cluster.registry().settle.remote(name, deploy_id, True, None, _now()))
        elif status in ("DEPLOY_FAILED", "UNHEALTHY") or time.time() > deadline or app is None:
            if app is None:
                failure = {"reason": "replica_failed", "message": f"the application of '{name}' disappeared while deploying"}
            elif status in ("DEPLOY_FAILED", "UNHEALTHY"):
                failure = failure_of(app)
            else:
                failure = {"reason": "timeout", "message": f"'{name}' was not running within its deploy_timeout; "
                                                            f"Serve said: {_message_of(app)[:400]}"}
            outcome = ray.get(self.cluster.registry().settle.remote(name, deploy_id, False, failure, _now()))
            if outcome == "DEPLOY_FAILED" and app is not None:  # nothing half-deploys: the failed application goes,
                self._remove_failed_app(name)                      # the failure report stays
            if outcome:
                log.error("deploy failed chat_name=%s reason=%s", name, failure["reason"])
        else:
            return False
        if outcome:
            self._on_change(name)
        return outcome

    def _check_resources(self, provider: Provider, spec: DeploySpec) -> None:
        """Refuse at once what the cluster can never place (it would wait forever)."""
        options = provider.replica_options(spec, self.settings)
        actor = options.get("ray_actor_options") or {}
        bundles = options.get("placement_group_bundles")
        need: dict[str, float] = {}
        for bundle in bundles or [{"CPU": actor.get("num_cpus", 1), "GPU": actor.get("num_gpus", 0),
                                   **(actor.get("resources") or {})}]:
            for key, value in bundle.items():
                if value:
                    need[key] = need.get(key, 0) + float(value)
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        total = {key: sum(n.get(key, 0) for n in nodes) for key in need}
        workers = spec.workers
        for key, per in sorted(need.items(), key=lambda kv: kv[0] != "GPU"):
            if not any(n.get(key, 0) >= per for n in nodes) or total[key] < per * workers:
                noun = {"GPU": "GPUs", "CPU": "CPUs"}.get(key, f"'{key}' resources")
                have = ", ".join(f"{n.get(key, 0):g}" for n in nodes) or "no nodes"
                raise GatewayError(
                    "deploy_failed",
                    f"not enough {noun} in the cluster for '{spec.chat_name}': {workers} worker(s) x {per:g} = "
                    f"{per * workers:g} needed, each worker on one node; the nodes have {have}",
                    reason="insufficient_gpus" if key == "GPU" else "insufficient_resources", provider=provider.name,
                )

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
        cycle = fallback_cycle(name, fallbacks, graph)
        if cycle:
            raise GatewayError("invalid_request", f"fallbacks form a cycle: {' -> '.join(cycle)}", fields=["fallbacks"])

    @staticmethod
    def _conflict(name: str, other: str) -> GatewayError:
        return GatewayError(
            "conflict",
            f"'{name}' is deployed as {indefinite(other)} endpoint; undeploy it there first (POST /{other}/undeploy)",
        )

    # -- undeploy -----------------------------------------------------------
    def undeploy(self, provider: Provider, name: str, force: bool = False) -> dict:
        """Remove an endpoint in any state (a deploy still loading is cancelled).

        An endpoint that others name as a fallback is kept (409, naming them) unless
        ``force``: then it is taken out of their fallbacks too.
        """
        registry = self.cluster.registry()
        # Everything is read under the name's lease (waiting up to _UNDEPLOY_WAIT_S for a deploy or
        # undeploy that holds it): what Serve runs is what a deploy before it started, so no
        # application is left running without its record.
        lease = self._take_lease(name, _UNDEPLOY_WAIT_S)
        if lease is None:
            raise GatewayError("conflict", f"another deploy or undeploy of '{name}' is in progress; try again when it ends")
        try:
            record = ray.get(registry.get.remote(name))
            apps = _app_statuses()
            owner = record["provider"] if record else (_deployment_view(apps[name])[0] if name in apps else None)
            if owner is None:
                raise GatewayError("not_found", f"no endpoint named '{name}'; GET /deployments lists them")
            if owner != provider.name:
                raise GatewayError("not_found", f"'{name}' is {indefinite(owner)} endpoint; use POST /{owner}/undeploy")
            dependents = ray.get(registry.dependents.remote(name))
            if dependents and not force:
                raise GatewayError("conflict", f"'{name}' is a fallback of {', '.join(dependents)}: deploy those without "
                                               f"it first, or undeploy with \"force\": true to take it out of their fallbacks")
        except BaseException:
            lease.release()
            raise
        try:
            if name in apps:
                _delete_app(name)
        finally:
            lease.stop()
            forgotten = ray.get(registry.finish.remote(name, None, lease.owner))
            self._on_change(name)
        if not forgotten:  # this process stalled past its lease and another deploy or undeploy took the name
            raise GatewayError("conflict", f"another deploy or undeploy of '{name}' took it over while this undeploy "
                                           f"waited; GET /deployments/{name} shows what runs now")
        body = {"ret": "ok", "chat_name": name, "provider": provider.name, "status": "DELETED"}
        if force:
            changed = ray.get(registry.drop_fallback.remote(name))
            for other in changed:
                self._on_change(other)
            if changed:
                body["removed_from_fallbacks_of"] = changed
        log.info("undeployed chat_name=%s provider=%s", name, provider.name)
        return body

    # -- the name's lease ------------------------------------------------------
    def _take_lease(self, name: str, wait_s: float) -> Optional[Lease]:
        """Claim ``name``'s lease (renewed until released), waiting up to ``wait_s``; None when still taken."""
        lease = Lease(self.cluster.registry(), endpoint_lease(name))
        deadline, delay = time.monotonic() + wait_s, 0.05
        while lease.claim() is not None:
            if time.monotonic() + delay > deadline:
                return None
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)
        return lease

    def _remove_failed_app(self, name: str) -> None:
        """Delete the application of ``name``'s failed deploy, under the name's lease (so never one a
        newer deploy started): now when the lease is free, else in the background once it is."""
        if not self._delete_if_failed(name, 0.0):
            threading.Thread(target=self._delete_if_failed, args=(name, _CLEANUP_WAIT_S), name=f"cleanup-{name}",
                             daemon=True).start()

    def _delete_if_failed(self, name: str, wait_s: float) -> bool:
        """Under the lease: delete ``name``'s application if its record still says its deploy failed.
        False when the lease stayed taken for ``wait_s``."""
        try:
            lease = self._take_lease(name, wait_s)
            if lease is None:
                return False
            try:
                record = ray.get(self.cluster.registry().get.remote(name))
                if record and record.get("status") == "DEPLOY_FAILED" and not record.get("pending") \
                        and name in _app_statuses():
                    serve.delete(name, _blocking=False)
            finally:
                lease.release()
        except Exception as exc:  # noqa: BLE001
            log.error("cleanup of failed deploy %s: %s", name, type(exc).__name__)
        return True

    # -- listing ------------------------------------------------------------
    def list(self) -> list[dict]:
        records = {r["chat_name"]: r for r in ray.get(self.cluster.registry().list.remote(), timeout=_CONTROLLER_WAIT_S)}
        apps = _app_statuses()
        for name, record in list(records.items()):
            records[name], apps = self._settled(name, record, apps)
        return [self._view(records.get(name), apps.get(name), name) for name in sorted(set(records) | set(apps))]

    def listing(self) -> list[dict]:
        """``list()`` as this process saw it within about a second (read-only: shared by every caller).

        For routes any client key may call (``GET /v1/models``): a burst costs the cluster one listing
        a second, and each caller waits at most ``_LISTING_WAIT_S`` (then 503 ``cluster_unavailable``
        with Retry-After). A deploy or undeploy through this process is listed at once.
        """
        return self._listing.get()

    def _settled(self, name: str, record: dict, apps: dict) -> tuple[dict, dict]:
        """A reader settles what a lost watcher left: (record, apps) as they are after that."""
        pending = record.get("pending")
        if pending and self._settle_if_done(name, pending["id"], apps.get(name), pending["deadline"]):
            return ray.get(self.cluster.registry().get.remote(name)) or record, _app_statuses()
        return record, apps

    @staticmethod
    def _view(record: Optional[dict], app, name: Optional[str] = None) -> dict:
        """What ``GET /deployments`` shows of one endpoint: the record, Serve's state, progress."""
        view = dict(record or {"chat_name": name})
        pending = view.pop("pending", None)
        if view.get("status") == "DEPLOY_FAILED":
            view["workers_running"] = 0
            return view
        if app is None:
            view.update(status="MISSING", workers_running=0)
            return view
        deployment, running = _deployment_view(app)
        view.setdefault("provider", deployment)
        view["workers_running"] = running
        if pending:
            view["status"] = "DEPLOYING" if pending["fresh"] else "UPDATING"
            view["progress"] = {"workers_running": running, "workers": pending["public"]["workers"],
                                "elapsed_s": round(time.time() - pending["started"], 1),
                                "deadline_in_s": round(pending["deadline"] - time.time(), 1),
                                "message": _message_of(app)[:500]}
            if not pending["fresh"]:
                view["pending_digest"] = pending["digest"]
        else:
            view["status"] = _status(app.status)
        return view

    def get(self, name: str) -> dict:
        record = ray.get(self.cluster.registry().get.remote(name))
        apps = _app_statuses()
        if record is None and name not in apps:
            raise GatewayError("not_found", f"no endpoint named '{name}'; GET /deployments lists them")
        if record is not None:
            record, apps = self._settled(name, record, apps)
        return self._view(record, apps.get(name), name)


def _message_of(app) -> str:
    """Serve's own words on an application (its deployment's message first)."""
    for dep in app.deployments.values():
        if dep.message:
            return str(dep.message)
    return str(app.message or _status(app.status))


def failure_of(app) -> dict:
    """``{"reason", "message"}`` of a failed application, from Serve's message.

    The traceback Serve keeps is not shown; the reason a replica gave is: a replica's
    constructor raises every failure as a ``DeployFailure`` with the spec's secrets redacted
    (``providers.base.construction_failure``). Anything else (a replica that died, a failed
    health check) shows the traceback's last line, which Serve wrote, not an SDK.
    """
    text = _message_of(app)
    failure = DeployFailure.parse(text)
    if failure is not None:
        return {"reason": failure.reason, "message": failure.message[:500]}
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else "the replicas failed to start"
    return {"reason": "replica_failed", "message": f"a replica failed to start: {last[:400]}"}


def bind_endpoint(provider: Provider, spec: DeploySpec, settings: Settings):
    """The bound Serve application of one endpoint: the key travels only in ``bind`` args."""
    from .replica import ChatDeployment
    from .retry import RetryPolicy

    policy = RetryPolicy(max_retries=spec.max_retries, deadline_s=spec.timeout, retry_after_cap_s=settings.retry_after_cap_s)
    return ChatDeployment.options(name=provider.name, **provider.replica_options(spec, settings)).bind(provider, spec, policy)
