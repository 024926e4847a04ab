"""This process's view of its endpoints: ``EndpointCache.resolve`` (a short cache over the registry, one look-up in
flight per name) and each endpoint's Serve handles.

A call resolves its endpoint here (``Dispatcher.resolve``): the registry's record
(``gateway.records.EndpointRecord``, through ``gateway.registry_client.RegistryClient``) with the
endpoint's handles (made by ``gateway.replica_client.ReplicaClient``), kept ``endpoint_cache_s``. When
the registry does not answer (Ray restarts it), what this process knew of the endpoint is used. Nothing
here imports Ray: the two clients are what it talks to, and the fast tests pass fakes of them.
"""
from __future__ import annotations

import asyncio
import collections
import difflib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

from .config import Settings
from .records import EndpointRecord, Health
from .registry_client import RegistryClient, RegistryUnavailable
from contract.errors import GatewayError

if TYPE_CHECKING:
    from .replica_client import Handles, ReplicaClient

log = logging.getLogger("gateway.dispatch")

#: how often a process looks again at an endpoint it knows as unhealthy (and how old a look-up a
#: ``fresh`` resolve may join)
HEALTH_RECHECK_S = 0.25


@dataclass
class Endpoint:
    """An endpoint as this process resolved it: the registry's record and its Serve handles."""

    record: EndpointRecord
    handle: "Handles"
    #: when the record was read from the registry (monotonic)
    fetched: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return self.record.chat_name

    @property
    def provider(self) -> str:
        return self.record.provider

    @property
    def health(self) -> Health:
        return self.record.health

    @property
    def deadline(self) -> float:
        """How long the gateway waits for a replica's answer (or a stream's next event): the endpoint's timeout + 5 s."""
        return float(self.record.timeout) + 5.0


@dataclass
class _Flight:
    """One look-up of an endpoint in flight (``EndpointCache.resolve``): shared by every call that waits for it."""

    #: when it began (monotonic)
    began: float
    task: "Optional[asyncio.Task[Endpoint | _Missing]]" = None
    #: the name was forgotten (``EndpointCache.forget``: a deploy changed it) after it began: no call joins it
    #: any more, and its answer is not cached
    stale: bool = False


@dataclass(frozen=True)
class _Missing:
    """A look-up's answer for a name the registry does not have: the deployed names (None: not looked up)."""

    names: Optional[list[str]]


def _did_you_mean(chat_name: str, names: list[str], visible: Optional[Callable[[str], bool]]) -> str:
    """The hint "(did you mean 'x'?)" over the deployed ``names`` the caller may use; only on the not-found path."""
    if visible is not None:  # never name an endpoint the caller's key may not use
        names = [n for n in names if visible(n)]
    close = difflib.get_close_matches(chat_name, names, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(n) for n in close)}?)" if close else ""


class EndpointCache:
    """The endpoints this process resolved, their look-ups in flight, and their handles (keyed by (name, provider))."""

    def __init__(self, registry: RegistryClient, replicas: "ReplicaClient", settings: Settings,
                 applying: Callable[[], bool] = lambda: False) -> None:
        self.registry, self.replicas, self.settings = registry, replicas, settings
        #: whether this process is still applying GATEWAY_ENDPOINTS_FILE (a missing name may come shortly)
        self.applying = applying
        self._cache: dict[str, Endpoint] = {}
        self.handles: dict[tuple[str, str], "Handles"] = {}
        #: the look-up of each name in flight (``resolve``: single-flight); changed on the loop only
        self._flights: dict[str, _Flight] = {}
        #: round trips and handles made by ``resolve`` in this process: ``registry`` (reads of a record),
        #: ``controller`` (Serve's look-up of an application), ``handles`` (Serve handles, each a router)
        self.lookups: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def known(self, chat_name: str) -> Optional[Endpoint]:
        """The endpoint as this process last resolved it, whatever its age; None when it never did (asks nothing)."""
        return self._cache.get(chat_name)

    async def resolve(self, chat_name: str, fresh: bool = False, visible: Optional[Callable[[str], bool]] = None) -> Endpoint:
        """The endpoint, from this process's cache unless it is older than ``endpoint_cache_s`` or ``fresh``.

        ``visible``: the names the caller may see (its client key's), for the not-found hint.

        Single-flight per name: the calls that find no fresh entry at once (a burst on a cold endpoint,
        or on one whose entry just expired) share one look-up (``_refresh``: one registry round trip,
        and at most one Serve handle made). Its failure reaches every call that waited for it, and is
        not kept: the next call looks again. A caller that leaves while it waits leaves the look-up
        running for the others. A ``fresh`` call joins a look-up begun at most ``HEALTH_RECHECK_S`` ago;
        one begun before a ``forget`` of the name is never joined.
        """
        now = time.monotonic()
        hit = self._cache.get(chat_name)
        if hit is not None and now - hit.fetched < self.settings.endpoint_cache_s and not fresh:
            return hit
        loop = asyncio.get_running_loop()
        flight = self._flights.get(chat_name)
        if flight is None or flight.stale or flight.task.get_loop() is not loop \
                or (fresh and now - flight.began > HEALTH_RECHECK_S):
            flight = self._take_off(chat_name, loop, now)
        try:
            endpoint = await asyncio.shield(flight.task)
        except GatewayError as err:  # (each waiter raises its own copy: one exception raised in many tasks grows their tracebacks)
            raise GatewayError.from_info(err.info) from None
        if isinstance(endpoint, _Missing):  # (the registry has no such name: the hint is this caller's, over the names it may see)
            if self.applying():  # (a restarted cluster: the endpoints file brings it back shortly)
                raise GatewayError("endpoint_not_ready", f"no endpoint named '{chat_name}' yet: this gateway process "
                                   f"is still applying its endpoints file", retry_after=2)
            names = endpoint.names if endpoint.names is not None else await self._names()
            raise GatewayError("not_found", f"no endpoint named '{chat_name}'{_did_you_mean(chat_name, names, visible)}; "
                               f"GET /deployments (or GET /v1/models) lists them, POST /<provider>/deploy makes one")
        return endpoint

    def _take_off(self, chat_name: str, loop: asyncio.AbstractEventLoop, now: float) -> "_Flight":
        """Start the one look-up of ``chat_name`` that the calls arriving while it runs share."""
        flight = _Flight(now)
        flight.task = loop.create_task(self._refresh(chat_name, flight))
        self._flights[chat_name] = flight

        def landed(task: asyncio.Task) -> None:
            if self._flights.get(chat_name) is flight:
                del self._flights[chat_name]
            if not task.cancelled():
                task.exception()  # (read: when every waiter left, asyncio would log it as never retrieved)

        flight.task.add_done_callback(landed)
        return flight

    async def _refresh(self, chat_name: str, flight: _Flight) -> "Endpoint | _Missing":
        """(one flight of ``resolve``) The registry's record of ``chat_name`` with its handles, now in the
        cache; ``_Missing`` (with the deployed names, for the hint) when the registry has no such name; what
        this process knew when the registry does not answer."""
        now = time.monotonic()
        hit = self._cache.get(chat_name)
        try:
            self.lookups["registry"] += 1
            record = await self.registry.aget(chat_name)
        except RegistryUnavailable:
            if hit is None:
                raise
            # The registry is being restarted by Ray (its records come back with it): what this
            # process knew a moment ago still routes the call.
            log.warning("the endpoint registry did not answer; %s is served from this process's cache", chat_name)
            return hit
        if record is None:
            with self._lock:  # (not ``forget``: this look-up stays the one that the calls arriving now join)
                self._cache.pop(chat_name, None)
            self.drop_handles(chat_name)
            return _Missing(None if self.applying() else await self._names())
        if record.status == "DEPLOYING":
            raise GatewayError("endpoint_not_ready", f"'{chat_name}' is still deploying (loading its model); "
                               f"GET /deployments/{chat_name} shows progress", retry_after=5)
        if record.status == "DEPLOY_FAILED":
            failure = record.failure or {}
            raise GatewayError("endpoint_not_ready", f"'{chat_name}' failed to deploy ({failure.get('reason')}): "
                               f"{failure.get('message')}; deploy it again")
        # A handle is bound to the deployment's name, which is the provider's: an endpoint
        # undeployed and deployed again under another provider needs a new one.
        handle_key = (chat_name, record.provider)
        handle = self.handles.get(handle_key)
        if handle is None or hit is None:  # (new to this process, or forgotten: is the application there?)
            self.lookups["controller"] += 1
            ingress = await self.replicas.ingress(chat_name)  # (endpoint_not_ready when Serve has no such application)
            if handle is None:  # (made without the lock: other endpoints' calls never wait for it)
                self.lookups["handles"] += 1
                made = await self.replicas.handles(ingress, chat_name)
                with self._lock:
                    handle = self.handles.setdefault(handle_key, made)
                if handle is not made:  # another look-up made one first (one begun after a ``forget``)
                    self.replicas.close(made)
                self.drop_handles(chat_name, keep=record.provider)
        endpoint = Endpoint(record, handle, now)
        with self._lock:
            if not flight.stale:  # (forgotten meanwhile: a deploy changed it; the next call reads it again)
                self._cache[chat_name] = endpoint
        return endpoint

    async def _names(self) -> list[str]:
        """The deployed names, for the not-found hint (``_did_you_mean``): one look-up per flight of a missing name."""
        try:
            self.lookups["names"] += 1
            return await self.registry.anames()
        except Exception:  # noqa: BLE001 - a hint only: what this process knows will do
            return list(self._cache)

    def forget(self, chat_name: str) -> None:
        """Read the endpoint's record again on its next call.

        Its handles stay: a handle's router follows its application's replicas through a
        redeploy. They are shut down (``drop_handles``) once the registry no longer knows the
        name, or the name moved to another provider (handles are keyed by (name, provider)).
        """
        with self._lock:
            self._cache.pop(chat_name, None)
            flight = self._flights.get(chat_name)  # (a look-up begun before is neither joined nor cached: ``_Flight.stale``)
            if flight is not None:
                flight.stale = True

    def drop(self, chat_name: str) -> None:
        """(on the loop) Forget the cached entry alone, without the lock (never wait on a lock on the loop):
        the next look-up asks Serve's controller whether the application is still there."""
        self._cache.pop(chat_name, None)

    def drop_handles(self, chat_name: str, keep: Optional[str] = None) -> None:
        """Shut down the routers of an endpoint that is gone (or moved to another provider than ``keep``)."""
        with self._lock:
            gone = [self.handles.pop(k) for k in [k for k in self.handles if k[0] == chat_name and k[1] != keep]]
        for handles in gone:  # (the chat and stream handles share one router)
            self.replicas.close(handles)
