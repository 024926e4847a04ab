"""One deploy after its checks: its application started under the name's lease, followed until Serve says it
ended, and settled exactly once; a failed new endpoint's application removed.

``Endpoints.deploy`` (``gateway.endpoints``) checks, takes the name's lease and calls ``Deploys.launch``; its
watcher thread, and every reader that finds a deploy whose watcher died, settle it here (``settle_if_done``).
The registry is read and written through ``RegistryClient``, Serve through ``gateway.serve_apps``.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Callable, Optional

from providers.base import Provider
from providers.specs import DeploySpec

from contract.errors import GatewayError

from . import serve_apps
from .config import Settings
from .leases import Lease, endpoint_lease
from .key_pools import KeyPools
from .pool_keeper import generation_of
from .records import EndpointRecord, PendingDeploy
from .registry_client import RegistryClient
from .serve_apps import bind_endpoint, failure_of, message_of, status_of

log = logging.getLogger("gateway.endpoints")

#: how long the cleanup of a failed deploy's application waits for the name's lease in the background
_CLEANUP_WAIT_S = 120.0


def now_iso() -> str:
    """The record's times: UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Deploys:
    """Starting, following and settling deploys (shared by this process's ``Endpoints``)."""

    def __init__(self, registry: RegistryClient, settings: Settings, key_pools: KeyPools,
                 on_change: Callable[[str], None]) -> None:
        self.registry, self.settings, self.key_pools, self._on_change = registry, settings, key_pools, on_change

    # -- the name's lease ------------------------------------------------------
    def take_lease(self, name: str, wait_s: float) -> Optional[Lease]:
        """Claim ``name``'s lease (renewed until released), waiting up to ``wait_s``; None when still taken."""
        lease = Lease(self.registry, endpoint_lease(name), self.settings.lease_ttl_s)
        deadline, delay = time.monotonic() + wait_s, 0.05
        while lease.claim() is not None:
            if time.monotonic() + delay > deadline:
                return None
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)
        return lease

    # -- start -----------------------------------------------------------------
    def refused(self, provider: Provider, spec: DeploySpec, lease: Lease, existing: Optional[EndpointRecord],
                err: BaseException, apps: dict) -> None:
        """A check under the lease refused the deploy: release the lease. A new endpoint that failed its
        checks (``deploy_failed``) is recorded as failed, with nothing started: GET /deployments/<name>
        still says why."""
        name = spec.chat_name
        if isinstance(err, GatewayError) and err.type == "deploy_failed" \
                and (existing is None or existing.status == "DEPLOY_FAILED") \
                and name not in apps:  # nothing was started; GET /deployments/<name> still says why
            now = now_iso()
            lease.stop()  # (before ``finish`` releases it: no renewal takes it again)
            failure = {"reason": err.info.reason, "message": err.info.message}
            self.registry.finish(name, EndpointRecord.failed(name, provider.name, spec.public(), failure, now), lease.owner)
            self._on_change(name)
        else:
            lease.release()

    def launch(self, provider: Provider, spec: DeploySpec, digest: str, lease: Lease,
               existing: Optional[EndpointRecord], apps: dict, options: dict) -> tuple[str, float]:
        """Under the name's lease, checked: start the application and record the pending deploy.

        Answers (deploy id, deadline). Releases the lease on every way out (``finish`` releases it with the
        record); nothing half-deploys: no application runs without its record (and with its key).
        """
        name = spec.chat_name
        # An update keeps the serving replicas until the new ones run; anything else starts anew.
        fresh = not (name in apps and (existing is None or existing.status == "RUNNING"))
        now = now_iso()
        public = {**spec.public(), "provider": provider.name}
        pending = PendingDeploy(id=uuid.uuid4().hex, fresh=fresh, public=public, digest=digest,
                                started=time.time(), deadline=time.time() + spec.deploy_timeout)
        if fresh:
            record = EndpointRecord.deploying(name, public, digest, pending, now)
        else:  # (no record: an application the registry forgot, e.g. after the registry restarted)
            record = (existing or EndpointRecord.adopted(name, public, now)).updating(pending)
        pooled = hasattr(spec, "pool")  # (a hosted provider's keys: a pool in the keeper, one generation per deploy)
        generation = generation_of(digest) if pooled else None
        try:
            app = bind_endpoint(provider, spec, self.settings, options, generation)
            if fresh and name in apps:  # what a failed deploy left: start from nothing
                serve_apps.delete_app(name)
            # Nothing starts without the lease: renewed (for its whole TTL from now) just before.
            held = lease.renew()
            if held:
                if pooled:
                    self.key_pools.put(spec, generation)  # (before its replicas start: they find it there)
                serve_apps.run_app(app, name)
        except BaseException as exc:
            self._undo(spec, lease, existing, fresh, pooled)
            if not isinstance(exc, Exception):
                raise
            raise GatewayError("internal_error", spec.scrub(f"deploy of '{name}' failed: {exc}")[:500]) from None
        if not held:  # another deploy or undeploy holds the name now (this process stalled): leave it to that one
            raise GatewayError("conflict", f"another deploy or undeploy of '{name}' took it over; try again when it ends")
        lease.stop()
        if not self.registry.finish(name, record, lease.owner):  # (the same: its lease was taken)
            log.error("deploy of %s: its lease was taken while it started the application", name)
        self._on_change(name)
        return pending.id, pending.deadline

    def _undo(self, spec: DeploySpec, lease: Lease, existing: Optional[EndpointRecord], fresh: bool,
              pooled: bool) -> None:
        """Starting failed: a new endpoint's application and key pool go; the record goes back to ``existing``."""
        name = spec.chat_name
        if fresh:  # nothing half-deploys: no application runs without its record (and with its key)
            try:
                if name in serve_apps._app_statuses():
                    serve_apps.delete_app_nowait(name)
            except Exception as cleanup:  # noqa: BLE001
                log.error("cleanup of failed deploy %s: %s", name, type(cleanup).__name__)
            if pooled:
                self.key_pools.drop(name)
        lease.stop()
        self.registry.finish(name, existing if not fresh else None, lease.owner)
        self._on_change(name)

    # -- follow and settle --------------------------------------------------------
    def follow(self, name: str, deploy_id: str, deadline: float, wait: Optional[float]) -> Optional[str]:
        """Poll Serve until the deploy ends (or ``wait`` runs out: None); settle it once."""
        until = time.monotonic() + wait if wait is not None else float("inf")  # settles by the deadline anyway
        delay = 0.02
        try:
            while True:
                app = serve_apps._app_statuses().get(name)
                settled = self.settle_if_done(name, deploy_id, app, deadline)
                if settled is not False:
                    return settled
                if time.monotonic() >= until:
                    return None
                time.sleep(delay)
                delay = min(delay * 1.5, 0.5 if wait is not None else 2.0)
        except Exception as exc:  # noqa: BLE001 - a watcher never dies loudly; readers settle too
            log.warning("watching the deploy of %s stopped: %s", name, type(exc).__name__)
            return None

    def follow_in_background(self, name: str, deploy_id: str, deadline: float) -> None:
        """Keep watching a deploy still loading (a watcher thread: it settles by the deadline)."""
        threading.Thread(target=self.follow, args=(name, deploy_id, deadline, None), name=f"deploy-{name}",
                         daemon=True).start()

    def settle_if_done(self, name: str, deploy_id: str, app, deadline: float):
        """Settle the pending deploy when Serve says it ended or its time is up.

        Answers the settled status, None when someone else settled it (or it was
        undeployed), or False while it is still under way.
        """
        status = status_of(app.status) if app is not None else None
        if status == "RUNNING":
            outcome = self.registry.settle(name, deploy_id, True, None, now_iso())
        elif status in ("DEPLOY_FAILED", "UNHEALTHY") or time.time() > deadline or app is None:
            if app is None:
                failure = {"reason": "replica_failed", "message": f"the application of '{name}' disappeared while deploying"}
            elif status in ("DEPLOY_FAILED", "UNHEALTHY"):
                failure = failure_of(app)
            else:
                failure = {"reason": "timeout", "message": f"'{name}' was not running within its deploy_timeout; "
                                                            f"Serve said: {message_of(app)[:400]}"}
            outcome = self.registry.settle(name, deploy_id, False, failure, now_iso())
            if outcome == "DEPLOY_FAILED" and app is not None:  # nothing half-deploys: the failed application goes,
                self._remove_failed_app(name)                      # the failure report stays
            if outcome:
                log.error("deploy failed chat_name=%s reason=%s", name, failure["reason"])
        else:
            return False
        if outcome:
            self._on_change(name)
        return outcome

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
            lease = self.take_lease(name, wait_s)
            if lease is None:
                return False
            try:
                record = self.registry.get(name)
                if record and record.status == "DEPLOY_FAILED" and not record.pending \
                        and name in serve_apps._app_statuses():
                    serve_apps.delete_app_nowait(name)
                    self.key_pools.drop(name)
            finally:
                lease.release()
        except Exception as exc:  # noqa: BLE001
            log.error("cleanup of failed deploy %s: %s", name, type(exc).__name__)
        return True
