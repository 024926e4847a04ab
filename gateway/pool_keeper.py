"""Key pools shared by the cluster: the keeper actor, a replica's side of it, and the gateway's.

One small detached actor (``KeyPoolKeeper``, named ``key_pools`` in the gateway's namespace, on the
head node like the endpoint registry and the limits keeper) holds every endpoint's pool
(``gateway.keypool.Pool``), keys and states, in memory only: never in the GCS, on disk or in a log.

- The gateway puts an endpoint's pool there at deploy, before Serve starts it (``KeyPools.put``;
  not on an unchanged redeploy), as a new *generation* (the deploy's birth time and digest): the
  replicas of a rolling update keep syncing with their own generation until they stop. Undeploy
  drops every generation. A key edit (``gateway.key_routes``) applies to every generation.
- Each replica (``PoolMember``) keeps its own copy, picks keys from it, applies what its calls say
  about them at once, and syncs with the keeper in the background: about every ``SYNC_S``, and at
  once after a state changed. A sync sends what it saw and gets the pool back when its version
  changed, and sometimes a disabled key to check (``claim_check``): the replica checks it with the
  provider's free key check (``Provider.verify_key``) in a thread and reports the result.
- A keeper that restarted (Ray restarts it; its memory is gone) answers a sync with ``seed``: the
  replica sends its copy, keys and states, and the pool carries on. A keeper that cannot be reached
  costs nothing but the sharing: each replica goes on with its own copy.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Optional

import ray
from pydantic import SecretStr

from contract.errors import GatewayError
from .keypool import COOLING, DISABLED, Ledger, Pool, call_with_keys
from .registry import HEAD_NODE_RESOURCE

log = logging.getLogger("gateway.key_pools")

KEEPER_NAME = "key_pools"
#: how often a replica syncs with the keeper (and at once after a state changed)
SYNC_S = 1.0
#: the longest wait between two tries of a replica that cannot reach the keeper
_SYNC_BACKOFF_MAX_S = 10.0
#: how long one call to the keeper may take
_CALL_S = 10.0
#: how long a listing waits for the keeper (then it shows the pools' sizes only)
_VIEWS_S = 2.0
#: a generation is in use while one of its replicas synced within this
_LIVE_S = 10.0
#: an older generation that no replica synced for this long is forgotten (its replicas are gone)
_IDLE_S = 60.0
#: the keeper's methods as this code calls them; a keeper of another protocol (a cluster that outlived
#: an upgrade of the gateway) is replaced by the first gateway process that finds it
PROTOCOL = 1


def generation_of(digest: str, now: Optional[float] = None) -> str:
    """A deploy's generation: its birth (nanoseconds, so that generations sort by age) and its digest."""
    return f"{int((time.time() if now is None else now) * 1e9):020d}:{digest}"


def _born(generation: str) -> float:
    try:
        return int(generation.split(":", 1)[0]) / 1e9
    except ValueError:
        return 0.0


class Keeper:
    """Every endpoint's pools by generation (``{chat_name: {generation: Pool}}``), in memory only.

    Runs as the actor ``KeyPoolKeeper`` (one call at a time). Answers are plain data; failures come
    back as ``{"error": ErrorInfo fields}`` values, never as raised exceptions (Ray would log their
    traceback).
    """

    def __init__(self) -> None:
        self._pools: dict[str, dict[str, Pool]] = {}
        #: each generation's spec without its keys, pickled (``template_of``): what a key added later is checked with
        self._templates: dict[tuple[str, str], bytes] = {}
        self._synced: dict[tuple[str, str], float] = {}
        #: undeployed names, and when: a replica still stopping may not seed its pool again
        self._dropped: dict[str, float] = {}

    def protocol(self) -> int:
        return PROTOCOL

    def _current(self, chat_name: str, now: float) -> Optional[Pool]:
        """The generation listings show: the newest one in use (a replica synced lately), else the newest."""
        pools = self._pools.get(chat_name)
        if not pools:
            return None
        live = [g for g in pools if now - self._synced.get((chat_name, g), float("-inf")) <= _LIVE_S]
        return pools[max(live or pools)]

    def _sweep(self, chat_name: str, now: float) -> None:
        pools = self._pools.get(chat_name) or {}
        newest = max(pools, default=None)
        for generation in list(pools):
            idle = now - max(self._synced.get((chat_name, generation), 0.0), _born(generation))
            if generation != newest and idle > _IDLE_S:
                del pools[generation]
                self._templates.pop((chat_name, generation), None)
                self._synced.pop((chat_name, generation), None)

    def put(self, chat_name: str, generation: str, template: bytes, keys: list[tuple[SecretStr, int]]) -> None:
        now = time.time()
        pool = Pool(chat_name, generation, [(k.get_secret_value(), w) for k, w in keys], now)
        current = self._current(chat_name, now)
        if current is not None:
            pool.adopt(current)
        self._pools.setdefault(chat_name, {})[generation] = pool
        self._templates[(chat_name, generation)] = template
        self._sweep(chat_name, now)

    def drop(self, chat_name: str, at: float) -> None:
        for generation in self._pools.pop(chat_name, {}):
            self._templates.pop((chat_name, generation), None)
            self._synced.pop((chat_name, generation), None)
        self._dropped[chat_name] = max(at, self._dropped.get(chat_name, 0.0))

    def sync(self, chat_name: str, generation: str, version: int, events: list[tuple],
             counts: dict[str, dict[str, int]]) -> dict[str, Any]:
        """A replica's report; answers ``{"pool"?: snapshot, "check"?: (fingerprint, key)}``, or ``{"seed": True}``
        (unknown here: send your copy) or ``{"gone": True}`` (undeployed: stop syncing)."""
        now = time.time()
        pool = self._pools.get(chat_name, {}).get(generation)
        if pool is None:
            return {"gone": True} if _born(generation) <= self._dropped.get(chat_name, 0.0) else {"seed": True}
        changed = False
        for event in events:
            changed = pool.apply(event) or changed
        pool.count(counts)
        if changed:
            pool.version += 1
        self._synced[(chat_name, generation)] = now
        answer: dict[str, Any] = {}
        if version != pool.version:
            answer["pool"] = pool.snapshot(secrets=True)
        due = pool.claim_check(now)
        if due is not None:
            answer["check"] = (due, SecretStr(pool.secret(due)))
        self._sweep(chat_name, now)
        return answer

    def seed(self, chat_name: str, generation: str, template: bytes, snapshot: dict[str, Any]) -> bool:
        """A replica's copy, after this keeper restarted; the first replica's wins."""
        if _born(generation) <= self._dropped.get(chat_name, 0.0):
            return False
        pools = self._pools.setdefault(chat_name, {})
        if generation not in pools:
            pools[generation] = Pool.from_snapshot(snapshot)
            pools[generation].version += 1  # (every replica takes it, the seeder's news included)
            self._templates[(chat_name, generation)] = template
            self._synced[(chat_name, generation)] = time.time()
        return True

    def views(self, names: Optional[list[str]] = None) -> dict[str, list[dict]]:
        now = time.time()
        out = {}
        for name in (self._pools if names is None else names):
            pool = self._current(name, now)
            if pool is not None:
                out[name] = pool.views(now)
        return out

    def template(self, chat_name: str) -> Optional[tuple[bytes, list[str]]]:
        """(the keyless spec a new key is checked with, the fingerprints in the pool), or None."""
        pool = self._current(chat_name, time.time())
        if pool is None:
            return None
        return self._templates.get((chat_name, pool.generation)), list(pool.keys)

    def edit(self, chat_name: str, op: str, fingerprint: Optional[str] = None, key: Optional[SecretStr] = None,
             weight: Optional[int] = None) -> dict[str, Any]:
        """``add`` (key, weight), ``remove``, ``weight``, ``enable`` (fingerprint): judged on the generation in
        use, applied to every generation. Answers ``{"keys", "key"}``, ``{"missing": True}`` or ``{"error"}``."""
        now = time.time()
        current = self._current(chat_name, now)
        if current is None:
            return {"missing": True}
        pools = [current] + [p for p in self._pools[chat_name].values() if p is not current]
        try:
            for index, pool in enumerate(pools):
                try:
                    if op == "add":
                        fingerprint = pool.add(key.get_secret_value(), weight, now).fingerprint
                    elif op == "remove":
                        pool.remove(fingerprint)
                    elif op == "weight":
                        pool.set_weight(fingerprint, weight)
                    elif op == "enable":
                        pool.enable(fingerprint, now)
                    else:
                        raise GatewayError("invalid_request", f"unknown key pool edit {op!r}")
                except GatewayError:
                    if index == 0:
                        raise
                    continue  # (an older generation without that key: nothing to do there)
                pool.version += 1
        except GatewayError as err:
            return {"error": err.info.model_dump(exclude_none=True)}
        state = current.keys.get(fingerprint)
        return {"keys": current.views(now), "key": state.view() if state is not None else None}


#: the keeper as a detached actor: Ray restarts it when its process dies (its pools come back from the replicas)
KeyPoolKeeper = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(Keeper)


def keeper_actor(namespace: str):
    """The key pools keeper of this cluster (created on first use, on the head node)."""
    return KeyPoolKeeper.options(name=KEEPER_NAME, namespace=namespace, lifetime="detached", get_if_exists=True,
                                 resources={HEAD_NODE_RESOURCE: 0.001}).remote()


async def _answer(ref: Any, timeout: float = _CALL_S) -> Any:
    return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout)


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
                log.warning("key pool of %s: could not sync with the keeper: %s", self.chat_name, type(exc).__name__)
                self._keeper = None
                wait = min(max(wait, SYNC_S) * 2, _SYNC_BACKOFF_MAX_S)
            await asyncio.sleep(0.05)  # (a burst of changes is one sync)

    async def _sync(self) -> Optional[str]:
        if self._keeper is None:
            self._keeper = await asyncio.to_thread(keeper_actor, self._namespace)
        keeper, pool = self._keeper, self.ledger.pool
        events, counts = self.ledger.take()
        try:
            answer = await _answer(keeper.sync.remote(self.chat_name, self.generation, pool.version, events, counts))
        except BaseException:
            self.ledger.give_back(events, counts)
            raise
        if answer.get("gone"):
            log.info("key pool of %s: undeployed, syncing no more", self.chat_name)
            return "gone"
        if answer.get("seed"):  # a keeper that restarted: this copy (its states include the events) seeds it
            log.warning("key pool of %s: the keeper lost it (it restarted); seeding it again", self.chat_name)
            self.ledger.give_back([], counts)
            await _answer(keeper.seed.remote(self.chat_name, self.generation, template_of(self._spec),
                                             self.ledger.pool.snapshot(secrets=True)))
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


class KeyPools:
    """The gateway's side: puts and drops an endpoint's pool at deploy and undeploy, reads them for the
    listings, and edits them (``gateway.key_routes``). One per gateway process (``Endpoints.key_pools``)."""

    def __init__(self, cluster: Any, settings: Any) -> None:
        self.cluster, self.settings = cluster, settings
        self._keeper = None

    def keeper(self):
        if self._keeper is None:
            self.cluster.ensure_up()
            keeper = keeper_actor(self.settings.ray_namespace)
            for _ in range(50):
                try:
                    if ray.get(keeper.protocol.remote(), timeout=_CALL_S) == PROTOCOL:
                        break
                except (AttributeError, ray.exceptions.RayActorError):  # (older than protocols; or just killed)
                    time.sleep(0.1)
                    keeper = keeper_actor(self.settings.ray_namespace)
                    continue
                # (its pools come back from the replicas, which seed the new one)
                log.warning("the key pools keeper runs an older gateway's code: replacing it")
                ray.kill(keeper, no_restart=True)
                time.sleep(0.1)  # (the name is free once the GCS has seen it die)
                keeper = keeper_actor(self.settings.ray_namespace)
            self._keeper = keeper
        return self._keeper

    def ask(self, method: str, *args: Any, timeout: float = _CALL_S, **kwargs: Any) -> Any:
        """One call to the keeper; ``cluster_unavailable`` when it does not answer."""
        try:
            return ray.get(getattr(self.keeper(), method).remote(*args, **kwargs), timeout=timeout)
        except GatewayError:
            raise
        except Exception as exc:  # noqa: BLE001 - a keeper being restarted, a lost cluster
            self._keeper = None
            raise GatewayError("cluster_unavailable", f"the key pools keeper did not answer ({type(exc).__name__}); "
                               f"try again shortly", retry_after=2) from None

    def put(self, spec: Any, generation: str) -> None:
        """Put ``spec``'s pool as ``generation`` (before Serve starts its replicas). Best effort: replicas
        that find no pool in the keeper seed it with theirs."""
        try:
            self.ask("put", spec.chat_name, generation, template_of(spec),
                     [(SecretStr(key), weight) for key, weight in spec.pool()])
        except GatewayError as err:
            log.warning("key pool of %s not put (its workers will seed it): %s", spec.chat_name, err.info.message)

    def drop(self, chat_name: str) -> None:
        try:
            self.ask("drop", chat_name, time.time())
        except GatewayError as err:
            log.warning("key pool of %s not dropped: %s", chat_name, err.info.message)

    def views(self, names: Optional[list[str]] = None) -> dict[str, list[dict]]:
        """The key views of ``names``' pools (what listings show); nothing when the keeper does not answer soon."""
        try:
            return self.ask("views", names, timeout=_VIEWS_S)
        except GatewayError:
            return {}


def template_of(spec: Any) -> bytes:
    """``spec`` without its keys, pickled: the keeper keeps it as bytes (it never needs a provider's classes)."""
    from ray import cloudpickle

    return cloudpickle.dumps(spec.for_key(""))
