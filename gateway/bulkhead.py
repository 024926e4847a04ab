"""The bulkhead: how many calls this process holds at once, in all and per endpoint.

The bulkhead counts calls: a process holds at most ``max_calls`` at once (streams included).
An endpoint may hold at most three quarters of the seats the other endpoints leave (and at
most ``endpoint_max_in_flight``), so endpoints whose upstreams hang, one or several, never
take every seat: a quarter of what they leave is always there for the rest. A call that finds
no seat waits for one, in a bounded queue, for at most ``endpoint_queue_s``; then it goes to
the next fallback, or answers 503 ``endpoint_busy`` with ``Retry-After`` (``Bulkhead.busy``).
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any, Optional

from contract.errors import GatewayError

if TYPE_CHECKING:
    from .endpoint_cache import Endpoint
    from .limits import Caller
    from .reservations import Reservation


class Bulkhead:
    """Seats for calls in this process (on its event loop): ``total`` in all; an endpoint at most
    ``seats``, and at most three quarters of what the other endpoints leave of ``total``.

    ``take`` gives a seat at once when one is free; else the call waits its turn (first come,
    first served per endpoint) for at most ``wait_s``, with at most ``queue`` calls waiting per
    endpoint; a full queue, or no seat in time, is a refusal (False).
    """

    def __init__(self, seats: int, total: int, queue: int = 0, wait_s: float = 0.0) -> None:
        self.seats, self.total, self.queue, self.wait_s = seats, total, queue, wait_s
        self._taken: dict[str, int] = {}
        self._in_all = 0
        self._waiting: dict[str, deque] = {}

    def _free(self, name: str) -> bool:
        taken = self._taken.get(name, 0)
        left_by_others = self.total - (self._in_all - taken)
        return self._in_all < self.total and taken < self.seats and taken < max(1, left_by_others * 3 // 4)

    def _seat(self, name: str) -> None:
        self._taken[name] = self._taken.get(name, 0) + 1
        self._in_all += 1

    async def take(self, name: str) -> bool:
        if not self._waiting.get(name) and self._free(name):
            self._seat(name)
            return True
        waiting = self._waiting.setdefault(name, deque())
        if len(waiting) >= self.queue or self.wait_s <= 0:
            if not waiting:
                self._waiting.pop(name, None)
            return False
        turn = asyncio.get_running_loop().create_future()
        waiting.append(turn)
        try:
            await asyncio.wait_for(asyncio.shield(turn), self.wait_s)
        except asyncio.TimeoutError:
            pass
        except BaseException:  # (the caller left while it waited)
            if turn.done() and not turn.cancelled():
                self.give_back(name)
            turn.cancel()
            raise
        finally:
            if turn in waiting:
                waiting.remove(turn)
            if not waiting and self._waiting.get(name) is waiting:
                self._waiting.pop(name, None)
        if turn.done() and not turn.cancelled():  # (seated by ``give_back``, maybe just as time ran out)
            return True
        turn.cancel()
        return False

    def give_back(self, name: str) -> None:
        left = self._taken.get(name, 0) - 1
        if left > 0:
            self._taken[name] = left
        else:
            self._taken.pop(name, None)
        self._in_all = max(0, self._in_all - 1)
        self._seat_waiters(name)

    def _seat_waiters(self, freed: str) -> None:
        """Seat the next waiting calls: the freed endpoint's first, then (a process seat is free) the others'."""
        for name in [freed] + [n for n in self._waiting if n != freed]:
            waiting = self._waiting.get(name)
            while waiting and self._free(name):
                turn = waiting.popleft()
                if not turn.done():
                    self._seat(name)
                    turn.set_result(None)
            if self._in_all >= self.total:
                return

    def in_flight(self, name: str) -> int:
        return self._taken.get(name, 0)

    def held(self) -> int:
        return self._in_all

    def busy(self, name: str) -> GatewayError:
        """The refusal of a call to ``name`` that found no seat in time: ``endpoint_busy``, with why."""
        if self.held() >= self.total:
            why = f"this gateway process already holds {self.total} calls"
        else:
            why = (f"'{name}' already has {self.in_flight(name)} calls in flight in this gateway process, its share "
                   f"(its upstream is slow or hanging, or other endpoints hold the rest)")
        return GatewayError("endpoint_busy", f"{why}, and no seat came free within {self.wait_s:g}s; try again shortly, "
                            f"or give it fallbacks", retry_after=1)


async def take_seat(bulkhead: Bulkhead, endpoint: "Endpoint", caller: Optional["Caller"], call: Any, stream: bool = False
                    ) -> tuple[Optional["Reservation"], Optional[GatewayError]]:
    """Before an endpoint's call: the caller's call and reservation (``caller``, a client key's: its refusal is
    raised, ``rate_limited``, ``budget_exceeded``, no endpoint's), then the endpoint's seat. Answers (the
    reservation or None, None), or (None, ``endpoint_busy``) with what the caller took given back."""
    held: Optional["Reservation"] = None
    if caller is not None:  # (before the seat: a slow limits keeper never holds one)
        await caller.admit()  # rate_limited (or the keeper's cluster_unavailable) is no endpoint's: the walk stops
        try:  # budget_exceeded (or rate_limited: tokens_per_minute) likewise
            held = await caller.reserve(endpoint, call, stream=stream) if call is not None else None
        except BaseException:
            caller.refund()  # (the call admit took is not made)
            raise
    try:
        seated = await bulkhead.take(endpoint.name)
    except BaseException:  # (the caller left while it waited for a seat)
        if held is not None:
            held.release()
        raise
    if seated:
        return held, None
    if caller is not None:
        caller.refund()  # (not called after all)
    if held is not None:
        held.release()
    return None, bulkhead.busy(endpoint.name)
