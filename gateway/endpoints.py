"""Deploy, update, undeploy and list endpoints (one Serve application per ``chat_name``)."""
from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Callable, Optional

import ray
from ray import serve

from providers.base import DeployFailure, DeploySpec, Provider, construction_failure, indefinite, key_fingerprint

from .cluster import Cluster, SharedAnswer
from .config import Settings
from contract.errors import GatewayError
from .pool_keeper import KeyPools, generation_of
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
    return serve_state()[0]


def serve_state(timeout: float = _CONTROLLER_WAIT_S) -> tuple[dict, dict[str, list[dict]]]:
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
        replicas[name] = [{"state": _status(r.get("state")), "node_ip": r.get("node_ip"), "node_id": r.get("node_id")}
                          for dep in (app.get("deployments") or {}).values() for r in dep.get("replicas") or []]
    return apps, replicas


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
        #: the endpoints' key pools, shared by the cluster (``gateway.pool_keeper``)
        self.key_pools = KeyPools(cluster, settings)

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
            self._check_keys(provider, spec)
        # The name's lease, renewed while this deploy holds it: the records and Serve's applications
        # are read again under it (a deploy or undeploy may have changed them since the looks above).
        lease = Lease(registry, endpoint_lease(name), self.settings.lease_ttl_s)
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
            options = self._check_resources(provider, spec)
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
        pooled = hasattr(spec, "pool")  # (a hosted provider's keys: a pool in the keeper, one generation per deploy)
        generation = generation_of(digest) if pooled else None
        try:
            app = bind_endpoint(provider, spec, self.settings, options, generation)
            if fresh and name in apps:  # what a failed deploy left: start from nothing
                _delete_app(name)
            # Nothing starts without the lease: renewed (for its whole TTL from now) just before.
            held = lease.renew()
            if held:
                if pooled:
                    self.key_pools.put(spec, generation)  # (before its replicas start: they find it there)
                serve._run(app, name=name, route_prefix=None, _blocking=False)
        except BaseException as exc:
            if fresh:  # nothing half-deploys: no application runs without its record (and with its key)
                try:
                    if name in _app_statuses():
                        serve.delete(name, _blocking=False)
                except Exception as cleanup:  # noqa: BLE001
                    log.error("cleanup of failed deploy %s: %s", name, type(cleanup).__name__)
                if pooled:
                    self.key_pools.drop(name)
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

    def _check_keys(self, provider: Provider, spec: DeploySpec) -> None:
        """The deploy-time key check of every key of the spec's pool (at most 8 at a time).

        One key (``api_key``) fails as it always did; a key of ``api_keys`` the provider refuses fails
        the deploy naming its entry number and fingerprint (never the key).
        """
        keys = [key for key, _ in spec.pool()] if getattr(spec, "api_keys", None) else None
        if keys is None:
            self._check(provider, spec, provider.verify_key)
            return

        def check(numbered: tuple[int, str]) -> Optional[GatewayError]:
            number, key = numbered
            try:
                self._check(provider, spec.for_key(key), provider.verify_key)
            except GatewayError as err:
                said = spec.scrub(f"api_keys entry {number} ({key_fingerprint(key)}): {err.info.message}")
                fields = ["api_keys" if f == "api_key" else f for f in err.info.fields or []] or None
                return GatewayError.from_info(err.info.model_copy(update={"message": said, "fields": fields}))
            return None

        with ThreadPoolExecutor(max_workers=min(8, len(keys)), thread_name_prefix="key-check") as pool:
            failures = [f for f in pool.map(check, enumerate(keys, 1)) if f is not None]
        if failures:
            raise failures[0]

    def check_key(self, provider: Provider, spec: DeploySpec) -> Optional[str]:
        """A key added to a pool (``gateway.key_routes``): the deploy-time check of ``spec``'s one key; the
        warning of a check that could not tell, or None."""
        return self._check(provider, spec, provider.verify_key)

    def _check(self, provider: Provider, spec: DeploySpec, check: Callable[[DeploySpec], Optional[str]]) -> Optional[str]:
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
            warning = spec.scrub(warning)
            log.warning("deploy of %s: %s", spec.chat_name, warning)
        return warning

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

    def _check_resources(self, provider: Provider, spec: DeploySpec) -> dict:
        """Refuse at once what the cluster can never place (it would wait forever); answer the Serve
        options the replicas are deployed with (``placement_options``: what is checked is what starts).

        Every resource a worker asks for counts: CPUs, GPUs, and the custom ones (``resources``, a
        provider's own). One that no live node has names the nodes that carry it (none, or too little).
        """
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        options = placement_options(provider, spec, self.settings, nodes)
        actor = options.get("ray_actor_options") or {}
        bundles = options.get("placement_group_bundles")
        need: dict[str, float] = {}
        for bundle in bundles or [{"CPU": actor.get("num_cpus", 1), "GPU": actor.get("num_gpus", 0),
                                   **(actor.get("resources") or {})}]:
            for key, value in bundle.items():
                if value:
                    need[key] = need.get(key, 0) + float(value)
        have = [n.get("Resources", {}) for n in nodes]
        total = {key: sum(n.get(key, 0) for n in have) for key in need}
        workers = spec.workers
        for key, per in sorted(need.items(), key=lambda kv: kv[0] != "GPU"):
            if any(n.get(key, 0) >= per for n in have) and total[key] >= per * workers:
                continue
            needed = f"{workers} worker(s) x {per:g} = {per * workers:g} needed, each worker on one node"
            if key in ("GPU", "CPU"):
                noun = {"GPU": "GPUs", "CPU": "CPUs"}[key]
                amounts = ", ".join(f"{n.get(key, 0):g}" for n in have) or "no nodes"
                message = f"not enough {noun} in the cluster for '{spec.chat_name}': {needed}; the nodes have {amounts}"
            else:
                holders = [f"{n.get('NodeManagerAddress') or '?'} ({(n.get('NodeID') or '')[:8]}) has "
                           f"{n['Resources'][key]:g}" for n in nodes if (n.get("Resources") or {}).get(key)]
                where = ("the nodes with it: " + ", ".join(holders)) if holders else "no live node has it"
                message = f"not enough '{key}' resources in the cluster for '{spec.chat_name}': {needed}; {where}"
                if key in spec.resources:
                    message += (f". A node carries it when started with ray start --resources='{{\"{key}\": N}}' "
                                f"(a KubeRay group's rayStartParams; GATEWAY_RAY_RESOURCES for the embedded head)")
            raise GatewayError("deploy_failed", message,
                               reason="insufficient_gpus" if key == "GPU" else "insufficient_resources",
                               provider=provider.name, fields=["resources"] if key in spec.resources else None)
        return options

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
                # (Serve gives each replica its graceful shutdown, the call timeout + 5 s, even one that never
                # started because no node could take it: wait past that)
                _delete_app(name, max(60.0, float((record or {}).get("timeout") or 60) + 35))
        finally:
            lease.stop()
            forgotten = ray.get(registry.finish.remote(name, None, lease.owner))
            self._on_change(name)
            if forgotten:
                self.key_pools.drop(name)  # (its keys leave the cluster's memory with it)
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
        lease = Lease(self.cluster.registry(), endpoint_lease(name), self.settings.lease_ttl_s)
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
                    self.key_pools.drop(name)
            finally:
                lease.release()
        except Exception as exc:  # noqa: BLE001
            log.error("cleanup of failed deploy %s: %s", name, type(exc).__name__)
        return True

    # -- listing ------------------------------------------------------------
    def list(self) -> list[dict]:
        records = {r["chat_name"]: r for r in ray.get(self.cluster.registry().list.remote(), timeout=_CONTROLLER_WAIT_S)}
        apps, replicas = serve_state()
        for name, record in list(records.items()):
            records[name], apps, replicas = self._settled(name, record, apps, replicas)
        views = [self._view(records.get(name), apps.get(name), name, replicas.get(name))
                 for name in sorted(set(records) | set(apps))]
        return self._with_keys(views)

    def _with_keys(self, views: list[dict]) -> list[dict]:
        """Each hosted endpoint's ``keys`` as its pool's keys (``KeyPool`` views: fingerprint, weight, state,
        reason, times, calls); where the keeper does not answer within 2 s, ``keys`` stays their number."""
        pooled = [v["chat_name"] for v in views if "key_fingerprint" in v]
        found = self.key_pools.views(pooled) if pooled else {}
        for view in views:
            if view["chat_name"] in found:
                view["keys"] = found[view["chat_name"]]
        return views

    def listing(self) -> list[dict]:
        """``list()`` as this process saw it within about a second (read-only: shared by every caller).

        For routes any client key may call (``GET /v1/models``): a burst costs the cluster one listing
        a second, and each caller waits at most ``_LISTING_WAIT_S`` (then 503 ``cluster_unavailable``
        with Retry-After). A deploy or undeploy through this process is listed at once.
        """
        return self._listing.get()

    def _settled(self, name: str, record: dict, apps: dict, replicas: dict) -> tuple[dict, dict, dict]:
        """A reader settles what a lost watcher left: (record, apps, replicas) as they are after that."""
        pending = record.get("pending")
        if pending and self._settle_if_done(name, pending["id"], apps.get(name), pending["deadline"]):
            return (ray.get(self.cluster.registry().get.remote(name)) or record, *serve_state())
        return record, apps, replicas

    @staticmethod
    def _view(record: Optional[dict], app, name: Optional[str] = None, replicas: Optional[list[dict]] = None) -> dict:
        """What ``GET /deployments`` shows of one endpoint: the record, Serve's state, progress.

        With ``replicas`` (``serve_state``): each worker's state and node (``replicas``), and when fewer
        run than wanted, how many and why (``workers_missing``: ``{"count", "why"}``).
        """
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
        if replicas is not None:
            view["replicas"] = [dict(r) for r in replicas]
            wanted = pending["public"]["workers"] if pending else view.get("workers")
            resources = (pending["public"] if pending else view).get("resources")
            missing = workers_missing(wanted, replicas, _message_of(app), resources)
            if missing:
                view["workers_missing"] = missing
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

    def record(self, name: str, timeout: float = 10.0) -> dict:
        """``name``'s registry record (no key in it), or 404 ``not_found``."""
        record = ray.get(self.cluster.registry().get.remote(name), timeout=timeout)
        if record is None:
            raise GatewayError("not_found", f"no endpoint named '{name}'; GET /deployments lists them")
        return record

    def get(self, name: str) -> dict:
        record = ray.get(self.cluster.registry().get.remote(name))
        apps, replicas = serve_state()
        if record is None and name not in apps:
            raise GatewayError("not_found", f"no endpoint named '{name}'; GET /deployments lists them")
        if record is not None:
            record, apps, replicas = self._settled(name, record, apps, replicas)
        return self._with_keys([self._view(record, apps.get(name), name, replicas.get(name))])[0]


#: the states of a replica that is on its way to running
_COMING = ("STARTING", "UPDATING", "RECOVERING")


def workers_missing(wanted: Optional[int], replicas: list[dict], serve_said: str = "",
                    resources: Optional[dict] = None) -> Optional[dict]:
    """``{"count", "why"}`` when fewer of ``replicas`` run than ``wanted``, else None. Pure: no cluster.

    Why, in words: workers no node took yet (a replica Serve started but Ray has not placed: no live
    node has the free resources it needs; Serve's own words follow once it says more), workers starting
    on their nodes (loading), workers Serve has not started yet (or stopping ones).
    """
    running = sum(1 for r in replicas if r.get("state") == "RUNNING")
    if not wanted or running >= wanted:
        return None
    count = wanted - running
    unplaced = [r for r in replicas if r.get("state") in _COMING and not r.get("node_id")]
    starting = [r for r in replicas if r.get("state") in _COMING and r.get("node_id")]
    why = []
    if unplaced:
        needs = f" (custom resources: {', '.join(f'{k} {v:g}' for k, v in sorted(resources.items()))})" if resources else ""
        why.append(f"{len(unplaced)} pending: no live node has the free resources each worker needs{needs}; "
                   f"`ray status` shows what the nodes have")
        said = " ".join(serve_said.split())
        if "schedul" in said:  # (Serve's words on replicas it could not place: what each needs, what is free)
            why.append(f"Serve says: {said[:400]}")
    if starting:
        ips = sorted({r.get("node_ip") or "?" for r in starting})
        why.append(f"{len(starting)} starting on {', '.join(ips)}")
    rest = count - len(unplaced) - len(starting)
    if rest > 0:
        why.append(f"{rest} not started by Serve yet")
    return {"count": count, "why": "; ".join(why)}


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


#: labels Ray 2.60 gives nodes itself: every node its id (``ray._raylet.RAY_NODE_ID_KEY``); a node whose GPUs
#: it recognises, their type (``RAY_NODE_ACCELERATOR_TYPE_KEY``, e.g. ``H100``); a KubeRay pod, its worker
#: group (``RAY_NODE_GROUP_KEY``, from the pod's ``RAY_NODE_TYPE_NAME``)
NODE_ID_LABEL = "ray.io/node-id"
ACCELERATOR_LABEL = "ray.io/accelerator-type"
NODE_GROUP_LABEL = "ray.io/node-group"
#: what a label value may be (Kubernetes' syntax, as Ray checks it)
_LABEL_VALUE = re.compile(r"[a-zA-Z0-9]([a-zA-Z0-9_.-]{0,61}[a-zA-Z0-9])?")


def avoid_gpu_nodes(nodes: list[dict]) -> Optional[dict]:
    """The ``ray_actor_options`` that keep a SaaS replica off the GPU nodes of ``nodes`` (``ray.nodes()``,
    the live ones), or None when there is nothing to avoid (no GPU node, or no other node with CPUs).

    Ray 2.60 has no resource a replica could ask for to stay away from GPUs (a request can only require,
    and Serve places replicas with its SPREAD strategy, which ignores Ray's own preference of CPU nodes
    for CPU work), and no label on every GPU node. What it has are labels (``label_selector``): every node
    carries its id, and many a GPU node its GPUs' type and its KubeRay group. So at deploy the replicas
    get a selector that excludes the GPU nodes live now (by ``ray.io/node-id``), and any node of their GPU
    types and KubeRay groups (by ``ray.io/accelerator-type``, ``ray.io/node-group``: the nodes a GPU group
    adds later; a value a node without GPUs shares is not excluded), with a fallback that takes any node:
    preferred, not required. When the other nodes are full or gone the replicas run on a GPU node rather
    than not at all (and Serve stops those first when it scales down); a cluster of GPU nodes only runs
    them as before. A GPU node of a new type and group that joins after the deploy is not excluded until
    the endpoint is deployed again. An operator who wants a hard rule gives the deploy ``resources``
    that only CPU nodes carry: those replace this default.
    """
    alive = [n for n in nodes if n.get("Alive", True)]
    gpu = [n for n in alive if (n.get("Resources") or {}).get("GPU", 0) > 0]
    others = [n for n in alive if not (n.get("Resources") or {}).get("GPU", 0) and (n.get("Resources") or {}).get("CPU", 0) > 0]
    if not gpu or not others:
        return None
    selector = {NODE_ID_LABEL: f"!in({','.join(sorted(n['NodeID'] for n in gpu))})"}
    for label in (ACCELERATOR_LABEL, NODE_GROUP_LABEL):
        def values(group: list[dict]) -> set[str]:
            return {str((n.get("Labels") or {}).get(label) or "") for n in group} - {""}

        excluded = sorted(v for v in values(gpu) - values(others) if _LABEL_VALUE.fullmatch(v))
        if excluded:
            selector[label] = f"!in({','.join(excluded)})"
    return {"label_selector": selector, "fallback_strategy": [{"label_selector": {}}]}


def placement_options(provider: Provider, spec: DeploySpec, settings: Settings,
                      nodes: Optional[list[dict]] = None) -> dict:
    """The Serve options of ``spec``'s replicas: the provider's, with where they may run.

    ``spec.resources``: each replica asks Ray for them (``ray_actor_options["resources"]``; with a
    placement group, in its first bundle too, where Serve puts the replica). Without them, a SaaS
    provider's replicas keep off the GPU nodes of ``nodes`` (``avoid_gpu_nodes``; no ``nodes``: no
    such default).
    """
    options = dict(provider.replica_options(spec, settings))
    actor = dict(options.get("ray_actor_options") or {})
    bundles = options.get("placement_group_bundles")
    if spec.resources:
        actor["resources"] = {**(actor.get("resources") or {}), **spec.resources}
        if bundles:
            options["placement_group_bundles"] = [{**bundles[0], **spec.resources}, *bundles[1:]]
    elif provider.kind == "saas" and nodes and not bundles and "label_selector" not in actor:
        actor.update(avoid_gpu_nodes(nodes) or {})
    options["ray_actor_options"] = actor
    return options


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
