"""A replica's key pool (``PoolMember``): an adapter per key, its ledger, and the background sync with the keeper.

Each replica keeps its own copy of its endpoint's pool (``gateway.key_rotation.Ledger``), picks keys
from it, applies what its calls say about them at once, and syncs with the keeper
(``gateway.key_pools``) in the background: about every ``SYNC_S``, and at once after a state
changed. A sync sends what it saw and gets the pool back when its version changed, and sometimes a
disabled key to check: the replica checks it with the provider's free key check
(``Provider.verify_key``) in a thread and reports the result. A keeper that restarted answers
``seed`` (this copy seeds it again); one that cannot be reached costs nothing but the sharing.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Optional

from pydantic import SecretStr

from contract.errors import GatewayError
from . import actors
from .key_pools import CALL_S, keeper_actor, template_of
from .key_rotation import Ledger, call_with_keys
from .keypool import COOLING, DISABLED, Pool
from .pool_keeper import generation_of

log = logging.getLogger("gateway.key_pools")

#: how often a replica syncs with the keeper (and at once after a state changed)
SYNC_S = 1.0
#: the longest wait between two tries of a replica that cannot reach the keeper
_SYNC_BACKOFF_MAX_S = 10.0


class PoolMember:
    """A replica's key pool: an adapter per key, its ``Ledger``, and the background sync with the keeper.

    ``generation``/``namespace`` None: a pool of this replica alone (no keeper; e.g. a benchmark's replica).
    """

    def __init__(self, provider: Any, spec: Any, generation: Optional[str] = None,
                 namespace: Optional[str] = None) -> None:
        self._provider, self._spec = provider, spec
        self.chat_name = spec.chat_name
        self.generation = generation or generation_of("local")
        self._namespace = namespace if generation else None
        pool = Pool(spec.chat_name, self.generation, spec.pool())
        pool.version = -1  # (never the keeper's: the first sync brings its pool, with the states a redeploy kept)
        self.ledger = Ledger(pool, on_change=self._changed)
        #: fingerprint -> (its key, its adapter); built now for the deploy's keys (a failure fails the replica)
        self._adapters: dict[str, tuple[str, Any]] = {}
        for fingerprint in self.ledger.pool.keys:
            key = self.ledger.pool.secret(fingerprint)
            self._adapters[fingerprint] = (key, provider.create_adapter(spec.for_key(key)))
        self._wakeup: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self._checking: set[str] = set()
        self._keeper = None

    # -- calls -----------------------------------------------------------------------
    async def call(self, run: Callable[[Any], Awaitable[Any]]) -> tuple[Any, str]:
        """``(run(adapter)'s answer, the key's fingerprint)``, rotating over the pool (``call_with_keys``)."""
        self.start()
        return await call_with_keys(self.ledger, lambda fingerprint: run(self.adapter(fingerprint)))

    def adapter(self, fingerprint: str) -> Any:
        key = self.ledger.pool.secret(fingerprint)
        held = self._adapters.get(fingerprint)
        if held is not None and held[0] == key:
            return held[1]
        try:  # (a key added after the deploy)
            adapter = self._provider.create_adapter(self._spec.for_key(key))
        except Exception:  # noqa: BLE001 - an SDK's constructor may put the key in its error: not shown
            raise GatewayError("upstream_auth", f"the {self._provider.name} adapter could not be built with the key "
                                                f"{fingerprint}", provider=self._provider.name) from None
        if held is not None:
            self._retire(held[1])
        self._adapters[fingerprint] = (key, adapter)
        return adapter

    def _retire(self, adapter: Any) -> None:
        """Close an adapter of a key no longer in the pool, once calls it may still serve have ended."""
        loop = asyncio.get_running_loop()
        loop.call_later(self._spec.timeout + 5, lambda: loop.create_task(adapter.aclose()))

    def _changed(self, event: tuple) -> None:
        if event[0] == "fail" and event[3] == DISABLED:
            log.warning("key pool of %s: key %s disabled: %s", self.chat_name, event[1], event[4])
        elif event[0] == "fail" and event[3] == COOLING:
            log.info("key pool of %s: key %s cooling down for %.0fs: %s", self.chat_name, event[1], event[5], event[4])
        elif event[0] == "checked":
            log.info("key pool of %s: key %s %s its check", self.chat_name, event[1], "passed" if event[2] else "failed")
        if self._wakeup is not None:
            self._wakeup.set()

    # -- the sync -----------------------------------------------------------------------
    def start(self) -> None:
        """Start syncing (on the replica's event loop; again after it stopped by accident)."""
        if self._namespace is None or (self._task is not None and not self._task.done()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # (not on the loop yet: the first call starts it)
        self._wakeup = self._wakeup or asyncio.Event()
        self._task = loop.create_task(self._run())

    async def _run(self) -> None:
        wait = 0.0  # (the first sync at once: the keeper may know this pool better than the deploy did)
        while True:
            if wait:
                try:
                    await asyncio.wait_for(self._wakeup.wait(), wait)
                except asyncio.TimeoutError:
                    pass
            self._wakeup.clear()
            try:
                if await self._sync() == "gone":
                    return
                wait = SYNC_S
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the pool goes on alone until the keeper answers
                log.warning("key pool of %s: could not sync with the keeper: %s", self.chat_name, actors.reason(exc))
                self._keeper = None
                wait = min(max(wait, SYNC_S) * 2, _SYNC_BACKOFF_MAX_S)
            await asyncio.sleep(0.05)  # (a burst of changes is one sync)

    async def _sync(self) -> Optional[str]:
        if self._keeper is None:
            self._keeper = await asyncio.to_thread(keeper_actor, self._namespace)
        keeper, pool = self._keeper, self.ledger.pool
        events, counts = self.ledger.take()
        try:
            answer = await actors.acall(keeper, "sync", self.chat_name, self.generation, pool.version, events, counts,
                                        timeout=CALL_S)
        except BaseException:
            self.ledger.give_back(events, counts)
            raise
        if answer.get("gone"):
            log.info("key pool of %s: undeployed, syncing no more", self.chat_name)
            return "gone"
        if answer.get("seed"):  # a keeper that restarted: this copy (its states include the events) seeds it
            log.warning("key pool of %s: the keeper lost it (it restarted); seeding it again", self.chat_name)
            self.ledger.give_back([], counts)
            await actors.acall(keeper, "seed", self.chat_name, self.generation, template_of(self._spec),
                               self.ledger.pool.snapshot(secrets=True), timeout=CALL_S)
            return None
        if "pool" in answer:
            self.ledger.adopt(answer["pool"])
            for fingerprint in [fp for fp in self._adapters if fp not in self.ledger.pool.keys]:
                self._retire(self._adapters.pop(fingerprint)[1])
        if "check" in answer:
            fingerprint, key = answer["check"]
            asyncio.get_running_loop().create_task(self._check(fingerprint, key))
        return None

    async def _check(self, fingerprint: str, key: SecretStr) -> None:
        """A disabled key's check: the provider's free key check, in a thread (the SDKs block)."""
        if fingerprint in self._checking:
            return
        self._checking.add(fingerprint)
        try:
            passed = await asyncio.to_thread(self._verify, key.get_secret_value())
        finally:
            self._checking.discard(fingerprint)
        self.ledger.checked(fingerprint, passed)

    def _verify(self, key: str) -> bool:
        """Only a key the provider refuses fails (``invalid_key``): a check that cannot tell (a relay without
        ``GET /models``, ``verify_key: false``, the provider unreachable) lets the next call tell."""
        if not getattr(self._spec, "verify_key", False):
            return True
        try:
            self._provider.verify_key(self._spec.for_key(key))
        except GatewayError as err:
            return err.type != "invalid_key"
        except Exception:  # noqa: BLE001 - whatever an SDK raises says nothing about the key
            return True
        return True

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for _, adapter in self._adapters.values():
            await adapter.aclose()
