"""Leases of the registry: the endpoints-file apply (one gateway process at a time) and each ``chat_name``
(one deploy or undeploy at a time).

A lease is (owner, expires_at): the owner is a token made per claim (host, pid, random), only the owner renews
or releases it, and its holder renews it every third of its TTL (``Settings.lease_ttl_s``) in a background
thread, so a holder killed with ``kill -9`` frees it within the TTL; an expired lease is free to claim.
``Leases`` is the bookkeeping inside the registry actor (plain Python); ``Lease`` is one process's hold on
one of them, through a ``RegistryClient``. Neither imports Ray.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    from .registry_client import RegistryClient

#: the lease of applying the endpoints file (one gateway process at a time)
APPLY_LEASE = "apply"

log = logging.getLogger("gateway.registry")


def endpoint_lease(name: str) -> str:
    """The lease of deploying or undeploying ``name`` (one at a time, across every gateway process)."""
    return "endpoint:" + name


def lease_owner() -> str:
    """A fresh owner token: ``host/pid/random``, one per claim (two claims of one process differ)."""
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:12]}"


class Leases:
    """Leases by key, each (owner, expires_at): the bookkeeping of the registry actor (plain Python).

    Only the owner renews or releases a lease; an expired one is free, whoever held it. A renewal
    of a lease that is free (it expired unclaimed, or the registry restarted and forgot it) takes
    it again for the same owner; one that another owner holds now fails, and its holder stops.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._held: dict[str, tuple[str, float]] = {}

    def holder(self, key: str) -> Optional[dict]:
        """Who holds ``key`` now: ``{owner, host, pid, expires_in_s}``, or None when it is free."""
        owner, until = self._held.get(key, ("", 0.0))
        now = self._clock()
        if not owner or until <= now:
            return None
        host, _, rest = owner.partition("/")
        pid = rest.partition("/")[0]
        return {"owner": owner, "host": host, "pid": int(pid) if pid.isdigit() else None,
                "expires_in_s": round(until - now, 1)}

    def claim(self, key: str, owner: str, ttl_s: float) -> Optional[dict]:
        """Take ``key`` for ``owner`` (or extend it, when ``owner`` holds it): None when ``owner``
        holds it now for ``ttl_s``, else the holder (``holder``) that keeps it."""
        now = self._clock()
        for stale in [k for k, (_, until) in self._held.items() if until <= now and k != key]:
            del self._held[stale]  # (dead holders' leases: forgotten)
        held = self.holder(key)
        if held is not None and held["owner"] != owner:
            return held
        self._held[key] = (owner, self._clock() + ttl_s)
        return None

    def renew(self, key: str, owner: str, ttl_s: float) -> bool:
        return self.claim(key, owner, ttl_s) is None

    def release(self, key: str, owner: str) -> bool:
        """Free ``key`` if ``owner`` holds it (or held it last); another owner's lease stays."""
        if self._held.get(key, ("", 0.0))[0] != owner:
            return False
        del self._held[key]
        return True

    def may_write(self, key: str, owner: str) -> bool:
        """``owner`` may still act on ``key``: it holds it, or nobody else does."""
        held = self.holder(key)
        return held is None or held["owner"] == owner

    def view(self) -> dict[str, dict]:
        """Every lease held now, by key."""
        return {key: held for key in list(self._held) if (held := self.holder(key)) is not None}


class Lease:
    """This process's hold on one registry lease, under a fresh owner token.

    ``claim`` (or ``hold``, after the registry's ``begin`` took it) starts a daemon thread that
    renews it every third of ``ttl_s`` until ``release``, or ``stop`` (called before a registry
    call that releases it, as ``finish`` does: no renewal is in flight after ``stop`` returns, so
    none can take the lease again once it is released). A renewal refused because another owner
    holds it now sets ``lost`` and stops renewing; one that fails (the registry restarting) is
    tried again.
    """

    def __init__(self, registry: "RegistryClient", key: str, ttl_s: float) -> None:
        self.registry, self.key, self.ttl_s = registry, key, ttl_s
        self.owner = lease_owner()
        self.lost = False
        self._held_until = 0.0  # (monotonic) when the last renewal this process saw succeed runs out
        self._stop = threading.Event()
        self._lock = threading.Lock()  # a renewal and ``stop`` never overlap
        self._thread: Optional[threading.Thread] = None

    def claim(self) -> Optional[dict]:
        """None when this process holds the lease now (and renews it), else who holds it."""
        holder = self.registry.claim_lease(self.key, self.owner, self.ttl_s)
        if holder is None:
            self.hold()
        return holder

    def hold(self) -> "Lease":
        """Start renewing (the lease was taken for ``owner``, just now)."""
        self._held_until = self._held_until or time.monotonic() + self.ttl_s
        if self._thread is None:
            self._thread = threading.Thread(target=self._renew_until_stopped, name=f"lease-{self.key}", daemon=True)
            self._thread.start()
        return self

    def renew(self) -> bool:
        """Renew now: True while this process holds it, for ``ttl_s`` from now (before an irreversible step).

        Once lost, lost for good: a lease that ran out (no renewal got through for ``ttl_s``) or that
        another owner took may have been taken, used and released since, so what this process read
        under it is stale even if the registry would let it take the lease again.
        """
        with self._lock:
            if self._stop.is_set() or self.lost:
                return False
            if self._held_until and time.monotonic() > self._held_until:
                self.lost = True
                return False
            return self._renew()

    def _renew(self) -> bool:
        asked = time.monotonic()
        held = self.registry.renew_lease(self.key, self.owner, self.ttl_s)
        if not held:
            self.lost = True
        else:
            self._held_until = asked + self.ttl_s
        return held

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self.renew():
                    if self.lost:
                        log.warning("the lease %s was taken by another holder while this process (pid %d) held it",
                                    self.key, os.getpid())
                    return
            except Exception as exc:  # noqa: BLE001 - the registry restarting: the next renewal tries again
                log.warning("renewing the lease %s: %s", self.key, type(exc).__name__)

    def stop(self) -> None:
        """Stop renewing; once it returns no renewal is in flight (call it before the registry releases it)."""
        with self._lock:
            self._stop.set()

    def release(self) -> None:
        """Stop renewing and free it (it expires by itself within ``ttl_s`` when the registry does not answer)."""
        self.stop()
        try:
            self.registry.release_lease(self.key, self.owner)
        except Exception as exc:  # noqa: BLE001
            log.warning("releasing the lease %s: %s (it expires within %.0f s)", self.key, type(exc).__name__, self.ttl_s)
