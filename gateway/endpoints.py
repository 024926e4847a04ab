"""Deploy, update, undeploy and list endpoints (one Serve application per ``chat_name``).

``Endpoints`` is what the routes call. A deploy reads as its steps: check (``gateway.deploy_checks``), take
the name's lease (``gateway.leases``), start (``gateway.deploys``), follow. The registry is called through
``RegistryClient`` only, Serve through ``gateway.serve_apps``; what a listing shows is ``gateway.endpoint_views``.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional, Union

from providers.base import Provider, indefinite
from providers.specs import DeploySpec

from contract.errors import GatewayError

from . import serve_apps
from .cluster import Cluster
from .cluster_answers import SharedAnswer
from .config import Settings
from .deploy_checks import check_deploy, check_fallbacks, check_keys, check_resources, check_same_provider, conflict
from .deploys import Deploys
from .endpoint_views import view
from .key_pools import KeyPools
from .leases import Lease, endpoint_lease
from .records import EndpointRecord
from .registry_client import RegistryClient
from .serve_apps import running_as, status_of

log = logging.getLogger("gateway.endpoints")

#: ``Endpoints.listing``: one listing is reused this long, and a caller waits at most this long for one
_LISTING_FRESH_S = 1.0
_LISTING_WAIT_S = 1.5

#: how long an undeploy waits for a deploy or undeploy of the same name to end (then 409)
_UNDEPLOY_WAIT_S = 10.0


class Endpoints:
    def __init__(self, cluster: Cluster, settings: Settings, on_change: Callable[[str], None] = lambda name: None,
                 registry: Optional[RegistryClient] = None) -> None:
        self.cluster = cluster
        self.settings = settings
        #: every call of this process's deploys, undeploys and listings to the registry actor
        self.registry = registry or RegistryClient(cluster)
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
        self.deploys = Deploys(self.registry, settings, self.key_pools, changed)

    # -- deploy -------------------------------------------------------------
    def deploy(self, provider: Provider, spec: DeploySpec) -> dict:
        """Start a deploy and wait up to ``deploy_wait_s`` for it.

        Answers the endpoint's view: ``status`` is ``RUNNING``, or ``DEPLOYING``/``UPDATING``
        when it is still loading (a watcher thread, or the next reader, settles it). A deploy
        that fails within the wait raises ``deploy_failed`` with a ``reason``; a new endpoint
        that fails leaves nothing behind in the cluster. The spec of a running endpoint again
        (same digest, key included) changes nothing and answers its view with ``unchanged``.
        """
        digest, unchanged = self._check(provider, spec)
        if unchanged is not None:
            return unchanged
        lease, existing = self._take_name(provider, spec.chat_name)
        try:
            started = self._start(provider, spec, digest, lease, existing)
        finally:
            lease.stop()  # (released by now: by ``finish``, or as it failed)
        if isinstance(started, dict):  # the same deploy again: the view of the one under way
            return started
        return self._follow(provider, spec, *started)

    def _check(self, provider: Provider, spec: DeploySpec) -> tuple[str, Optional[dict]]:
        """(the spec's digest, the view of its endpoint when it already runs as asked: nothing to do).

        Fails here, before the cluster, on a spec the adapter refuses; then on a name another provider runs.
        """
        name = spec.chat_name
        check_deploy(provider, spec, provider.check_deploy)
        self.cluster.ensure_up()  # (connects: Serve is asked next)
        apps = serve_apps._app_statuses()
        check_same_provider(name, provider.name, running_as(apps.get(name)))
        digest = self._digest(spec)
        unchanged = self._unchanged(provider, spec, digest, apps.get(name))
        # the key check costs a provider call: not for an unchanged endpoint (every worker's start
        # applies the endpoints file again), only for what is about to be deployed; a wrong key
        # fails here, not at the first caller's chat
        if unchanged is None and getattr(spec, "verify_key", False):
            check_keys(provider, spec)
        return digest, unchanged

    def _take_name(self, provider: Provider, name: str) -> tuple[Lease, Optional[EndpointRecord]]:
        """The name's lease, renewed while this deploy holds it, and the name's record as it is under it.

        The records and Serve's applications are read again under it (a deploy or undeploy may have
        changed them since the looks of ``_check``).
        """
        lease = Lease(self.registry, endpoint_lease(name), self.settings.lease_ttl_s)
        begun = self.registry.begin(name, provider.name, lease.owner, lease.ttl_s)
        if begun.state == "conflict":
            raise conflict(name, begun.record.provider)
        if begun.state == "busy":
            raise GatewayError("conflict", f"another deploy or undeploy of '{name}' is in progress; try again when it ends")
        return lease.hold(), begun.record

    def _start(self, provider: Provider, spec: DeploySpec, digest: str, lease: Lease,
               existing: Optional[EndpointRecord]) -> Union[dict, tuple[str, float]]:
        """Under the name's lease: check again, start the application and record the pending deploy.

        Answers (deploy id, deadline), or the endpoint's view when the same deploy is under way
        already. Releases the lease on every way out (``finish`` releases it with the record).
        """
        name = spec.chat_name
        apps: dict = {}
        try:
            apps = serve_apps._app_statuses()
            check_same_provider(name, provider.name, running_as(apps.get(name)))
            pending = existing.pending_deploy if existing is not None else None
            if pending and pending.deadline > time.time():
                if pending.digest == digest:  # the same deploy again: report on the one under way
                    lease.release()
                    return view(existing, apps.get(name))
                raise GatewayError("conflict", f"'{name}' is still deploying; wait for it (GET /deployments/{name}) "
                                               f"or undeploy it first")
            self._check_fallbacks(name, spec.fallbacks)
            options = check_resources(provider, spec, self.settings, serve_apps.live_nodes())
        except BaseException as err:
            self.deploys.refused(provider, spec, lease, existing, err, apps)
            raise
        return self.deploys.launch(provider, spec, digest, lease, existing, apps, options)

    def _follow(self, provider: Provider, spec: DeploySpec, deploy_id: str, deadline: float) -> dict:
        """Wait up to ``deploy_wait_s`` for the deploy (then a watcher thread keeps at it); its view, or its failure."""
        name = spec.chat_name
        log.info("deploying chat_name=%s provider=%s model=%s workers=%d", name, provider.name, spec.model_name, spec.workers)
        status = self.deploys.follow(name, deploy_id, deadline, self.settings.deploy_wait_s)
        if status is None:  # still loading: keep watching in the background
            self.deploys.follow_in_background(name, deploy_id, deadline)
        shown = self.get(name)
        if status in ("DEPLOY_FAILED", "UPDATE_FAILED"):
            failure = shown.get("failure") or shown.get("last_update_failure") or {}
            raise GatewayError("deploy_failed", failure.get("message", f"deploy of '{name}' failed"),
                               reason=failure.get("reason", "replica_failed"), provider=provider.name)
        return shown

    def check_key(self, provider: Provider, spec: DeploySpec) -> Optional[str]:
        """A key added to a pool (``gateway.key_routes``): the deploy-time check of ``spec``'s one key; the
        warning of a check that could not tell, or None."""
        return check_deploy(provider, spec, provider.verify_key)

    def _check_fallbacks(self, name: str, fallbacks: list[str]) -> None:
        """Fallbacks must name deployed endpoints (the registry is read only when there are some to check)."""
        check_fallbacks(name, fallbacks, self.registry.list)

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
        if app is None or status_of(app.status) != "RUNNING":
            return None
        record = self.registry.get(spec.chat_name)
        if not record or record.pending or record.status != "RUNNING" \
                or record.provider != provider.name or record.config_digest != digest \
                or list(record.fallbacks) != list(spec.fallbacks):
            return None
        return {**view(record, app), "unchanged": True}

    # -- undeploy -----------------------------------------------------------
    def undeploy(self, provider: Provider, name: str, force: bool = False) -> dict:
        """Remove an endpoint in any state (a deploy still loading is cancelled).

        An endpoint that others name as a fallback is kept (409, naming them) unless
        ``force``: then it is taken out of their fallbacks too.
        """
        # Everything is read under the name's lease (waiting up to _UNDEPLOY_WAIT_S for a deploy or
        # undeploy that holds it): what Serve runs is what a deploy before it started, so no
        # application is left running without its record.
        lease = self.deploys.take_lease(name, _UNDEPLOY_WAIT_S)
        if lease is None:
            raise GatewayError("conflict", f"another deploy or undeploy of '{name}' is in progress; try again when it ends")
        try:
            record = self.registry.get(name)
            apps = serve_apps._app_statuses()
            owner = record.provider if record else running_as(apps.get(name))
            if owner is None:
                raise GatewayError("not_found", f"no endpoint named '{name}'; GET /deployments lists them")
            if owner != provider.name:
                raise GatewayError("not_found", f"'{name}' is {indefinite(owner)} endpoint; use POST /{owner}/undeploy")
            dependents = self.registry.dependents(name)
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
                serve_apps.delete_app(name, max(60.0, float((record.timeout if record else None) or 60) + 35))
        finally:
            lease.stop()
            forgotten = self.registry.finish(name, None, lease.owner)
            self._on_change(name)
            if forgotten:
                self.key_pools.drop(name)  # (its keys leave the cluster's memory with it)
        if not forgotten:  # this process stalled past its lease and another deploy or undeploy took the name
            raise GatewayError("conflict", f"another deploy or undeploy of '{name}' took it over while this undeploy "
                                           f"waited; GET /deployments/{name} shows what runs now")
        body = {"ret": "ok", "chat_name": name, "provider": provider.name, "status": "DELETED"}
        if force:
            changed = self.registry.drop_fallback(name)
            for other in changed:
                self._on_change(other)
            if changed:
                body["removed_from_fallbacks_of"] = changed
        log.info("undeployed chat_name=%s provider=%s", name, provider.name)
        return body

    # -- listing ------------------------------------------------------------
    def list(self) -> list[dict]:
        records = {r.chat_name: r for r in self.registry.list()}
        apps, replicas = serve_apps.serve_state()
        for name, record in list(records.items()):
            records[name], apps, replicas = self._settled(name, record, apps, replicas)
        views = [view(records.get(name), apps.get(name), name, replicas.get(name))
                 for name in sorted(set(records) | set(apps))]
        return self._with_keys(views)

    def _with_keys(self, views: list[dict]) -> list[dict]:
        """Each hosted endpoint's ``keys`` as its pool's keys (``KeyPool`` views: fingerprint, weight, state,
        reason, times, calls); where the keeper does not answer within 2 s, ``keys`` stays their number."""
        pooled = [v["chat_name"] for v in views if "key_fingerprint" in v]
        found = self.key_pools.views(pooled) if pooled else {}
        for shown in views:
            if shown["chat_name"] in found:
                shown["keys"] = found[shown["chat_name"]]
        return views

    def listing(self) -> list[dict]:
        """``list()`` as this process saw it within about a second (read-only: shared by every caller).

        For routes any client key may call (``GET /v1/models``): a burst costs the cluster one listing
        a second, and each caller waits at most ``_LISTING_WAIT_S`` (then 503 ``cluster_unavailable``
        with Retry-After). A deploy or undeploy through this process is listed at once.
        """
        return self._listing.get()

    def _settled(self, name: str, record: EndpointRecord, apps: dict,
                 replicas: dict) -> tuple[EndpointRecord, dict, dict]:
        """A reader settles what a lost watcher left: (record, apps, replicas) as they are after that."""
        pending = record.pending_deploy
        if pending and self.deploys.settle_if_done(name, pending.id, apps.get(name), pending.deadline):
            return (self.registry.get(name) or record, *serve_apps.serve_state())
        return record, apps, replicas

    def record(self, name: str) -> EndpointRecord:
        """``name``'s registry record (no key in it), or 404 ``not_found``."""
        record = self.registry.get(name)
        if record is None:
            raise GatewayError("not_found", f"no endpoint named '{name}'; GET /deployments lists them")
        return record

    def get(self, name: str) -> dict:
        record = self.registry.get(name)
        apps, replicas = serve_apps.serve_state()
        if record is None and name not in apps:
            raise GatewayError("not_found", f"no endpoint named '{name}'; GET /deployments lists them")
        if record is not None:
            record, apps, replicas = self._settled(name, record, apps, replicas)
        return self._with_keys([view(record, apps.get(name), name, replicas.get(name))])[0]
