"""How a streamed answer ends: ``Stream``, which the dispatcher answers for a stream whose first event is in hand.

Whatever happens upstream, in the replica or between, a renderer sees exactly one ``Finish`` or
``Failure`` at the end of a stream; and whatever the caller does (leaves before the first byte,
mid-way, after the end), ``aclose`` ends the call: the replica's stream, the endpoint's seat, the
caller's reservation and what the cooldown state hears. Reading the replica goes through
``ReplicaClient.next_event`` (Ray's failures are its business); nothing here imports Ray.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Optional

from contract.errors import ErrorInfo, GatewayError
from contract.events import Failure, Finish, StreamEvent

if TYPE_CHECKING:
    from .endpoint_cache import Endpoint
    from .limits import Caller
    from .replica_client import ReplicaClient
    from .reservations import Reservation

log = logging.getLogger("gateway.dispatch")

#: what the dispatcher does when a stream is closed: (endpoint, its failure or None, whether it reached its end)
Closed = Callable[["Endpoint", Optional[GatewayError], bool], Awaitable[None]]


class Stream:
    """A streamed answer: its events (``contract.events``), the first included; then ``aclose`` it.

    Iterating (``async for``) yields ``Delta``/``ToolCallDelta`` events and ends with exactly one
    ``Finish`` or ``Failure``: a replica lost mid-way, or a stream that stops without saying why,
    ends with a ``Failure`` (``upstream_error``) here, so renderers never see a cut stream.

    ``aclose`` (idempotent) is what ends the call, whenever the caller leaves: before the first
    event was written, mid-way or after the end. It cancels the replica's stream (which closes
    the upstream one), and tells the dispatcher (``closed``), which gives the endpoint's seat back
    and reports success or failure to the cooldown state.

    The caller's reservation (``reservation``: a key with tokens or budgets) is settled with the
    ``Finish``'s usage before the ``Finish`` is handed on; a stream that ends otherwise (a
    ``Failure`` mid-way, or ``aclose`` before its end) is charged its input estimate and what
    was streamed (``Reservation.charge_streamed``), or nothing when nothing was streamed and it failed.
    """

    def __init__(self, endpoint: "Endpoint", first: StreamEvent, gen: Any, tried: list[dict], *,
                 replicas: "ReplicaClient", closed: Closed, spawn: Callable[[Awaitable[Any]], None],
                 caller: Optional["Caller"] = None, reservation: Optional["Reservation"] = None) -> None:
        self.endpoint, self.tried = endpoint, tried
        #: the upstream's time to the first event (ms): the part of the time to first byte that is not the gateway's
        self.first_upstream_ms = first.upstream_ms or 0.0
        self._gen, self._replicas, self._closed_by, self._spawn = gen, replicas, closed, spawn
        self._caller, self._reservation = caller, reservation
        self._timeout = endpoint.deadline
        self._first: Optional[StreamEvent] = first
        self._failed: Optional[GatewayError] = None
        self._finish: Optional[Finish] = None
        self._ended = False  # the stream reached its end (Finish or Failure)
        self._closed = False
        if isinstance(first, Finish):  # the whole answer came at once: it is over, whatever the caller does next
            self._end(first)

    def __aiter__(self) -> "Stream":
        return self

    async def __anext__(self) -> StreamEvent:
        if self._first is not None:
            event, self._first = self._first, None
        elif self._closed or self._ended:
            raise StopAsyncIteration
        else:
            event = await self._next()
        if self._reservation is not None:
            await self._account(event)
        return event

    async def _next(self) -> StreamEvent:
        try:
            event = await self._replicas.next_event(self.endpoint, self._gen, self._timeout)
        except StopAsyncIteration:
            event = Failure(ErrorInfo(type="upstream_error", message="the stream ended before it finished; try again"))
        except TimeoutError:
            event = Failure(ErrorInfo(type="upstream_timeout",
                                      message=f"'{self.endpoint.name}' sent nothing for {self._timeout:.0f}s mid-stream; try again"))
        except GatewayError as err:  # (the cluster was lost, or the replica's stream was: ``next_event``)
            event = Failure(err.info)
        if isinstance(event, (Finish, Failure)):
            self._end(event)
        return event

    async def _account(self, event: StreamEvent) -> None:
        """The caller's reservation, as each event passes: pieces counted, settled at the ``Finish``."""
        held = self._reservation
        if isinstance(event, Finish):
            await held.settle(event.usage)  # (written before the caller sees the end)
        elif isinstance(event, Failure):
            if held.pieces:  # (cut mid-way: what was streamed was billed upstream)
                held.charge_streamed()
            else:
                held.release()
        else:
            held.count(event)

    def _end(self, event: "Finish | Failure") -> None:
        self._ended = True
        if isinstance(event, Failure):
            self._failed = GatewayError.from_info(event.error)
        else:
            self._finish = event
            settle(self._caller, event)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._gen.cancel()  # no-op when finished; cancels the replica's (and upstream) stream otherwise
        except Exception as exc:  # noqa: BLE001 - the cluster may be gone; nothing is left to cancel then
            log.warning("cancelling the stream of %s: %s", self.endpoint.name, type(exc).__name__)
        held = self._reservation
        if held is not None and not held.ended:
            if self._finish is not None:  # (the whole answer came first, and the caller left before reading it)
                self._spawn(held.settle(self._finish.usage))
            else:  # abandoned (or cut) before its end: charged its input estimate and what was streamed
                held.charge_streamed()
        # (a caller who leaves early says nothing about the endpoint's health: ``ended`` False)
        await self._closed_by(self.endpoint, self._failed, self._ended)


def settle(caller: Optional["Caller"], end: Finish) -> None:
    """A stream's last event carries its attempts and usage: charge them to the caller's key."""
    if caller is not None:
        usage = end.usage
        caller.settle(end.attempts or 1, usage.total_tokens or usage.prompt_tokens + usage.completion_tokens)
