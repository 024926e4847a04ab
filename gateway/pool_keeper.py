"""Key pools shared by the cluster: the keeper's logic (``Keeper``; ``gateway.key_pools`` runs it as an actor,
``gateway.pool_member`` is a replica's side of it).

One small detached actor (named ``key_pools`` in the gateway's namespace, on the
head node like the endpoint registry and the limits keeper) holds every endpoint's pool
(``gateway.keypool.Pool``), keys and states, in memory only: never in the GCS, on disk or in a log.

- The gateway puts an endpoint's pool there at deploy, before Serve starts it (``key_pools.KeyPools.put``;
  not on an unchanged redeploy), as a new *generation* (the deploy's birth time and digest): the
  replicas of a rolling update keep syncing with their own generation until they stop. Undeploy
  drops every generation. A key edit (``gateway.key_routes``) applies to every generation.
- Each replica (``pool_member.PoolMember``) keeps its own copy, picks keys from it, applies what its calls say
  about them at once, and syncs with the keeper in the background: about every ``SYNC_S``, and at
  once after a state changed. A sync sends what it saw and gets the pool back when its version
  changed, and sometimes a disabled key to check (``claim_check``): the replica checks it with the
  provider's free key check (``Provider.verify_key``) in a thread and reports the result.
- A keeper that restarted (Ray restarts it; its memory is gone) answers a sync with ``seed``: the
  replica sends its copy, keys and states, and the pool carries on. A keeper that cannot be reached
  costs nothing but the sharing: each replica goes on with its own copy.

This module is the keeper's logic (``Keeper``), pure: no Ray, no I/O. Its actor and the gateway's
side are ``gateway.key_pools``; a replica's side is ``gateway.pool_member``; the pool itself is
``gateway.keypool``.
"""
from __future__ import annotations

import time
from typing import Any, Optional

from pydantic import SecretStr

from contract.errors import GatewayError
from .keypool import Pool

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

    Runs as the actor ``key_pools`` (``gateway.key_pools``; one call at a time). Answers are plain data; failures come
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
