"""A replica's side of its key pool: the ledger of what its calls saw, and the rotation of a call over the keys.

Rotation (``call_with_keys``): a call whose key answers 429, quota or auth is made again at once
on the next usable key, each key at most once per attempt, before the error reaches the retry
policy (``gateway.retry``) and the dispatcher (fallback endpoints).

The ``Ledger`` applies what each call says about its key to the replica's copy of the pool at once
(``gateway.keypool.Pool``: the states, pure) and keeps it for the keeper (``gateway.pool_member``
sends it). Pure (no Ray, no I/O): the fast tests drive it with a clock of their own.
"""
from __future__ import annotations

import time
from typing import Any, Awaitable, Callable, Optional, TypeVar

from contract.errors import ErrorInfo, GatewayError
from .keypool import OK, Pool, judge, keyed

T = TypeVar("T")

#: the failures a call rotates on (to the pool's next key, within the same attempt)
ROTATE_ON = frozenset({"upstream_rate_limited", "upstream_quota", "upstream_auth"})
#: events a replica keeps for the keeper while it cannot reach it (the oldest go first)
_MAX_EVENTS = 1000


class Ledger:
    """A replica's copy of its pool, and what it saw since it last told the keeper.

    Each event is applied here at once (this replica stops using a dead key on the spot) and kept
    until the keeper has it (``take``, then ``give_back`` if the keeper could not be told).
    ``on_change(event)`` is called when an event changed a state: the replica syncs at once then.
    """

    def __init__(self, pool: Pool, on_change: Callable[[tuple], None] = lambda event: None,
                 clock: Callable[[], float] = time.time) -> None:
        self.pool = pool
        self.on_change = on_change
        self.clock = clock
        self._events: list[tuple] = []
        self._counts: dict[str, dict[str, int]] = {}

    def _count(self, fingerprint: str, outcome: str) -> None:
        outcomes = self._counts.setdefault(fingerprint, {})
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    def _record(self, event: tuple) -> None:
        self._events.append(event)
        del self._events[:-_MAX_EVENTS]
        if self.pool.apply(event):
            self.on_change(event)

    def succeeded(self, fingerprint: str, started: float) -> None:
        self._count(fingerprint, "ok")
        state = self.pool.keys.get(fingerprint)
        if state is not None and (state.state != OK or state.strikes):  # (the common case: nothing to tell)
            self._record(("ok", fingerprint, started, self.clock()))

    def failed(self, fingerprint: str, info: ErrorInfo, counted: bool = True) -> None:
        if counted:
            self._count(fingerprint, info.type)
        verdict = judge(info)
        if verdict is not None:
            self._record(("fail", fingerprint, info.type, *verdict, self.clock()))

    def checked(self, fingerprint: str, passed: bool) -> None:
        self._record(("checked", fingerprint, passed, self.clock()))

    def pending(self) -> bool:
        return bool(self._events or self._counts)

    def take(self) -> tuple[list[tuple], dict[str, dict[str, int]]]:
        """What to send to the keeper now (kept here no more)."""
        events, counts = self._events, self._counts
        self._events, self._counts = [], {}
        return events, counts

    def give_back(self, events: list[tuple], counts: dict[str, dict[str, int]]) -> None:
        """What could not be sent: kept for the next sync, before what came since."""
        self._events = (events + self._events)[-_MAX_EVENTS:]
        for fingerprint, outcomes in counts.items():
            for outcome, n in outcomes.items():
                mine = self._counts.setdefault(fingerprint, {})
                mine[outcome] = mine.get(outcome, 0) + n

    def adopt(self, snapshot: dict[str, Any]) -> None:
        """The keeper's pool replaces this copy; what happened here since the sync was sent is applied again."""
        pool = Pool.from_snapshot(snapshot)
        for event in self._events:
            pool.apply(event)
        self.pool = pool


async def call_with_keys(ledger: Ledger, run: Callable[[str], Awaitable[T]]) -> tuple[T, str]:
    """``(run(fingerprint)'s answer, fingerprint)`` on the pool's best key.

    A failure in ``ROTATE_ON`` is recorded and the call made again at once on the next usable
    key; each key is tried at most once (the pool's size bounds it), then the last such failure
    is raised (to the retry policy, then the dispatcher). Any other failure is recorded and raised.
    Every error raised says its key (``keyed``). No usable key at all: ``Pool.exhausted``, with no
    upstream call.
    """
    tried: set[str] = set()
    last: Optional[GatewayError] = None
    while True:
        pool = ledger.pool  # (a sync may have replaced it meanwhile)
        fingerprint = pool.pick(tried, ledger.clock())
        if fingerprint is None:
            raise last if last is not None else pool.exhausted(ledger.clock())
        tried.add(fingerprint)
        started = ledger.clock()
        try:
            answer = await run(fingerprint)
        except GatewayError as err:
            err = keyed(err, fingerprint)
            ledger.failed(fingerprint, err.info)
            if err.type not in ROTATE_ON:
                raise err from None
            last = err
            continue
        ledger.succeeded(fingerprint, started)
        return answer, fingerprint
