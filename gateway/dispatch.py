"""The one dispatch path: ``chat_name`` -> its Serve application -> a ``ChatResult``.

Every chat route goes through ``Dispatcher.chat`` (or ``Dispatcher.stream``):

1. resolve the endpoint (a short per-process cache over the registry actor; when the
   registry does not answer, what this process knew of the endpoint is used);
2. skip it while it cools down (shared state in the registry; one caller probes after);
3. take one of the endpoint's seats in this process (the bulkhead, below), or move on;
4. call a replica through its Serve handle; a call no replica started (a full queue; Serve's
   router itself sends a call a dead or stopping replica refused to another one) is retried,
   a call a replica started and then lost is not (the provider may have billed it: see
   ``_never_started``); a lost cluster answers ``cluster_unavailable`` at once;
5. on an upstream failure (after the replica's own retries) try the fallbacks in order.

With client keys, the route passes the request's ``Caller`` (``gateway.limits``): an
endpoint outside the key's chat_names is skipped (``forbidden`` in ``tried``; the route has
already refused the primary and request-given fallbacks with 403, so this is what stops
an endpoint's own fallbacks), and each endpoint actually called costs one call of the
key's rate and reserves what it may cost of its tokens and budgets, just before the call
(before its seat); ``rate_limited`` and ``budget_exceeded`` end the walk. The reservation is
settled with the answer's usage before the answer is returned (a stream's: when its ``Finish``
arrives, before it is handed on), charged what was streamed when a stream ends without it,
and given back when the call fails or is not made.

Everything here runs on the process's event loop (``gateway.aio``): a call in flight is a
coroutine awaiting its replica, not a thread.

The bulkhead counts calls: a process holds at most ``max_calls`` at once (streams included).
An endpoint may hold at most three quarters of the seats the other endpoints leave (and at
most ``endpoint_max_in_flight``), so endpoints whose upstreams hang, one or several, never
take every seat: a quarter of what they leave is always there for the rest. A call that finds
no seat waits for one, in a bounded queue, for at most ``endpoint_queue_s``; then it goes to
the next fallback, or answers 503 ``endpoint_busy`` with ``Retry-After``.
"""
from __future__ import annotations

import asyncio
import collections
import difflib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Optional, Union

import grpc
from ray import serve

import providers
from providers.base import indefinite
from ray.exceptions import RayActorError, RayError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException
from ray.serve._private.utils import asyncio_grpc_exception_handler
from ray.serve.handle import DeploymentHandle

from .aio import EventLoop
from .cluster import Cluster
from .config import Settings
from contract.errors import TYPES, ErrorInfo, GatewayError, whole_seconds
from contract.events import Failure, Finish, StreamEvent
from contract.calls import ChatCall, ChatResult

if TYPE_CHECKING:
    from .limits import Caller
    from .reservations import Reservation

#: failures that move on to the next fallback (``errors.TYPES``); caller errors never do
FALLBACK_ON = frozenset(name for name, kind in TYPES.items() if kind.falls_back)
#: failures that count towards a cooldown; some (auth, quota) start one at once
UPSTREAM_FAILURES = frozenset(name for name, kind in TYPES.items() if kind.cooldown)
IMMEDIATE_COOLDOWN = frozenset(name for name, kind in TYPES.items() if kind.cooldown == "at_once")
log = logging.getLogger("gateway.dispatch")

#: Ray-side failures of an endpoint's call: a replica that died or was cut off, a full queue
_REPLICA_GONE = (RayActorError, BackPressureError, RayServeException)
#: what a replica's gRPC server answers that Serve does not turn into a Ray error (it turns only
#: UNAVAILABLE into ActorUnavailableError)
_GRPC_ERROR = grpc.aio.AioRpcError
#: attempts of a call that no replica started (``_never_started``)
_RAY_ATTEMPTS = 3
#: a waiting call looks at the cluster's health this often (each look costs the worker CPU:
#: 1 000 calls in flight at 0.5 s were 2 000 wake-ups a second)
_POLL_S = 2.0
#: a call that no replica has taken this long, while Serve knows of no running replica of its
#: endpoint (its node died, its workers cannot be placed), is answered ``endpoint_not_ready`` rather
#: than left to wait for its whole deadline
_NO_REPLICA_S = 2.0
#: how long a call waits for the registry actor (a restart by Ray takes a few seconds)
_REGISTRY_WAIT_S = 10.0
#: how often a process looks again at an endpoint it knows as unhealthy
_HEALTH_RECHECK_S = 0.25
#: a streamed broadcast with nothing to say this long yields None (an SSE comment goes out)
_KEEPALIVE_S = 10.0


@dataclass(frozen=True)
class Handles:
    """An endpoint's Serve handles in this process, made on its event loop: whole answers and streams."""

    chat: Any
    stream: Any


async def _new_handles(deployment: str, app: str, grpc: bool = True) -> Handles:
    """Handles whose router runs in this (the process's event) loop and that call replicas over
    gRPC (``grpc``; else as Ray actor calls: ``GATEWAY_SERVE_GRPC=0``).

    Serve's defaults would run the router in a loop of its own (every call hops between
    two loops and threads) and pass calls as Ray actor tasks; the bench (``bench.serve_paths``)
    measured this way at about half the CPU per call. The handle is made here, not taken from
    ``serve.get_app_handle``: Serve's client caches and shares those, and a handle's init
    options can be set only once. (Making it asks the GCS for this node's zone, a blocking
    call of at most 3 s on the loop: once per endpoint per process.)
    """
    handle = DeploymentHandle(deployment, app)
    handle._init(_run_router_in_separate_loop=False)
    return Handles(chat=handle.options(_by_reference=not grpc), stream=handle.options(_by_reference=not grpc, stream=True))


def no_replica_for(handle: Any) -> bool:
    """Whether calls through ``handle`` (made by ``_new_handles``) wait in its router for a replica while
    the router knows of none running (Serve's controller said so: a node lost with every worker of
    the endpoint, workers no node can take). False when it cannot tell: no word from the controller
    yet, no call waiting (the calls in flight were taken by replicas, which finish them, as on an
    undeploy), or a Ray whose router is laid out otherwise.

    (Ray 2.60 has no public accessor: this reads the router of a handle made with
    ``_run_router_in_separate_loop=False``; ``tests/test_multinode.py`` and ``tests/test_endpoints.py``
    exercise both sides.)
    """
    try:
        router = handle._router._asyncio_router
        if not router.running_replicas_populated():  # (never had one: a fresh handle waits for its first)
            return False
        chooser = router._request_router
        running = len(chooser.curr_replicas if chooser is not None else router._running_replicas)
        return running == 0 and router._metrics_manager.num_queued_requests > 0
    except Exception:  # noqa: BLE001 - Ray's private layout: unknown is "no"
        return False


@dataclass
class _Flight:
    """One look-up of an endpoint in flight (``Dispatcher.resolve``): shared by every call that waits for it."""

    #: when it began (monotonic)
    began: float
    task: "Optional[asyncio.Task[Endpoint | _Missing]]" = None
    #: the name was forgotten (``Dispatcher.forget``: a deploy changed it) after it began: no call joins it
    #: any more, and its answer is not cached
    stale: bool = False


@dataclass(frozen=True)
class _Missing:
    """A look-up's answer for a name the registry does not have: the deployed names (None: not looked up)."""

    names: Optional[list[str]]


def _did_you_mean(chat_name: str, names: list[str], visible: Optional[Callable[[str], bool]]) -> str:
    """The hint "(did you mean 'x'?)" over the deployed ``names`` the caller may use; only on the not-found path."""
    if visible is not None:  # never name an endpoint the caller's key may not use
        names = [n for n in names if visible(n)]
    close = difflib.get_close_matches(chat_name, names, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(n) for n in close)}?)" if close else ""


@dataclass
class Endpoint:
    record: dict
    handle: Handles
    #: when the record was read from the registry (monotonic)
    fetched: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return self.record["chat_name"]

    @property
    def provider(self) -> str:
        return self.record["provider"]

    @property
    def health(self) -> dict:
        return self.record.get("health") or {"state": "ok", "consecutive_failures": 0}


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


class Stream:
    """A streamed answer: its events (``contract.events``), the first included; then ``aclose`` it.

    Iterating (``async for``) yields ``Delta``/``ToolCallDelta`` events and ends with exactly one
    ``Finish`` or ``Failure``: a replica lost mid-way, or a stream that stops without saying why,
    ends with a ``Failure`` (``upstream_error``) here, so renderers never see a cut stream.

    ``aclose`` (idempotent) is what ends the call, whenever the caller leaves: before the first
    event was written, mid-way or after the end. It cancels the replica's stream (which closes
    the upstream one), reports success or failure to the cooldown state, and gives the
    endpoint's seat back. The chat flow calls it however the response ends.

    The caller's reservation (``reservation``: a key with tokens or budgets) is settled with the
    ``Finish``'s usage before the ``Finish`` is handed on; a stream that ends otherwise (a
    ``Failure`` mid-way, or ``aclose`` before its end) is charged its input estimate and what
    was streamed (``Reservation.charge_streamed``), or nothing when nothing was streamed and it failed.
    """

    def __init__(self, dispatcher: "Dispatcher", endpoint: "Endpoint", first: StreamEvent, gen: Any,
                 tried: list[dict], caller: Optional["Caller"] = None, reservation: Optional["Reservation"] = None) -> None:
        self.endpoint, self.tried = endpoint, tried
        #: the upstream's time to the first event (ms): the part of the time to first byte that is not the gateway's
        self.first_upstream_ms = first.upstream_ms or 0.0
        self._dispatcher, self._gen, self._caller, self._reservation = dispatcher, gen, caller, reservation
        self._timeout = _deadline(endpoint)
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
            # (each event within the endpoint's deadline, like the first: the replica bounds a stalled
            # upstream, this bounds a replica whose node died without a word)
            event = await self._dispatcher._await(self._gen.__anext__(), self._timeout, self._gen.cancel)
        except StopAsyncIteration:
            event = Failure(ErrorInfo(type="upstream_error", message="the stream ended before it finished; try again"))
        except TimeoutError:
            event = Failure(ErrorInfo(type="upstream_timeout",
                                      message=f"'{self.endpoint.name}' sent nothing for {self._timeout:.0f}s mid-stream; try again"))
        except GatewayError as err:  # (the cluster was lost)
            event = Failure(err.info)
        except (RayError, _GRPC_ERROR):
            event = Failure(ErrorInfo(type="upstream_error",
                                      message=f"'{self.endpoint.name}' lost its stream mid-way; try again"))
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
            _settle(self._caller, event)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._gen.cancel()  # no-op when finished; cancels the replica's (and upstream) stream otherwise
        except Exception as exc:  # noqa: BLE001 - the cluster may be gone; nothing is left to cancel then
            log.warning("cancelling the stream of %s: %s", self.endpoint.name, type(exc).__name__)
        self._dispatcher._bulkhead.give_back(self.endpoint.name)
        held = self._reservation
        if held is not None and not held.ended:
            if self._finish is not None:  # (the whole answer came first, and the caller left before reading it)
                self._dispatcher._spawn(held.settle(self._finish.usage))
            else:  # abandoned (or cut) before its end: charged its input estimate and what was streamed
                held.charge_streamed()
        try:
            if self._ended:  # a caller who leaves early says nothing about the endpoint's health
                await self._dispatcher._report(self.endpoint, self._failed)
            else:
                await self._dispatcher._release_probe(self.endpoint)
        except Exception as exc:  # noqa: BLE001 - health is best effort; the stream itself is over
            log.warning("reporting the stream of %s: %s", self.endpoint.name, type(exc).__name__)


@dataclass
class Outcome:
    """A whole answer: what answered (``endpoint``), its result, and what was tried before it, and why."""

    endpoint: Endpoint
    result: ChatResult
    tried: list[dict] = field(default_factory=list)


def _tried(name: str, err: GatewayError) -> dict:
    entry = {"chat_name": name, "type": err.type, "message": err.info.message}
    if err.info.provider_code:
        entry["provider_code"] = err.info.provider_code
    return entry


def _settle(caller: Optional["Caller"], end: Finish) -> None:
    """A stream's last event carries its attempts and usage: charge them to the caller's key."""
    if caller is not None:
        usage = end.usage
        caller.settle(end.attempts or 1, usage.total_tokens or usage.prompt_tokens + usage.completion_tokens)


def _deadline(endpoint: Endpoint) -> float:
    """How long the gateway waits for a replica's answer (or a stream's next event): the endpoint's timeout + 5 s."""
    return float(endpoint.record.get("timeout", 60)) + 5.0


def _never_started(exc: BaseException) -> bool:
    """Did the call fail before any replica started it? Only then does the gateway send it again:
    a replica that started it may have asked the provider already, which bills the answer even
    when the replica dies before passing it on; sent again, it would be billed twice.

    How that is known: Serve's router (Ray 2.60, ``Router._route_and_send_request_once``) sends
    every call "with rejection" (strict ``max_ongoing_requests``, on outside Ray Client), and a
    replica answers that system message (gRPC initial metadata ``accepted``, or the first item of
    the actor-call stream) just before it runs the gateway's code, which then asks the provider.
    Every failure before that answer (the replica dead, cut off or stopping: ActorDiedError,
    ActorUnavailableError, gRPC UNAVAILABLE or CANCELLED without ``accepted``) the router retries
    on another replica by itself, and such a failure never reaches the gateway. So a RayActorError,
    a gRPC status or a RayServeException the gateway sees came after a replica accepted the call,
    and is not retried (it is ``endpoint_not_ready``, which moves on to the endpoint's fallbacks:
    another provider the operator chose). The one exception: ``BackPressureError``, which the
    router raises before it sends the call anywhere (the deployment's queue is full).
    """
    return isinstance(exc, BackPressureError)


def ray_failure(exc: BaseException, endpoint: Optional[str] = None) -> GatewayError:
    """A Ray exception raised by a call as the gateway's error (streams that break mid-way end
    with a ``Failure`` in ``Stream`` instead: their answer has begun).

    On an endpoint's call: a deployment Serve gave up on is ``endpoint_not_ready`` (deploy it
    again); a full queue, once its retries are spent, or a replica that failed during the call
    (not retried: ``_never_started``) is ``endpoint_not_ready`` too (try again shortly). Any other Ray
    failure, and any outside an endpoint's call (the registry actor, a listing), means the
    cluster itself failed: ``cluster_unavailable``.
    """
    if endpoint is not None and isinstance(exc, DeploymentUnavailableError):
        return GatewayError("endpoint_not_ready", f"'{endpoint}' is not running: Serve gave up on it (it failed to "
                            f"deploy or to recover); deploy it again, or try again shortly", retry_after=5)
    if endpoint is not None and isinstance(exc, _GRPC_ERROR) and exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return GatewayError("payload_too_large", f"the call is larger than '{endpoint}''s replicas take over gRPC "
                            f"(4 MiB by default): shorten it, or run the gateway with GATEWAY_SERVE_GRPC=0")
    if endpoint is not None and isinstance(exc, BackPressureError):
        return GatewayError("endpoint_not_ready", f"no replica of '{endpoint}' could take the call (its queue is "
                            f"full); try again shortly", retry_after=1)
    if endpoint is not None and isinstance(exc, _REPLICA_GONE + (_GRPC_ERROR,)):
        # (after a replica accepted the call: see ``_never_started``; a gRPC status Serve did not
        # turn into a Ray error is the replica's failure too, not the upstream's)
        return GatewayError("endpoint_not_ready", f"the replica of '{endpoint}' that took the call failed during it "
                            f"({type(exc).__name__}); it was not sent again, since the provider may have answered "
                            f"(and billed) it already: try again", retry_after=1)
    if endpoint is not None:
        return GatewayError("cluster_unavailable", "the Ray cluster failed while serving the call; try again shortly",
                            retry_after=2)
    return GatewayError("cluster_unavailable", "the Ray cluster did not answer; try again shortly", retry_after=2)


def _with_tried(err: GatewayError, tried: list[dict]) -> GatewayError:
    if len(tried) <= 1:
        return err
    return GatewayError.from_info(err.info.model_copy(update={"tried": tried}))


class Dispatcher:
    def __init__(self, cluster: Cluster, settings: Settings) -> None:
        self.cluster = cluster
        self.settings = settings
        self._cache: dict[str, Endpoint] = {}
        self._handles: dict[tuple[str, str], Any] = {}
        #: the look-up of each name in flight (``resolve``: single-flight); changed on the loop only
        self._flights: dict[str, _Flight] = {}
        #: round trips and handles made by ``resolve`` in this process: ``registry`` (reads of a record),
        #: ``controller`` (Serve's look-up of an application), ``handles`` (Serve handles, each a router)
        self.lookups: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        #: every Serve call of this process is made on this loop (``gateway.aio``)
        # (gRPC's asyncio poller reports a harmless EAGAIN now and then; Serve filters it on its own loops)
        self.loop = EventLoop(exception_handler=asyncio_grpc_exception_handler)
        self._bulkhead = Bulkhead(settings.endpoint_seats, settings.max_calls, settings.endpoint_queue,
                                  settings.endpoint_queue_s)
        #: calls that run on their own (a success sent to the registry): held until done
        self._background: set[asyncio.Task] = set()
        #: whether this process is still applying GATEWAY_ENDPOINTS_FILE (set by ``create_app``)
        self.applying: Callable[[], bool] = lambda: False

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- endpoints ---------------------------------------------------------------
    def known(self, chat_name: str) -> Optional[Endpoint]:
        """The endpoint as this process last resolved it, whatever its age; None when it never did (asks nothing)."""
        return self._cache.get(chat_name)

    async def _ensure_up(self) -> None:
        """Connected to the cluster (connecting blocks: in a thread, never on the loop); lost: cluster_unavailable."""
        cluster = self.cluster
        if cluster.lost or not cluster.connected:
            if cluster.lost:
                cluster.ensure_up()  # raises at once
            await asyncio.to_thread(cluster.ensure_up)

    async def _registry(self, method: str, *args: Any) -> Any:
        """The registry actor's answer to ``method(*args)``, awaited for at most ``_REGISTRY_WAIT_S``."""
        await self._ensure_up()
        registry = self.cluster.registry()
        try:
            return await asyncio.wait_for(getattr(registry, method).remote(*args), _REGISTRY_WAIT_S)
        except asyncio.TimeoutError:
            raise TimeoutError(f"the endpoint registry did not answer {method} within {_REGISTRY_WAIT_S:.0f}s") from None

    async def resolve(self, chat_name: str, fresh: bool = False, visible: Optional[Callable[[str], bool]] = None) -> Endpoint:
        """The endpoint, from this process's cache unless it is older than ``endpoint_cache_s`` or ``fresh``.

        ``visible``: the names the caller may see (its client key's), for the not-found hint.

        Single-flight per name: the calls that find no fresh entry at once (a burst on a cold endpoint,
        or on one whose entry just expired) share one look-up (``_refresh``: one registry round trip,
        and at most one Serve handle made). Its failure reaches every call that waited for it, and is
        not kept: the next call looks again. A caller that leaves while it waits leaves the look-up
        running for the others. A ``fresh`` call joins a look-up begun at most ``_HEALTH_RECHECK_S`` ago;
        one begun before a ``forget`` of the name is never joined.
        """
        now = time.monotonic()
        hit = self._cache.get(chat_name)
        if hit is not None and now - hit.fetched < self.settings.endpoint_cache_s and not fresh:
            return hit
        loop = asyncio.get_running_loop()
        flight = self._flights.get(chat_name)
        if flight is None or flight.stale or flight.task.get_loop() is not loop \
                or (fresh and now - flight.began > _HEALTH_RECHECK_S):
            flight = self._take_off(chat_name, loop, now)
        try:
            endpoint = await asyncio.shield(flight.task)
        except GatewayError as err:  # (each waiter raises its own copy: one exception raised in many tasks grows their tracebacks)
            raise GatewayError.from_info(err.info) from None
        if isinstance(endpoint, _Missing):  # (the registry has no such name: the hint is this caller's, over the names it may see)
            if self.applying():  # (a restarted cluster: the endpoints file brings it back shortly)
                raise GatewayError("endpoint_not_ready", f"no endpoint named '{chat_name}' yet: this gateway process "
                                   f"is still applying its endpoints file", retry_after=2)
            names = endpoint.names if endpoint.names is not None else await self._names()
            raise GatewayError("not_found", f"no endpoint named '{chat_name}'{_did_you_mean(chat_name, names, visible)}; "
                               f"GET /deployments (or GET /v1/models) lists them, POST /<provider>/deploy makes one")
        return endpoint

    def _take_off(self, chat_name: str, loop: asyncio.AbstractEventLoop, now: float) -> "_Flight":
        """Start the one look-up of ``chat_name`` that the calls arriving while it runs share."""
        flight = _Flight(now)
        flight.task = loop.create_task(self._refresh(chat_name, flight))
        self._flights[chat_name] = flight

        def landed(task: asyncio.Task) -> None:
            if self._flights.get(chat_name) is flight:
                del self._flights[chat_name]
            if not task.cancelled():
                task.exception()  # (read: when every waiter left, asyncio would log it as never retrieved)

        flight.task.add_done_callback(landed)
        return flight

    async def _refresh(self, chat_name: str, flight: _Flight) -> "Endpoint | _Missing":
        """(one flight of ``resolve``) The registry's record of ``chat_name`` with its handles, now in the
        cache; ``_Missing`` (with the deployed names, for the hint) when the registry has no such name; what
        this process knew when the registry does not answer."""
        now = time.monotonic()
        hit = self._cache.get(chat_name)
        await self._ensure_up()
        try:
            self.lookups["registry"] += 1
            record = await self._registry("get", chat_name)
        except (RayError, TimeoutError):
            if hit is None:
                raise
            # The registry is being restarted by Ray (its records come back with it): what this
            # process knew a moment ago still routes the call.
            log.warning("the endpoint registry did not answer; %s is served from this process's cache", chat_name)
            return hit
        if record is None:
            with self._lock:  # (not ``forget``: this look-up stays the one that the calls arriving now join)
                self._cache.pop(chat_name, None)
            self._drop_handles(chat_name)
            return _Missing(None if self.applying() else await self._names())
        status = record.get("status", "RUNNING")
        if status == "DEPLOYING":
            raise GatewayError("endpoint_not_ready", f"'{chat_name}' is still deploying (loading its model); "
                               f"GET /deployments/{chat_name} shows progress", retry_after=5)
        if status == "DEPLOY_FAILED":
            failure = record.get("failure") or {}
            raise GatewayError("endpoint_not_ready", f"'{chat_name}' failed to deploy ({failure.get('reason')}): "
                               f"{failure.get('message')}; deploy it again")
        # A handle is bound to the deployment's name, which is the provider's: an endpoint
        # undeployed and deployed again under another provider needs a new one.
        handle_key = (chat_name, record["provider"])
        handle = self._handles.get(handle_key)
        if handle is None or hit is None:  # (new to this process, or forgotten: is the application there?)
            try:  # (asks Serve's controller, which blocks: in a thread; once per endpoint and process)
                self.lookups["controller"] += 1
                ingress = (await asyncio.to_thread(serve.get_app_handle, chat_name)).deployment_name  # (raises when gone)
            except RayServeException:
                raise GatewayError("endpoint_not_ready", f"'{chat_name}' is registered but not running: try again shortly, "
                                   f"or deploy it again", retry_after=2) from None
            if handle is None:  # (made without the lock: other endpoints' calls never wait for it)
                self.lookups["handles"] += 1
                made = await _new_handles(ingress, chat_name, self.settings.serve_grpc)
                with self._lock:
                    handle = self._handles.setdefault(handle_key, made)
                if handle is not made:  # another look-up made one first (one begun after a ``forget``)
                    self.loop.submit(made.chat.shutdown_async())
                self._drop_handles(chat_name, keep=record["provider"])
        endpoint = Endpoint(record, handle, now)
        with self._lock:
            if not flight.stale:  # (forgotten meanwhile: a deploy changed it; the next call reads it again)
                self._cache[chat_name] = endpoint
        return endpoint

    async def _names(self) -> list[str]:
        """The deployed names, for the not-found hint (``_did_you_mean``): one look-up per flight of a missing name."""
        try:
            self.lookups["names"] += 1
            return [r["chat_name"] for r in await self._registry("list")]
        except Exception:  # noqa: BLE001 - a hint only: what this process knows will do
            return list(self._cache)

    def forget(self, chat_name: str) -> None:
        """Read the endpoint's record again on its next call.

        Its handles stay: a handle's router follows its application's replicas through a
        redeploy. They are shut down (``_drop_handles``) once the registry no longer knows the
        name, or the name moved to another provider (handles are keyed by (name, provider)).
        """
        with self._lock:
            self._cache.pop(chat_name, None)
            flight = self._flights.get(chat_name)  # (a look-up begun before is neither joined nor cached: ``_Flight.stale``)
            if flight is not None:
                flight.stale = True

    def _drop_handles(self, chat_name: str, keep: Optional[str] = None) -> None:
        """Shut down the routers of an endpoint that is gone (or moved to another provider than ``keep``):
        a router wakes the loop ten times a second to report its metrics for as long as it lives."""
        with self._lock:
            gone = [self._handles.pop(k) for k in [k for k in self._handles if k[0] == chat_name and k[1] != keep]]
        for handles in gone:  # (the chat and stream handles share one router)
            self.loop.submit(handles.chat.shutdown_async())

    async def _chain(self, primary: Union[Endpoint, str], provider: Optional[str], fallbacks: Optional[list[str]],
                     caller: Optional["Caller"]) -> tuple[Endpoint, list[str]]:
        """The endpoint asked for (resolved here unless the caller already did) and the names to try in order."""
        if not isinstance(primary, Endpoint):
            primary = await self.resolve(primary, visible=caller and caller.allows)
        chat_name = primary.name
        if provider is not None and primary.provider != provider:
            raise GatewayError(
                "not_found",
                f"'{chat_name}' is {indefinite(primary.provider)} endpoint, not {provider}: use POST /{primary.provider}/chat or POST /chat",
            )
        names = list(primary.record.get("fallbacks") or []) if fallbacks is None else list(fallbacks)
        return primary, [chat_name] + [n for n in names if n != chat_name]

    # -- health (cooldowns) -------------------------------------------------------
    async def _skip_reason(self, endpoint: Endpoint) -> tuple[Endpoint, Optional[GatewayError], bool]:
        """(endpoint as now known, why to skip it or None, whether this call is the probe)."""
        if endpoint.health.get("state") in (None, "ok"):
            return endpoint, None, False
        # Not healthy in this process's cache: look again before refusing a call (another
        # process may have seen it recover, or it was deployed again with a new key), at most
        # every _HEALTH_RECHECK_S, so that a cooling endpoint under load costs the registry little.
        if time.monotonic() - endpoint.fetched > _HEALTH_RECHECK_S:
            endpoint = await self.resolve(endpoint.name, fresh=True)
        health = endpoint.health
        if health.get("state") in (None, "ok"):
            return endpoint, None, False
        until = health.get("cooldown_until") or 0
        now = time.time()
        if until > now:
            return endpoint, GatewayError("endpoint_not_ready", f"'{endpoint.name}' is cooling down after upstream "
                                          f"failures ({health.get('last_error')}); try again in {whole_seconds(until - now)}s, or "
                                          f"give it fallbacks", retry_after=until - now), False
        lease = float(endpoint.record.get("timeout", 60)) + 5
        if await self._registry("claim_probe", endpoint.name, lease):
            return endpoint, None, True  # this request probes it
        return endpoint, GatewayError("endpoint_not_ready", f"'{endpoint.name}' is being probed after a cooldown; try "
                                      f"again in a second",
                                      retry_after=1), False

    async def _release_probe(self, endpoint: Endpoint) -> None:
        """A probe that ended without an upstream verdict frees the lease for the next caller."""
        if endpoint.health.get("state") in (None, "ok"):
            return
        try:
            await self._registry("release_probe", endpoint.name)
        except Exception as exc:  # noqa: BLE001 - the lease runs out by itself
            log.warning("could not release the probe of %s: %s", endpoint.name, type(exc).__name__)

    async def _report(self, endpoint: Endpoint, err: Optional[GatewayError]) -> None:
        """Tell the shared cooldown state how a call ended (``err`` None: it succeeded). Best effort,
        never raises: an answer in hand reaches its caller whatever the registry does.

        A success is sent to the registry and not waited for (``_noted``): a slow or restarting
        registry never holds an answer back nor turns it into an error. (Sent from this process's loop, it
        reaches the registry before any later call of this process's: Ray runs one caller's calls
        to an actor in order.) A failure is waited for, at most ``_REGISTRY_WAIT_S``, so that this
        process's next call knows of a cooldown it started; one that cannot be recorded is logged.
        """
        s = self.settings
        if s.cooldown_s <= 0:
            return  # cooldowns off
        if err is None and endpoint.health.get("state") == "ok" and not endpoint.health.get("consecutive_failures"):
            return  # the common case costs nothing
        if err is not None and err.type not in UPSTREAM_FAILURES:
            return
        try:
            if err is None:
                registry = self.cluster.registry()
                self._spawn(self._noted(endpoint, registry.record_success.remote(endpoint.name)))
                return
            health = await self._registry("record_failure", endpoint.name, err.type, err.type in IMMEDIATE_COOLDOWN,
                                          s.cooldown_failures, s.cooldown_window_s, s.cooldown_s)
        except Exception as exc:  # noqa: BLE001 - health is best effort (the registry is restarting, the cluster lost)
            log.warning("could not record the %s of %s in the endpoint registry: %s",
                        "success" if err is None else "failure", endpoint.name, type(exc).__name__)
            return
        endpoint.record = {**endpoint.record, "health": health}

    async def _noted(self, endpoint: Endpoint, recorded: Any) -> None:
        """(on the loop) The registry's answer to ``record_success``: the endpoint's health as this process knows it."""
        try:
            health = await asyncio.wait_for(recorded, _REGISTRY_WAIT_S)
        except Exception as exc:  # noqa: BLE001 - the next read of the registry catches up
            log.warning("could not record the success of %s in the endpoint registry: %s", endpoint.name, type(exc).__name__)
            return
        endpoint.record = {**endpoint.record, "health": health}

    # -- one endpoint, through Ray (on the event loop) ----------------------------------
    def _up(self) -> None:
        """Fail at once when the cluster is lost (never connects: that blocks, and the loop must not)."""
        if self.cluster.lost:
            self.cluster.ensure_up()  # raises cluster_unavailable

    async def _await(self, pending: Any, timeout: float, cancel: Callable[[], Any],
                     endpoint: Optional[Endpoint] = None) -> Any:
        """Await a Serve call, looking at the cluster's health every ``_POLL_S``; ``cancel`` it when
        it runs out of time (``TimeoutError``), the cluster is lost or the caller gives up.

        ``endpoint``: a call not answered within ``_NO_REPLICA_S`` while calls wait in the endpoint's
        router and it knows no running replica (``no_replica_for``) ends ``endpoint_not_ready`` (a node
        lost with all of its workers would otherwise hold every caller for the whole deadline). A call a
        replica took is never cut short: on an undeploy its replica finishes it.
        """
        began = time.monotonic()
        deadline = began + timeout
        task = asyncio.ensure_future(pending)
        try:
            while True:
                wait = min(_POLL_S, max(0.01, deadline - time.monotonic()))
                if endpoint is not None and time.monotonic() < began + _NO_REPLICA_S:
                    # (wake once at _NO_REPLICA_S for the first look; after it, every _POLL_S like the rest:
                    # 2 000 held calls waking every 10 ms took both cores of a 2-core machine)
                    wait = min(wait, max(0.01, began + _NO_REPLICA_S - time.monotonic()))
                done, _ = await asyncio.wait((task,), timeout=wait)
                if done:
                    return task.result()
                self._up()
                if time.monotonic() >= deadline:
                    raise TimeoutError
                if endpoint is not None and time.monotonic() - began >= _NO_REPLICA_S \
                        and no_replica_for(endpoint.handle.chat):
                    raise GatewayError(
                        "endpoint_not_ready", f"no worker of '{endpoint.name}' is running (its node may be gone, or "
                        f"no node has what its workers need): GET /deployments/{endpoint.name} says which are "
                        f"missing and why; try again shortly", retry_after=5)
        finally:
            if not task.done():
                cancel()
                task.cancel()
                # (Serve turns the cancellation into an exception nobody awaits: read it, or asyncio logs it)
                task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _call(self, endpoint: Endpoint, call: ChatCall) -> ChatResult:
        providers.get(endpoint.provider).check_call(call)
        try:
            reply = await self._ask(endpoint, call, _deadline(endpoint))
        except DeploymentUnavailableError as exc:
            raise await self._gone(endpoint, exc) from None
        if isinstance(reply, ErrorInfo):
            raise GatewayError.from_info(reply)
        return reply

    async def _ask(self, endpoint: Endpoint, call: ChatCall, timeout: float) -> Union[ChatResult, ErrorInfo]:
        for attempt in range(_RAY_ATTEMPTS):
            self._up()
            response = endpoint.handle.chat.chat.remote(call)
            try:
                return await self._await(response, timeout, response.cancel, endpoint)
            except TimeoutError:
                raise GatewayError("upstream_timeout", f"'{endpoint.name}' did not answer within {timeout:.0f}s") from None
            except DeploymentUnavailableError:
                self._cache.pop(endpoint.name, None)  # (forget it without the lock: never wait on a lock on the loop)
                raise  # (``_gone`` asks the registry why)
            except _REPLICA_GONE + (_GRPC_ERROR,) as exc:
                if attempt + 1 < _RAY_ATTEMPTS and _never_started(exc):
                    await asyncio.sleep(0.05 * 2 ** attempt)
                    continue
                raise ray_failure(exc, endpoint.name) from None
            except RayError as exc:
                raise ray_failure(exc, endpoint.name) from None
        raise AssertionError("unreachable")

    # -- the dispatch path ----------------------------------------------------------
    async def _walk(self, asked: Union[Endpoint, str], provider: Optional[str], fallbacks: Optional[list[str]],
                    attempt: Callable[[Endpoint], Awaitable[Any]], keep_seat: bool = False,
                    caller: Optional["Caller"] = None, call: Optional[ChatCall] = None
                    ) -> tuple[Endpoint, Any, list[dict], Optional["Reservation"]]:
        """Try ``chat_name``, then its fallbacks, with ``attempt``; the first answer wins.

        Endpoints that cool down or are busy are skipped; an upstream failure moves on, a caller
        error stops. Only upstream failures count towards a cooldown; a probe that ends any
        other way gives its lease back.

        A call holds its endpoint's seat while ``attempt`` runs; ``keep_seat`` (streams) keeps
        it after a success, for ``Stream.close`` to give back.

        ``caller`` (a client key's): endpoints outside its chat_names are skipped as
        ``forbidden`` (what the caller asked for first stays the error it gets), and each
        endpoint called costs one call of its rate and reserves what ``call`` may cost of its tokens
        and budgets, both taken before its seat (given back if none is free, or the call fails).
        Answers the reservation of the endpoint that answered (None without one), for the caller to settle.
        """
        primary, chain = await self._chain(asked, provider, fallbacks, caller)
        tried: list[dict] = []
        last: Optional[GatewayError] = None
        for name in chain:
            if caller is not None and not caller.allows(name):
                err = GatewayError("forbidden", f"{caller.name} may not use '{name}'")
                tried.append(_tried(name, err))
                last = last or err
                continue
            try:
                endpoint = primary if name == primary.name else await self.resolve(name, visible=caller and caller.allows)
                endpoint, skip, probing = await self._skip_reason(endpoint)
            except GatewayError as err:
                tried.append(_tried(name, err))
                last = last or err
                continue
            held: Optional["Reservation"] = None
            if skip is None and caller is not None:
                try:  # (before the seat: a slow limits keeper never holds one)
                    await caller.admit()  # rate_limited (or the keeper's cluster_unavailable) is no endpoint's: the walk stops
                    try:  # budget_exceeded (or rate_limited: tokens_per_minute) likewise
                        held = await caller.reserve(endpoint, call, stream=keep_seat) if call is not None else None
                    except BaseException:
                        caller.refund()  # (the call admit took is not made)
                        raise
                except GatewayError as err:
                    if probing:
                        await self._release_probe(endpoint)
                    tried.append(_tried(name, err))
                    raise _with_tried(err, tried) from None
            if skip is None:
                try:
                    seated = await self._bulkhead.take(name)
                except BaseException:  # (the caller left while it waited for a seat)
                    if held is not None:
                        held.release()
                    raise
                if not seated:
                    if caller is not None:
                        caller.refund()  # (not called after all)
                    if held is not None:
                        held.release()
                    skip = self._busy(name)
                    if probing:
                        await self._release_probe(endpoint)
            if skip is not None:
                tried.append(_tried(name, skip))
                last = skip
                continue
            keep = False
            try:
                answer = await attempt(endpoint)
                keep = keep_seat
                return endpoint, answer, tried, held
            except GatewayError as err:
                if held is not None:
                    held.release()  # a failed call: no usage, nothing charged
                if caller is not None and (err.info.attempts or 0) > 1:
                    caller.settle(err.info.attempts, 0)  # the replica's retries were upstream calls too
                if err.type in UPSTREAM_FAILURES:
                    await self._report(endpoint, err)
                elif probing:
                    await self._release_probe(endpoint)
                tried.append(_tried(name, err))
                if err.type not in FALLBACK_ON:
                    raise _with_tried(err, tried) from None
                last = err
            except BaseException:  # (the caller left: the task was cancelled)
                if held is not None:
                    held.charge_streamed()  # (the upstream had the call: its input estimate is charged)
                if probing:
                    self._spawn(self._release_probe(endpoint))
                raise
            finally:
                if not keep:
                    self._bulkhead.give_back(name)
        raise _with_tried(last, tried)

    def _busy(self, name: str) -> GatewayError:
        b = self._bulkhead
        if b.held() >= b.total:
            why = f"this gateway process already holds {b.total} calls"
        else:
            why = (f"'{name}' already has {b.in_flight(name)} calls in flight in this gateway process, its share "
                   f"(its upstream is slow or hanging, or other endpoints hold the rest)")
        return GatewayError("endpoint_busy", f"{why}, and no seat came free within {b.wait_s:g}s; try again shortly, "
                            f"or give it fallbacks", retry_after=1)

    async def chat(self, asked: Union[Endpoint, str], call: ChatCall, provider: Optional[str] = None,
                   fallbacks: Optional[list[str]] = None, caller: Optional["Caller"] = None) -> Outcome:
        """Answer ``call`` on ``asked`` or its fallbacks; ``provider`` restricts the primary.

        ``asked``: the endpoint (as the chat flow resolved it once) or its name.
        ``caller``: the request's client key (scope and limits; see ``_walk``), None without keys.
        """
        endpoint, result, tried, held = await self._walk(asked, provider, fallbacks, lambda ep: self._call(ep, call),
                                                         caller=caller, call=call)
        if caller is not None:
            caller.settle(result.attempts, result.usage.total_tokens)
        if held is not None:
            await held.settle(result.usage, result.output)  # (written before the answer is returned)
        await self._report(endpoint, None)
        return Outcome(endpoint, result, tried)

    async def stream(self, asked: Union[Endpoint, str], call: ChatCall, provider: Optional[str] = None,
                     fallbacks: Optional[list[str]] = None, caller: Optional["Caller"] = None) -> Stream:
        """Like ``chat``, but retries and fallbacks only until the first event is in hand.

        Answers a ``Stream`` (its first event included), which the caller must ``aclose``. The
        caller's key is charged the stream's retries and tokens when its ``Finish`` arrives.
        """
        endpoint, (first, rest), tried, held = await self._walk(asked, provider, fallbacks,
                                                                lambda ep: self._open_stream(ep, call), keep_seat=True,
                                                                caller=caller, call=call)
        return Stream(self, endpoint, first, rest, tried, caller=caller, reservation=held)

    async def _open_stream(self, endpoint: Endpoint, call: ChatCall) -> tuple[StreamEvent, Any]:
        providers.get(endpoint.provider).check_call(call)
        try:
            return await self._open(endpoint, call, _deadline(endpoint))
        except DeploymentUnavailableError as exc:
            raise await self._gone(endpoint, exc) from None

    async def _gone(self, endpoint: Endpoint, exc: DeploymentUnavailableError) -> GatewayError:
        """Serve no longer has ``endpoint``'s application: the registry says why. Undeployed (here or
        through another gateway host, within this process's ``endpoint_cache_s``): ``not_found``,
        raised by ``resolve``; being deployed again: ``endpoint_not_ready``; still registered: Serve
        gave up on it (``ray_failure``)."""
        await self.resolve(endpoint.name, fresh=True)
        return ray_failure(exc, endpoint.name)

    async def _open(self, endpoint: Endpoint, call: ChatCall, timeout: float) -> tuple[StreamEvent, Any]:
        """The replica's stream and its first event (the rest is pulled on the loop by ``Stream``)."""
        for attempt in range(_RAY_ATTEMPTS):
            self._up()
            gen = endpoint.handle.stream.stream.remote(call)
            try:
                first = await self._await(gen.__anext__(), timeout, gen.cancel, endpoint)
            except TimeoutError:
                raise GatewayError("upstream_timeout", f"'{endpoint.name}' did not start its stream within "
                                   f"{timeout:.0f}s; try again") from None
            except DeploymentUnavailableError:
                self._cache.pop(endpoint.name, None)
                raise
            except _REPLICA_GONE + (_GRPC_ERROR,) as exc:
                if attempt + 1 < _RAY_ATTEMPTS and _never_started(exc):
                    await asyncio.sleep(0.05 * 2 ** attempt)
                    continue
                raise ray_failure(exc, endpoint.name) from None
            except StopAsyncIteration:
                raise GatewayError("upstream_error", f"'{endpoint.name}' ended its stream at once; try again") from None
            except RayError as exc:
                raise ray_failure(exc, endpoint.name) from None
            if isinstance(first, Failure):
                raise GatewayError.from_info(first.error)
            return first, gen
        raise AssertionError("unreachable")

    # -- fan-out ----------------------------------------------------------------------
    async def broadcast_stream(self, chat_names: list[str], make_call, caller: Optional["Caller"] = None
                               ) -> AsyncIterator[Optional[tuple[str, StreamEvent, Optional[Endpoint]]]]:
        """Stream from every endpoint at once, merged as the events come: ``(chat_name, event, endpoint)``,
        and ``None`` after ``_KEEPALIVE_S`` without any (time for the caller to write a keep-alive).

        Each name ends with exactly one ``Finish`` or ``Failure`` (a name that could not open its
        stream: its error as a ``Failure``, with no endpoint). Each endpoint costs the caller's
        key a call and a seat of the bulkhead, as any call. Closing the iterator (the client
        left) cancels every stream, which cancels the replicas' (and upstream) streams.
        """
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(name: str, call: ChatCall) -> None:
            stream, ended = None, False
            try:
                stream = await self.stream(name, call, caller=caller)
                async for event in stream:
                    ended = isinstance(event, (Finish, Failure))
                    merged.put_nowait((name, event, stream.endpoint))
            except GatewayError as err:
                ended = True
                merged.put_nowait((name, Failure(err.info), None))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - one endpoint's failure ends its column, not the others
                log.error("broadcast stream of %s failed: %s", name, type(exc).__name__)
            finally:
                if stream is not None:
                    await stream.aclose()
                if not ended:  # (whatever happened, the column ends)
                    merged.put_nowait((name, Failure(ErrorInfo(type="internal_error", message="the gateway failed; see its log")), None))

        pumps = [asyncio.ensure_future(pump(name, make_call(name))) for name in chat_names]
        left = len(pumps)
        try:
            while left:
                try:
                    item = await asyncio.wait_for(merged.get(), _KEEPALIVE_S)
                except asyncio.TimeoutError:
                    yield None  # nothing for a while: the caller may write a keep-alive
                    continue
                if isinstance(item[1], (Finish, Failure)):
                    left -= 1
                yield item
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def broadcast(self, chat_names: list[str], make_call, caller: Optional["Caller"] = None) -> dict[str, Any]:
        """Ask every endpoint at once; answers per name, in the time of the slowest (each costs the caller's key a call)."""
        answers = await asyncio.gather(*(self.chat(name, make_call(name), caller=caller) for name in chat_names),
                                       return_exceptions=True)
        out: dict[str, Any] = {}
        for name, answer in zip(chat_names, answers):
            if isinstance(answer, BaseException) and not isinstance(answer, GatewayError):
                raise answer
            out[name] = answer
        return out
