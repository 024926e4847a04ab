"""``RegistryClient``: the one place that calls the endpoint registry actor (``gateway.registry``).

Typed methods (``EndpointRecord``, ``Health``: the actor keeps storing plain dicts, converted here), one
timeout for every call, and one way a call fails: ``RegistryUnavailable`` (503 ``cluster_unavailable``)
when the actor does not answer within the timeout or Ray fails the call. A lost or closed cluster fails
at once with what ``Cluster.ensure_up`` raises, without waiting for the timeout. Callers that serve from
a cache while Ray restarts the registry catch ``RegistryUnavailable`` only.

Async methods are for a worker's event loop (connecting blocks, so it happens in a thread; the answers
are awaited with a timeout: ``actors.aanswer``); sync ones for threads (deploys, listings, leases). The
calls go through ``gateway.actors``, whose ``ActorCallFailed`` (Ray's failures) becomes ``RegistryUnavailable``.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Awaitable, NamedTuple, Optional

from contract.errors import GatewayError

from . import actors
from .actors import ActorCallFailed
from .records import EndpointRecord, Health

if TYPE_CHECKING:
    from .cluster import Cluster


class RegistryUnavailable(GatewayError):
    """The registry actor did not answer within the client's timeout, or Ray failed the call (503, Retry-After 2)."""

    def __init__(self, method: str, why: str) -> None:
        super().__init__("cluster_unavailable", f"the endpoint registry did not answer {method} ({why}); try again "
                                                f"shortly", retry_after=2)


class Begun(NamedTuple):
    """What ``begin`` answers: ``state`` is ``ok`` (the lease is the caller's; ``record``: the name's record,
    if any), ``conflict`` (``record``: another provider's endpoint) or ``busy`` (``holder``: who holds the lease)."""

    state: str
    record: Optional[EndpointRecord] = None
    holder: Optional[dict] = None


def _record(stored: Optional[dict]) -> Optional[EndpointRecord]:
    return None if stored is None else EndpointRecord.from_dict(stored)


class RegistryClient:
    """Typed calls to the registry actor, each bounded by ``timeout_s``."""

    def __init__(self, cluster: "Cluster", timeout_s: float = 10.0) -> None:
        self.cluster = cluster
        self.timeout_s = timeout_s

    # -- async: a worker's event loop --------------------------------------------------------
    async def _ensure_up(self) -> None:
        """Connected to the cluster (connecting blocks: in a thread, never on the loop); lost: at once."""
        cluster = self.cluster
        if cluster.lost or cluster.closed or not cluster.connected:
            if cluster.lost or cluster.closed:
                cluster.ensure_up()  # raises at once
            await asyncio.to_thread(cluster.ensure_up)

    def _send(self, method: str, *args: Any) -> Any:
        """Send ``method(*args)`` to the actor (connected already): its ObjectRef."""
        try:
            return actors.send(self.cluster.registry(), method, *args)
        except ActorCallFailed as exc:
            raise RegistryUnavailable(method, exc.why) from None

    async def _acall(self, method: str, *args: Any) -> Any:
        await self._ensure_up()
        return await self._answer(method, self._send(method, *args))

    async def _answer(self, method: str, ref: Any) -> Any:
        """The actor's answer to the call sent as ``ref``, awaited for at most ``timeout_s``."""
        try:
            return await actors.aanswer(ref, self.timeout_s)
        except ActorCallFailed as exc:  # (``why``: Ray's exception's class, or "no answer within ...")
            raise RegistryUnavailable(method, exc.why) from None

    async def aget(self, name: str) -> Optional[EndpointRecord]:
        return _record(await self._acall("get", name))

    async def anames(self) -> list[str]:
        return [r["chat_name"] for r in await self._acall("list")]

    async def aclaim_probe(self, name: str, lease_s: float) -> bool:
        return await self._acall("claim_probe", name, lease_s)

    async def arelease_probe(self, name: str) -> None:
        await self._acall("release_probe", name)

    async def arecord_failure(self, name: str, error_type: str, immediate: bool, failures: int, window_s: float,
                              cooldown_s: float) -> Health:
        return Health.from_dict(await self._acall("record_failure", name, error_type, immediate, failures, window_s,
                                                  cooldown_s))

    def record_success_nowait(self, name: str) -> Awaitable[Health]:
        """Send ``record_success`` now (Ray runs one caller's calls to an actor in order, so it reaches the
        registry before any later call of this process's); the awaitable answers the new health, within
        the timeout. Never blocks: a process not connected yet connects in a thread when it is awaited."""
        cluster = self.cluster
        if cluster.lost or cluster.closed:
            cluster.ensure_up()  # raises at once
        if not cluster.connected:
            return self._record_success(name)
        ref = self._send("record_success", name)

        async def answer() -> Health:
            return Health.from_dict(await self._answer("record_success", ref))

        return answer()

    async def _record_success(self, name: str) -> Health:
        return Health.from_dict(await self._acall("record_success", name))

    # -- sync: threads ---------------------------------------------------------------------------
    def _call(self, method: str, *args: Any, as_connected: bool = False) -> Any:
        if not as_connected:
            self.cluster.ensure_up()  # (connects when needed; a lost or closed cluster: at once)
        ref = self._send(method, *args)
        try:
            return actors.answer(ref, self.timeout_s)
        except ActorCallFailed as exc:  # (Ray's ``GetTimeoutError`` is one)
            raise RegistryUnavailable(method, exc.why) from None

    def get(self, name: str) -> Optional[EndpointRecord]:
        """``name``'s record with its health, or None."""
        return _record(self._call("get", name))

    def list(self) -> list[EndpointRecord]:
        """Every record, with its health."""
        return [EndpointRecord.from_dict(r) for r in self._call("list")]

    def begin(self, name: str, provider: str, owner: str, ttl_s: float) -> Begun:
        """Claim ``name``'s lease for ``owner`` (a deploy); see ``Begun``. Its record comes without health."""
        state, found = self._call("begin", name, provider, owner, ttl_s)
        return Begun(state, holder=found) if state == "busy" else Begun(state, record=_record(found))

    def finish(self, name: str, record: Optional[EndpointRecord], owner: str) -> bool:
        """Release ``name``'s lease and store ``record`` (None: forget the endpoint); False when another
        owner holds the lease now (nothing stored)."""
        return self._call("finish", name, None if record is None else record.to_dict(), owner)

    def settle(self, name: str, deploy_id: str, ok: bool, failure: Optional[dict], now: str) -> Optional[str]:
        """End the pending deploy ``deploy_id`` once: ``RUNNING``, ``DEPLOY_FAILED``, ``UPDATE_FAILED``, or None."""
        return self._call("settle", name, deploy_id, ok, failure, now)

    def dependents(self, name: str) -> list[str]:
        return self._call("dependents", name)

    def drop_fallback(self, name: str) -> list[str]:
        return self._call("drop_fallback", name)

    def claim_lease(self, key: str, owner: str, ttl_s: float) -> Optional[dict]:
        """None when ``owner`` holds ``key`` now, else its holder ``{owner, host, pid, expires_in_s}``."""
        return self._call("claim_lease", key, owner, ttl_s)

    def renew_lease(self, key: str, owner: str, ttl_s: float) -> bool:
        return self._call("renew_lease", key, owner, ttl_s)

    def release_lease(self, key: str, owner: str) -> bool:
        return self._call("release_lease", key, owner)

    def leases(self) -> dict[str, dict]:
        """Every lease held now, by key."""
        return self._call("leases")

    def versions(self, as_connected: bool = False) -> dict:
        """The registry's process's ``{"ray", "python"}`` versions (the cluster's). ``as_connected``: through
        this process's connection as it is, neither connecting nor refusing a cluster marked lost (the
        watchdog asks precisely while it is lost: is it back?)."""
        return self._call("versions", as_connected=as_connected)

    def pid(self) -> int:
        return self._call("pid")
