"""Client-key limits that hold for the whole cluster: upstream calls and tokens a minute per key.

A key's ``rate_per_minute`` and ``tokens_per_minute`` are token buckets kept by one small
detached actor (``LimitKeeper``) that every gateway process shares, so W gunicorn workers
in P pods give a caller the rate once, not W x P times, and a restarted worker does not
start with a full bucket. The buckets are written through to the GCS key-value store (as
the endpoint registry's records are), so a restart of the keeper itself refills nothing.

What costs what (``Caller``, used by ``Dispatcher._walk``):

- every endpoint the dispatcher actually calls (the primary, each fallback tried, each
  target of a broadcast) takes one request just before the call; a replica's own retries
  (``attempts - 1``) are charged after the answer, as debt; routes that call no endpoint
  (``GET /v1/models``) cost nothing;
- the answer's ``usage.total_tokens`` is charged after the answer; a key is refused while
  its token balance is used up (at or past ``tokens_per_minute``), so one call can
  overshoot by its own usage;
- a bucket holds ``max(rate, 1)``, so a fractional rate works: 0.5 a minute admits one
  call, then one every two minutes.

Off the hot path: a process takes a *lease* of about one second of the rate (at least one
call) from the keeper and spends it locally, asking again when it is spent or after
``LEASE_TTL_S`` (unspent calls go back then). A refusal is remembered locally until the
bucket refills, so a caller hammering past its rate costs the keeper nothing. What answers
cost after the fact (retries, tokens) is counted in the process at once and sent to the
keeper with the next lease, or within ``FLUSH_S`` without waiting for it: one actor call
per answer would queue up under load. Keys without limits cost nothing at all. Leases never admit more than the cluster's bucket
gave out; what one idle process holds (at most a second of the rate) waits for it. A key
with only ``tokens_per_minute`` leases time instead: calls for up to ``LEASE_TTL_S`` while
its balance lasts, as known at the lease and counting this process's own charges since,
so other processes' charges are seen within that time.

The keeper knows keys only by ``ClientKey.id`` (a hash that leads back to no key), and
their limits come with each call, so it holds nothing secret and needs no configuration.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from typing import Optional

import ray
from ray.exceptions import RayError
from ray.experimental import internal_kv

from .auth import ClientKey
from .errors import GatewayError, whole_seconds
from .registry import HEAD_NODE_RESOURCE

log = logging.getLogger("gateway.limits")

KEEPER_NAME = "client_limits"
#: a lease holds about this many seconds of a key's rate (at least one call)
LEASE_S = 1.0
#: unspent lease calls go back to the keeper after this (an idle process holds nothing long)
LEASE_TTL_S = 2.0
#: what answers cost after the fact (retries, tokens) goes to the keeper at most this often per
#: key and process (with the next lease, or within this time): one actor call per answer would
#: queue up behind each other under load
FLUSH_S = 0.5
#: how long a call waits for the keeper (a restart by Ray takes a few seconds)
_KEEPER_WAIT_S = 10.0


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class LimitKeeper:
    """The buckets of every limited key, by key id: ``{"requests", "tokens", "at"}``.

    Restarted by Ray whenever its process dies; each bucket is read back from the GCS the
    first time it is used again. (A call retried after a restart may be charged twice:
    limits err on the side of refusing.)
    """

    def __init__(self) -> None:
        self._kv_namespace = "llm_gateway_limits:" + ray.get_runtime_context().namespace
        self._buckets: dict[str, dict] = {}

    def _bucket(self, kid: str, rpm: Optional[float], tpm: Optional[float]) -> dict:
        """The bucket of ``kid``, refilled to now under the limits the caller has (a key seen for
        the first time, or a limit just added, starts full)."""
        now = time.time()
        bucket = self._buckets.get(kid)
        if bucket is None:
            raw = internal_kv._internal_kv_get(kid, namespace=self._kv_namespace)
            bucket = json.loads(raw) if raw else {"requests": None, "tokens": None, "at": now}
            self._buckets[kid] = bucket
        elapsed = max(0.0, now - bucket["at"])
        bucket["at"] = now
        for part, per_minute in (("requests", rpm), ("tokens", tpm)):
            if per_minute is None:
                bucket[part] = None
            elif bucket[part] is None:
                bucket[part] = max(per_minute, 1.0)
            else:
                bucket[part] = min(max(per_minute, 1.0), bucket[part] + elapsed * per_minute / 60.0)
        return bucket

    def _save(self, kid: str, bucket: dict) -> None:
        internal_kv._internal_kv_put(kid, json.dumps(bucket), namespace=self._kv_namespace)

    def lease(self, kid: str, rpm: Optional[float], tpm: Optional[float], want: int, calls_back: float,
              tokens_used: float) -> tuple[int, Optional[float], float, str]:
        """Settle what the caller owes or returns, then lease up to ``want`` calls.

        ``calls_back``: what the last lease left unspent, less the retries charged since (may be
        negative); ``tokens_used``: tokens charged since the last flush. Answers ``(calls granted,
        token balance, seconds to wait, "requests" | "tokens" | "")``; 0 calls granted is a refusal
        (a key with no request rate gets ``want``).
        """
        bucket = self._bucket(kid, rpm, tpm)
        if rpm is not None and calls_back:
            bucket["requests"] = min(max(rpm, 1.0), bucket["requests"] + calls_back)
        if tpm is not None:
            bucket["tokens"] -= tokens_used
        granted, wait, why = 0, 0.0, ""
        if tpm is not None and bucket["tokens"] <= 0:
            wait, why = (1.0 - bucket["tokens"]) * 60.0 / tpm, "tokens"
        elif rpm is not None and bucket["requests"] < 1:
            wait, why = (1.0 - bucket["requests"]) * 60.0 / rpm, "requests"
        elif rpm is not None:
            granted = min(want, int(bucket["requests"]))
            bucket["requests"] -= granted
        else:
            granted = want
        self._save(kid, bucket)
        return granted, bucket["tokens"], wait, why

    def charge(self, kid: str, rpm: Optional[float], tpm: Optional[float], requests: float, tokens: float) -> None:
        """After the fact: a replica's retries (``requests``) and an answer's usage (``tokens``)."""
        bucket = self._bucket(kid, rpm, tpm)
        if rpm is not None:
            bucket["requests"] -= requests
        if tpm is not None:
            bucket["tokens"] -= tokens
        self._save(kid, bucket)


def keeper_actor(namespace: str):
    """The limits keeper of this cluster (created on first use, on the head node like the registry)."""
    return LimitKeeper.options(name=KEEPER_NAME, namespace=namespace, lifetime="detached", get_if_exists=True,
                               resources={HEAD_NODE_RESOURCE: 0.001}).remote()


class _Lease:
    """What this process holds of one key's bucket."""

    __slots__ = ("lock", "calls", "tokens", "until", "refused_until", "refused_for", "owed_calls", "owed_tokens",
                 "flushed_at", "flush_due")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls = 0.0  # left to spend here (inf for a key with no request rate)
        self.tokens: Optional[float] = None  # token balance at the lease, less this process's charges since
        self.until = 0.0  # monotonic end of the lease
        self.refused_until = 0.0  # the keeper refused: refuse here too until then
        self.refused_for = ""
        self.owed_calls = 0.0  # retries charged here, not yet sent to the keeper
        self.owed_tokens = 0.0  # tokens charged here, not yet sent
        self.flushed_at = -FLUSH_S  # when owed charges were last sent (monotonic)
        self.flush_due = False  # a timer will send them


class Limits:
    """This process's side of the client-key limits: leases over the cluster's ``LimitKeeper``.

    ``lease_size`` fixes the calls per lease (1: every call asks the keeper; the benchmark's
    "no leases"); by default a lease is about ``LEASE_S`` of the key's rate.
    """

    def __init__(self, cluster, settings, lease_size: Optional[int] = None) -> None:
        self.cluster = cluster
        self.settings = settings
        self.lease_size = lease_size
        self._leases: dict[str, _Lease] = {}
        self._lock = threading.Lock()
        self._keeper = None

    def caller(self, key: Optional[ClientKey]) -> Optional["Caller"]:
        """What the dispatcher needs of a request's key; None when keys are off or the admin calls."""
        return None if key is None else Caller(self, key)

    # -- the keeper --------------------------------------------------------------------------
    def keeper(self):
        if self._keeper is None:
            self.cluster.ensure_up()
            self._keeper = keeper_actor(self.settings.ray_namespace)
        return self._keeper

    def _lease(self, key: ClientKey) -> _Lease:
        lease = self._leases.get(key.id)
        if lease is None:
            with self._lock:
                lease = self._leases.setdefault(key.id, _Lease())
        return lease

    # -- per call --------------------------------------------------------------------------
    def admit(self, key: ClientKey) -> None:
        """Spend one call of ``key``'s limits, or raise ``rate_limited`` (with ``Retry-After``)."""
        if not key.limited:
            return
        lease = self._lease(key)
        with lease.lock:
            now = time.monotonic()
            if now < lease.refused_until:
                raise _refusal(key, lease.refused_for, lease.refused_until - now)
            if not (now < lease.until and lease.calls >= 1 and (lease.tokens is None or lease.tokens > 0)):
                self._renew(key, lease, now)
            lease.calls -= 1

    def _renew(self, key: ClientKey, lease: _Lease, now: float) -> None:
        """Return what the lease left and what this process owes, and take a new lease (or a refusal)."""
        rpm, tpm = key.rate_per_minute, key.tokens_per_minute
        calls_back = (lease.calls if (rpm is not None and lease.calls > 0) else 0.0) - lease.owed_calls
        tokens_used = lease.owed_tokens
        lease.calls, lease.until, lease.owed_calls, lease.owed_tokens, lease.flushed_at = 0.0, 0.0, 0.0, 0.0, now
        want = self.lease_size or (max(1, int(rpm * LEASE_S / 60.0)) if rpm is not None else 1)
        try:
            self.cluster.ensure_up()
            granted, balance, wait, why = ray.get(self.keeper().lease.remote(key.id, rpm, tpm, want, calls_back, tokens_used),
                                                  timeout=_KEEPER_WAIT_S)
        except (RayError, TimeoutError) as exc:
            log.warning("the client-key limits keeper did not answer (%s); refusing %s's call", type(exc).__name__, key.name)
            raise GatewayError("cluster_unavailable", "the cluster's client-key limits did not answer", retry_after=2) from None
        if not granted:
            lease.refused_until, lease.refused_for = now + wait, why
            raise _refusal(key, why, wait)
        lease.calls = float(granted) if rpm is not None else math.inf
        lease.tokens = balance
        lease.until = now + LEASE_TTL_S

    def settle(self, key: ClientKey, attempts: int, total_tokens: int) -> None:
        """After an upstream call: charge the replica's retries and the tokens the answer used.

        This process's lease counts them at once; the keeper gets them with the next lease, or
        within ``FLUSH_S`` (without waiting for it), so other processes see them shortly.
        """
        if not key.limited:
            return
        retries = max(0, (attempts or 1) - 1) if key.rate_per_minute is not None else 0
        tokens = max(0, total_tokens or 0) if key.tokens_per_minute is not None else 0
        if not retries and not tokens:
            return
        lease = self._lease(key)
        with lease.lock:
            lease.owed_calls += retries
            lease.owed_tokens += tokens
            if lease.tokens is not None:
                lease.tokens -= tokens
            wait = lease.flushed_at + FLUSH_S - time.monotonic()
            if wait <= 0:
                self._flush_locked(key, lease)
            elif not lease.flush_due:
                lease.flush_due = True
                timer = threading.Timer(wait, self._flush, args=(key,))
                timer.daemon = True
                timer.start()

    def _flush(self, key: ClientKey) -> None:
        lease = self._lease(key)
        with lease.lock:
            lease.flush_due = False
            self._flush_locked(key, lease)

    def _flush_locked(self, key: ClientKey, lease: _Lease) -> None:
        """Send what this process owes for ``key`` (under its lease's lock: before any later lease of it)."""
        if not (lease.owed_calls or lease.owed_tokens):
            return
        try:
            self.keeper().charge.remote(key.id, key.rate_per_minute, key.tokens_per_minute, lease.owed_calls, lease.owed_tokens)
        except Exception as exc:  # noqa: BLE001 - the answer is already in hand; a lost charge only errs towards the caller
            log.warning("could not charge %s's usage to the limits keeper: %s", key.name, type(exc).__name__)
        lease.owed_calls, lease.owed_tokens, lease.flushed_at = 0.0, 0.0, time.monotonic()


def _refusal(key: ClientKey, why: str, wait: float) -> GatewayError:
    if why == "tokens":
        what = f"its {key.tokens_per_minute:g} tokens a minute"
    else:
        what = f"its rate of {key.rate_per_minute:g} requests a minute (each endpoint called counts)"
    return GatewayError("rate_limited", f"{key.name} is over {what}: try again in {whole_seconds(wait)}s",
                        retry_after=max(1.0, wait))


class Caller:
    """A request's client key as the dispatcher sees it: which endpoints it may reach, and its limits."""

    __slots__ = ("_limits", "key")

    def __init__(self, limits: Limits, key: ClientKey) -> None:
        self._limits, self.key = limits, key

    @property
    def name(self) -> str:
        return self.key.name

    def allows(self, chat_name: str) -> bool:
        return self.key.allows(chat_name)

    def admit(self) -> None:
        """Just before an endpoint is called: one call of the key's limits, or ``rate_limited``."""
        self._limits.admit(self.key)

    def settle(self, attempts: int, total_tokens: int) -> None:
        """After it answered (or failed after retries): the retries and the tokens."""
        self._limits.settle(self.key, attempts, total_tokens)
