"""The health client of dispatch: an endpoint's shared cooldown state, read and written through the registry.

The cooldown state of each endpoint is kept by the registry (``gateway.registry``), for every
gateway process of the cluster: N upstream failures within a window (or one auth or quota
failure) cool an endpoint down for ``cooldown_s``; after it, one caller in the whole cluster
probes it (``claim_probe``), and its verdict ends the cooldown or starts the next one. Which
failures count is the dispatcher's policy (``gateway.dispatch.UPSTREAM_FAILURES``); this module
asks and tells the registry (through ``RegistryClient``), and keeps what it answered on the
endpoint (``EndpointRecord.with_health``) so that this process's next call knows.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Awaitable, Callable, Optional

from .config import Settings
from .endpoint_cache import HEALTH_RECHECK_S, Endpoint
from .records import Health
from .registry_client import RegistryClient
from contract.errors import GatewayError, whole_seconds

log = logging.getLogger("gateway.dispatch")


class Cooldowns:
    """Whether to skip an endpoint (cooling down, or probed by another caller); how its calls ended."""

    def __init__(self, registry: RegistryClient, settings: Settings,
                 resolve: Callable[..., Awaitable[Endpoint]], spawn: Callable[[Awaitable[Any]], None]) -> None:
        """``resolve``: the dispatcher's (a fresh look at an endpoint); ``spawn``: runs a coroutine on its own."""
        self.registry, self.settings, self._resolve, self._spawn = registry, settings, resolve, spawn

    async def skip_reason(self, endpoint: Endpoint) -> tuple[Endpoint, Optional[GatewayError], bool]:
        """(endpoint as now known, why to skip it or None, whether this call is the probe)."""
        if endpoint.health.ok:
            return endpoint, None, False
        # Not healthy in this process's cache: look again before refusing a call (another
        # process may have seen it recover, or it was deployed again with a new key), at most
        # every HEALTH_RECHECK_S, so that a cooling endpoint under load costs the registry little.
        if time.monotonic() - endpoint.fetched > HEALTH_RECHECK_S:
            endpoint = await self._resolve(endpoint.name, fresh=True)
        health = endpoint.health
        if health.ok:
            return endpoint, None, False
        until = health.cooldown_until or 0
        now = time.time()
        if until > now:
            return endpoint, GatewayError("endpoint_not_ready", f"'{endpoint.name}' is cooling down after upstream "
                                          f"failures ({health.last_error}); try again in {whole_seconds(until - now)}s, or "
                                          f"give it fallbacks", retry_after=until - now), False
        if await self.registry.aclaim_probe(endpoint.name, endpoint.deadline):
            return endpoint, None, True  # this request probes it
        return endpoint, GatewayError("endpoint_not_ready", f"'{endpoint.name}' is being probed after a cooldown; try "
                                      f"again in a second",
                                      retry_after=1), False

    async def release_probe(self, endpoint: Endpoint) -> None:
        """A probe that ended without an upstream verdict frees the lease for the next caller."""
        if endpoint.health.ok:
            return
        try:
            await self.registry.arelease_probe(endpoint.name)
        except Exception as exc:  # noqa: BLE001 - the lease runs out by itself
            log.warning("could not release the probe of %s: %s", endpoint.name, type(exc).__name__)

    async def report(self, endpoint: Endpoint, err: Optional[GatewayError], at_once: bool = False) -> None:
        """Tell the shared cooldown state how a call ended (``err`` None: it succeeded; ``err`` an upstream failure,
        ``at_once``: one that starts a cooldown by itself). Best effort, never raises: an answer in hand reaches its
        caller whatever the registry does.

        A success is sent to the registry and not waited for (``_noted``): a slow or restarting
        registry never holds an answer back nor turns it into an error. (Sent from this process's loop, it
        reaches the registry before any later call of this process's: Ray runs one caller's calls
        to an actor in order.) A failure is waited for, at most the registry client's timeout, so that this
        process's next call knows of a cooldown it started; one that cannot be recorded is logged.
        """
        s = self.settings
        if s.cooldown_s <= 0:
            return  # cooldowns off
        if err is None and endpoint.health.state == "ok" and not endpoint.health.consecutive_failures:
            return  # the common case costs nothing
        try:
            if err is None:
                self._spawn(self._noted(endpoint, self.registry.record_success_nowait(endpoint.name)))
                return
            health = await self.registry.arecord_failure(endpoint.name, err.type, at_once, s.cooldown_failures,
                                                         s.cooldown_window_s, s.cooldown_s)
        except Exception as exc:  # noqa: BLE001 - health is best effort (the registry is restarting, the cluster lost)
            log.warning("could not record the %s of %s in the endpoint registry: %s",
                        "success" if err is None else "failure", endpoint.name, type(exc).__name__)
            return
        endpoint.record = endpoint.record.with_health(health)

    async def _noted(self, endpoint: Endpoint, recorded: Awaitable[Health]) -> None:
        """(on the loop) The registry's answer to ``record_success``: the endpoint's health as this process knows it."""
        try:
            health = await recorded
        except Exception as exc:  # noqa: BLE001 - the next read of the registry catches up
            log.warning("could not record the success of %s in the endpoint registry: %s", endpoint.name, type(exc).__name__)
            return
        endpoint.record = endpoint.record.with_health(health)
