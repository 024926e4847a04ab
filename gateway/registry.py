"""The endpoint registry: one small detached actor that every gateway process shares.

It holds what the gateway knows about each endpoint besides Serve's own state
(provider, model, base URL host, key fingerprint, times), never a key, and it
serialises deploy/undeploy of one ``chat_name`` across gunicorn workers.
It lives in the cluster, so restarting the gateway loses nothing.

Its records (never a key, never a secret) are written through to the GCS's key-value
store, so when the actor's process dies Ray starts it again (on the head node, where the
GCS is) with every endpoint it knew. What is not kept across such a restart: cooldown
state (the next failures start a cooldown again) and the short leases of deploys,
probes and the endpoints-file apply (they are free again; a holder's next renewal takes
its lease again).

It keeps the leases of the endpoints-file apply and of each ``chat_name`` (``gateway.leases``).
It stores plain dicts (a record an older gateway wrote loads as it is); the gateway calls it only
through ``gateway.registry_client``, which types them (``gateway.records``).

The same namespace of the key-value store holds the cluster's digest secret (32 random
bytes, made once per cluster): ``config_digest`` is an HMAC with it (``cluster_digest_secret``).
"""
from __future__ import annotations

import json
import logging
import os
import platform
import time
from typing import Optional

from . import actors
from .actors import ActorCallFailed
from .leases import Leases, endpoint_lease

REGISTRY_NAME = "endpoint_registry"

#: where the records are kept in the GCS key-value store
_KV_KEY = "endpoints"
#: where the cluster's digest secret is kept, next to them
_DIGEST_SECRET_KEY = "config_digest_secret"

log = logging.getLogger("gateway.registry")


def kv_namespace(ray_namespace: str) -> str:
    """The GCS key-value namespace of one gateway (one Ray namespace: one registry)."""
    return "llm_gateway_registry:" + ray_namespace


def cluster_digest_secret(ray_namespace: str) -> bytes:
    """This cluster's key for ``DeploySpec.digest``: made on first use, the same ever after.

    Kept in the GCS, like the records whose ``config_digest`` it keys, so both live and go
    with the cluster. Read by each gateway process directly (a put-if-absent, then a get;
    racing processes agree), not through the registry actor: a detached registry started by
    an older gateway keeps running old code. Never shown, logged or put in a spec.
    """
    namespace = kv_namespace(ray_namespace)
    actors.kv_put(_DIGEST_SECRET_KEY, os.urandom(32), namespace, overwrite=False)
    secret = actors.kv_get(_DIGEST_SECRET_KEY, namespace)
    if not secret or len(secret) < 32:
        raise RuntimeError("the cluster's digest secret could not be read from the GCS")
    return secret


# Restarted whenever its process dies; a call made meanwhile waits for the new process and
# is run there (every method is safe to run twice: reads, or writes of the same value). A plain class:
# ``registry_actor`` makes it the detached actor (``actors.named_actor``).
class EndpointRegistry:
    def protocol(self) -> int:
        """What its methods take and answer (``PROTOCOL``): an older registry is replaced (``registry_actor``)."""
        return PROTOCOL

    def __init__(self) -> None:
        # one registry per Ray namespace, so one set of keys per namespace
        self._kv_namespace = kv_namespace(actors.runtime_namespace())
        self._records: dict[str, dict] = self._load()
        self._leases = Leases()
        self._healths: dict[str, dict] = {}

    # -- write-through to the GCS --------------------------------------------------
    def _load(self) -> dict[str, dict]:
        raw = actors.kv_get(_KV_KEY, self._kv_namespace)
        return json.loads(raw) if raw else {}

    def _store(self, name: str, record: Optional[dict]) -> None:
        """Change one record, and write them all."""
        if record is None:
            self._records.pop(name, None)
        else:
            self._records[name] = record
        self._write()

    def _write(self) -> None:
        """All records as one value (a few KiB: atomic, one round trip)."""
        actors.kv_put(_KV_KEY, json.dumps(self._records, default=str), self._kv_namespace)

    def pid(self) -> int:
        import os

        return os.getpid()

    def versions(self) -> dict:
        return {"ray": actors.ray_version(), "python": platform.python_version()}

    def get(self, name: str) -> Optional[dict]:
        record = self._records.get(name)
        return None if record is None else {**record, "health": self._health_view(name)}

    def list(self) -> list[dict]:
        return [{**r, "health": self._health_view(n)} for n, r in self._records.items()]

    # -- health: shared cooldown state -----------------------------------------------
    def _health(self, name: str) -> dict:
        return self._healths.setdefault(name, {"failures": [], "cooldown_until": 0.0, "probe_until": 0.0,
                                               "last_error": None, "cooldowns": 0})

    def _health_view(self, name: str) -> dict:
        h = self._healths.get(name)
        if h is None:
            return {"state": "ok", "consecutive_failures": 0}
        now = time.time()
        if h["cooldown_until"] > now:
            state = "cooling_down"
        elif h["cooldown_until"] and h["probe_until"] > now:
            state = "probing"
        elif h["cooldown_until"]:
            state = "probe_due"
        else:
            state = "ok"
        return {"state": state, "consecutive_failures": len(h["failures"]), "cooldown_until": h["cooldown_until"] or None,
                "last_error": h["last_error"], "cooldowns": h["cooldowns"]}

    def record_failure(self, name: str, error_type: str, immediate: bool, failures: int, window_s: float,
                       cooldown_s: float) -> dict:
        """Count an upstream failure; the caller's cooldown policy decides (no global config here)."""
        h, now = self._health(name), time.time()
        h["failures"] = [t for t in h["failures"] if now - t <= window_s] + [now]
        h["last_error"] = error_type
        h["probe_until"] = 0.0
        if immediate or len(h["failures"]) >= failures or h["cooldown_until"]:
            # a failed probe (cooldown_until still set) starts a new period at once
            h["cooldown_until"] = now + cooldown_s
            h["cooldowns"] += 1
        return self._health_view(name)

    def record_success(self, name: str) -> dict:
        h = self._health(name)
        h.update(failures=[], cooldown_until=0.0, probe_until=0.0)
        return self._health_view(name)

    def release_probe(self, name: str) -> None:
        """The probe ended without an upstream verdict (a caller error, a busy endpoint): free the lease."""
        h = self._healths.get(name)
        if h is not None:
            h["probe_until"] = 0.0

    def claim_probe(self, name: str, lease_s: float) -> bool:
        """After a cooldown, exactly one caller at a time may try the endpoint again."""
        h, now = self._health(name), time.time()
        if h["cooldown_until"] > now or h["probe_until"] > now:
            return False
        h["probe_until"] = now + lease_s
        return True

    def begin(self, name: str, provider: str, owner: str, ttl_s: float) -> tuple[str, Optional[dict]]:
        """Claim ``name``'s lease for ``owner`` (a deploy): ("ok", record) | ("conflict", record) | ("busy", holder)."""
        record = self._records.get(name)
        if record is not None and record["provider"] != provider and record.get("status") != "DEPLOY_FAILED":
            return "conflict", record  # (a failed deploy holds its name for no provider)
        holder = self._leases.claim(endpoint_lease(name), owner, ttl_s)
        if holder is not None:
            return "busy", holder
        return "ok", record

    def finish(self, name: str, record: Optional[dict], owner: str) -> bool:
        """Release ``name``'s lease held by ``owner``; store ``record``, or forget the endpoint when it is None.

        False, and nothing stored, when another owner holds the lease now (``owner``'s expired and
        was taken): that holder's view of the endpoint stands. A new deploy or update starts with a
        clean health: the failures were the old configuration's (a wrong key, a dead base URL), not
        the new one's.
        """
        key = endpoint_lease(name)
        if not self._leases.may_write(key, owner):
            return False
        self._leases.release(key, owner)
        self._healths.pop(name, None)
        self._store(name, record)
        return True

    def settle(self, name: str, deploy_id: str, ok: bool, failure: Optional[dict], now: str) -> Optional[str]:
        """End the pending deploy ``deploy_id`` of ``name`` exactly once (compare-and-set).

        Answers ``RUNNING``, ``DEPLOY_FAILED`` (a fresh endpoint: the caller deletes its
        application), ``UPDATE_FAILED`` (the previous replicas keep serving) or None when
        that deploy was already settled, replaced or undeployed.
        """
        record = self._records.get(name)
        pending = (record or {}).get("pending")
        if not pending or pending["id"] != deploy_id:
            return None
        record = {k: v for k, v in record.items() if k != "pending"}
        if ok:
            record.update(pending["public"], config_digest=pending["digest"], status="RUNNING", updated_at=now)
            record.pop("failure", None)
            self._healths.pop(name, None)  # the new replicas (and key) serve from now on
            outcome = "RUNNING"
        elif pending["fresh"]:
            record.update(status="DEPLOY_FAILED", failure=failure, updated_at=now)
            outcome = "DEPLOY_FAILED"
        else:
            record["last_update_failure"] = failure
            outcome = "UPDATE_FAILED"
        self._store(name, record)
        return outcome

    def dependents(self, name: str) -> list[str]:
        """The endpoints that name ``name`` among their fallbacks."""
        return sorted(n for n, r in self._records.items() if name in (r.get("fallbacks") or []))

    def drop_fallback(self, name: str) -> list[str]:
        """Take ``name`` out of every endpoint's fallbacks; answers the endpoints changed."""
        changed = self.dependents(name)
        for other in changed:
            self._records[other] = {**self._records[other],
                                    "fallbacks": [f for f in self._records[other]["fallbacks"] if f != name]}
        if changed:
            self._write()
        return changed

    # -- leases (see ``Leases``) ---------------------------------------------------------
    def claim_lease(self, key: str, owner: str, ttl_s: float) -> Optional[dict]:
        """None when ``owner`` holds ``key`` now, else who holds it (owner, host, pid, expires_in_s)."""
        return self._leases.claim(key, owner, ttl_s)

    def renew_lease(self, key: str, owner: str, ttl_s: float) -> bool:
        return self._leases.renew(key, owner, ttl_s)

    def release_lease(self, key: str, owner: str) -> bool:
        return self._leases.release(key, owner)

    def leases(self) -> dict[str, dict]:
        """Every lease held now (the endpoints-file apply, deploys and undeploys), by key."""
        return self._leases.view()

#: the registry's methods as this code calls them; raised when they change (2: owner-tagged leases)
PROTOCOL = 2


def registry_actor(namespace: str):
    """The registry actor of this cluster (created on first use).

    A detached actor outlives the gateway that made it and keeps running that gateway's code: one
    an older gateway started (a cluster that outlived an upgrade) is killed and made again, once, by
    the first process that finds it; its records come back from the GCS, where they are kept. (Its
    leases and health are forgotten, as on any restart of it.)
    """
    def make():
        return actors.named_actor(EndpointRegistry, REGISTRY_NAME, namespace)

    registry = make()
    try:
        current = actors.call(registry, "protocol", timeout=60) == PROTOCOL
    except AttributeError:  # (its class has no such method: older than protocols)
        current = False
    if not current:
        log.warning("the endpoint registry runs an older gateway's code: replacing it (its records stay)")
        actors.kill(registry)
        for _ in range(50):  # (the name is free once the GCS has seen it die)
            try:
                registry = make()
                if actors.call(registry, "protocol", timeout=60) == PROTOCOL:
                    break
            except AttributeError:
                pass
            except ActorCallFailed as exc:
                if not exc.died:  # (only the old one, just killed, is waited for)
                    raise
            time.sleep(0.1)
    return registry
