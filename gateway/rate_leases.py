"""The request rate of client keys (``rate_per_minute``), for the whole cluster: leases of the keeper's buckets.

The limits keeper (``gateway.keeper``) holds a token bucket per key, written through to the GCS
key-value store (as the endpoint registry's records are), so a restart of the keeper refills nothing.

- every endpoint the dispatcher actually calls (the primary, each fallback tried, each
  target of a broadcast) takes one request just before the call; a replica's own retries
  (``attempts - 1``) are charged after the answer, as debt; routes that call no endpoint
  (``GET /v1/models``) cost nothing;
- a bucket holds ``max(rate, 1)``, so a fractional rate works: 0.5 a minute admits one
  call, then one every two minutes.

Off the hot path: a process takes a *lease* of about one second of the rate (at least one
call) from the keeper and spends it locally, asking again when it is spent or after
``LEASE_TTL_S`` (unspent calls go back then). A refusal is remembered locally until the
bucket refills, so a caller hammering past its rate costs the keeper nothing. Retries are
counted in the process at once and sent to the keeper with the next lease, or within
``FLUSH_S`` without waiting for it: one actor call per answer would queue up under load.
Leases never admit more than the cluster's bucket gave out; what one idle process holds (at
most a second of the rate) waits for it.

A slow or stopped keeper costs a key's callers little and the rest nothing (see ``gateway.limits``):
a process asks for at most one lease per key at a time; the caller that asks waits up to
``_KEEPER_WAIT_S``, the key's other callers at most ``_WAITER_WAIT_S``; then 503
``cluster_unavailable`` at once while the request stays unanswered, or for ``_KEEPER_BACKOFF_S``
after the keeper failed it. Ray-free: the keeper's handle comes from ``Limits.keeper``.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import Any, Optional

from .auth import ClientKey
from contract.errors import GatewayError, whole_seconds
from .keeper_terms import KEEPER_BACKOFF_S, KEEPER_WAIT_S, keeper_down

log = logging.getLogger("gateway.limits")

#: a lease holds about this many seconds of a key's rate (at least one call)
LEASE_S = 1.0
#: unspent lease calls go back to the keeper after this (an idle process holds nothing long)
LEASE_TTL_S = 2.0
#: what answers cost after the fact (a replica's retries) goes to the keeper at most this often per
#: key and process (with the next lease, or within this time): one actor call per answer would
#: queue up behind each other under load
FLUSH_S = 0.5
#: how long the caller that asks for a lease waits for the keeper (a restart by Ray usually fits);
#: a request unanswered after this is overdue: its key's callers are answered 503 at once
_KEEPER_WAIT_S = KEEPER_WAIT_S
#: how long the key's other callers wait for a lease request in flight (one per key and process)
_WAITER_WAIT_S = 1.0
#: after the keeper failed a lease request, its key's callers are answered 503 at once for this long
_KEEPER_BACKOFF_S = KEEPER_BACKOFF_S
#: a lease request still unanswered after this is given up (its answer is dropped), and the next
#: caller asks again: a hung keeper costs one call per key and process this often
_KEEPER_GIVE_UP_S = 30.0


class _Signal:
    """Set once, from any thread; awaited on the event loop (``wait``)."""

    __slots__ = ("_future",)

    def __init__(self) -> None:
        self._future: concurrent.futures.Future = concurrent.futures.Future()

    def set(self) -> None:
        try:
            self._future.set_result(None)
        except concurrent.futures.InvalidStateError:  # (set already)
            pass

    async def wait(self, timeout: float) -> bool:
        """Whether it was set within ``timeout`` seconds."""
        if timeout > 0 and not self._future.done():
            try:  # (shielded: giving up on the wait never cancels the signal itself)
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._future)), timeout)
            except asyncio.TimeoutError:
                pass
        return self._future.done()


class _Renewal:
    """One lease request of a key to the keeper, in flight (at most one per key and process)."""

    __slots__ = ("started", "args", "ref", "done", "overdue_logged")

    def __init__(self, started: float, args: tuple) -> None:
        self.started = started  # monotonic
        self.args = args  # LimitKeeper.lease's arguments after the key id
        self.ref = None  # the request's ObjectRef (held until it is answered)
        self.done = _Signal()  # set once the lease holds its answer (or its failure)
        self.overdue_logged = False


class _Lease:
    """What this process holds of one key's bucket.

    ``lock`` guards the fields and is held only for moments: never across a call to the keeper.
    """

    __slots__ = ("lock", "calls", "until", "refused_until", "refused_for", "owed_calls", "flushed_at", "flush_due",
                 "renewal", "down_until", "down_why")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.renewal: Optional[_Renewal] = None  # the lease request in flight
        self.down_until = 0.0  # the keeper failed a lease request: answer 503 at once until then (monotonic)
        self.down_why = ""
        self.calls = 0.0  # left to spend here
        self.until = 0.0  # monotonic end of the lease
        self.refused_until = 0.0  # the keeper refused: refuse here too until then
        self.refused_for = ""
        self.owed_calls = 0.0  # retries charged here, not yet sent to the keeper
        self.flushed_at = -FLUSH_S  # when owed charges were last sent (monotonic)
        self.flush_due = False  # a timer will send them


class RateLeases:
    """This process's leases of the keys' request rates over the cluster's ``LimitKeeper`` (that of
    ``limits``, a ``gateway.limits.Limits``: its keeper and cluster).

    ``lease_size`` fixes the calls per lease (1: every call asks the keeper; the benchmark's
    "no leases"); by default a lease is about ``LEASE_S`` of the key's rate.
    """

    def __init__(self, limits: Any, lease_size: Optional[int] = None) -> None:
        self._limits = limits
        self.lease_size = lease_size
        self._leases: dict[str, _Lease] = {}
        self._lock = threading.Lock()

    def _lease(self, key: ClientKey) -> _Lease:
        lease = self._leases.get(key.id)
        if lease is None:
            with self._lock:
                lease = self._leases.setdefault(key.id, _Lease())
        return lease

    # -- per call --------------------------------------------------------------------------
    async def admit(self, key: ClientKey) -> None:
        """Spend one call of ``key``'s request rate, or raise ``rate_limited`` (with ``Retry-After``).

        When the lease is spent, one caller asks the keeper (``_KEEPER_WAIT_S`` at most) while the
        key's others wait for that answer (``_WAITER_WAIT_S`` at most); a keeper that does not answer
        in time, or failed, is ``cluster_unavailable`` (503, ``Retry-After``), answered at once
        until it answers (see the module docstring).
        """
        if key.rate_per_minute is None:
            return
        lease = self._lease(key)
        while True:
            ask = False
            with lease.lock:
                now = time.monotonic()
                if now < lease.refused_until:
                    raise _refusal(key, lease.refused_for, lease.refused_until - now)
                if now < lease.until and lease.calls >= 1:
                    lease.calls -= 1
                    return
                renewal = lease.renewal
                if renewal is not None and now - renewal.started >= _KEEPER_GIVE_UP_S:
                    log.warning("the client-key limits keeper has not answered %s's lease request for %.0fs; asking again",
                                key.name, now - renewal.started)
                    lease.renewal = renewal = None  # (its answer, should it come, is dropped)
                if renewal is None:
                    if now < lease.down_until:
                        raise _keeper_down(key, lease.down_why, lease.down_until - now)
                    renewal, ask, wait = self._begin(key, lease, now), True, _KEEPER_WAIT_S
                else:  # (one in flight: wait for its answer, never past its own time)
                    wait = min(_WAITER_WAIT_S, renewal.started + _KEEPER_WAIT_S - now)
            if ask:
                self._ask(key, lease, renewal)
            if wait <= 0 or not await renewal.done.wait(wait):
                unanswered = time.monotonic() - renewal.started
                if unanswered >= _KEEPER_WAIT_S and not renewal.overdue_logged:
                    renewal.overdue_logged = True
                    log.warning("the client-key limits keeper did not answer %s's lease request within %gs; the key's "
                                "calls are answered 503 until it does", key.name, _KEEPER_WAIT_S)
                raise _keeper_down(key, f"has not answered for {unanswered:.1f}s", _KEEPER_BACKOFF_S)
            # the answer is in (a lease, a refusal or a failure): look again

    def refund(self, key: ClientKey) -> None:
        """Give back a call ``admit`` spent on an endpoint that was then not called (it was busy)."""
        if key.rate_per_minute is None:
            return  # (nothing was spent)
        lease = self._lease(key)
        with lease.lock:
            lease.calls += 1  # (returned to the keeper with the next lease request, if not spent here first)

    def _begin(self, key: ClientKey, lease: _Lease, now: float) -> _Renewal:
        """A lease request (under the lease's lock): what the lease left and what this process owes go with it."""
        rpm = key.rate_per_minute
        calls_back = (lease.calls if lease.calls > 0 else 0.0) - lease.owed_calls
        lease.calls, lease.until, lease.owed_calls, lease.flushed_at = 0.0, 0.0, 0.0, now
        want = self.lease_size or max(1, int(rpm * LEASE_S / 60.0))
        # (tokens are reserved and settled apart: ``reserve``; the keeper's lease still takes them, as None and 0)
        lease.renewal = _Renewal(now, (rpm, None, want, calls_back, 0.0))
        return lease.renewal

    def _ask(self, key: ClientKey, lease: _Lease, renewal: _Renewal) -> None:
        """Send the lease request (outside the lease's lock); its answer lands in ``_answered``."""
        try:
            self._limits.cluster.ensure_up()
            renewal.ref = self._limits.keeper().lease.remote(key.id, *renewal.args)
            future = renewal.ref.future()
        except GatewayError:  # the cluster is lost (answered at once): no backoff, the next caller asks it again
            with lease.lock:
                if lease.renewal is renewal:
                    lease.renewal = None
            renewal.done.set()
            raise
        except Exception as exc:  # noqa: BLE001 - whatever Ray raised, the keeper cannot be asked now
            self._answered(key, lease, renewal, None, exc)
            return
        future.add_done_callback(lambda done: self._answered(key, lease, renewal, done, None))

    def _answered(self, key: ClientKey, lease: _Lease, renewal: _Renewal, future, error: Optional[BaseException]) -> None:
        """The keeper's answer (or failure) to ``renewal``, into the lease; wakes whoever waits for it.

        Runs in the thread that completes the request's future (Ray's); holds the lock for a moment only.
        """
        current, now = False, time.monotonic()
        try:
            if error is None:
                error = future.exception()
            with lease.lock:
                now = time.monotonic()
                current = lease.renewal is renewal  # (else it was given up: a later request owns the lease)
                if current:
                    lease.renewal = None
                    if error is not None:
                        lease.down_until, lease.down_why = now + _KEEPER_BACKOFF_S, f"failed ({type(error).__name__})"
                    else:
                        granted, _, wait, why = future.result()
                        if not granted:
                            lease.refused_until, lease.refused_for = now + wait, why
                        else:  # (plus calls given back since the request: refund)
                            lease.calls += granted
                            lease.until = now + LEASE_TTL_S
        except BaseException as exc:  # (a cancelled future, an answer of another shape): the key backs off
            with lease.lock:
                if lease.renewal is renewal:
                    lease.renewal = None
                    lease.down_until, lease.down_why = time.monotonic() + _KEEPER_BACKOFF_S, f"failed ({type(exc).__name__})"
            raise
        finally:
            renewal.ref = None
            renewal.done.set()  # (whatever happened: nobody waits on it past this)
        if current and error is not None:
            log.warning("the client-key limits keeper failed %s's lease request (%s); the key's calls are answered 503 "
                        "for %gs", key.name, type(error).__name__, _KEEPER_BACKOFF_S)
        elif current and renewal.overdue_logged:
            log.warning("the client-key limits keeper answered %s's lease request after %.1fs", key.name, now - renewal.started)

    def settle(self, key: ClientKey, attempts: int, total_tokens: int = 0) -> None:
        """After an upstream call: charge the replica's retries to the key's request rate (its tokens are
        its reservation's: ``Reservation.settle``; ``total_tokens`` is not used).

        This process's lease counts them at once; the keeper gets them with the next lease, or
        within ``FLUSH_S`` (without waiting for it), so other processes see them shortly.
        """
        retries = max(0, (attempts or 1) - 1)
        if key.rate_per_minute is None or not retries:
            return
        lease = self._lease(key)
        with lease.lock:
            lease.owed_calls += retries
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
        if not lease.owed_calls:
            return
        try:
            self._limits.keeper().charge.remote(key.id, key.rate_per_minute, None, lease.owed_calls, 0.0)
        except Exception as exc:  # noqa: BLE001 - the answer is already in hand; a lost charge only errs towards the caller
            log.warning("could not charge %s's retries to the limits keeper: %s", key.name, type(exc).__name__)
        lease.owed_calls, lease.flushed_at = 0.0, time.monotonic()


def _keeper_down(key: ClientKey, what: str, retry_after: float) -> GatewayError:
    return keeper_down(key.name, what, retry_after)


def _refusal(key: ClientKey, why: str, wait: float) -> GatewayError:
    what = f"its rate of {key.rate_per_minute:g} requests a minute (each endpoint called counts)"
    return GatewayError("rate_limited", f"{key.name} is over {what}: try again in {whole_seconds(wait)}s",
                        retry_after=max(1.0, wait))
