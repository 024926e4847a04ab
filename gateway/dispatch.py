"""The one dispatch path: ``chat_name`` -> its Serve application -> a ``ChatResult``.

Every chat route goes through ``Dispatcher.chat`` (or ``Dispatcher.stream``):

1. resolve the endpoint (a short per-process cache over the registry actor; when the
   registry does not answer, what this process knew of the endpoint is used: ``gateway.endpoint_cache``);
2. skip it while it cools down (shared state in the registry; one caller probes after: ``gateway.cooldowns``);
3. take one of the endpoint's seats in this process (``gateway.bulkhead``), or move on;
4. call a replica through its Serve handle (``gateway.replica_client``): a call no replica started is
   retried, a call a replica started and then lost is not (the provider may have billed it); a lost
   cluster answers ``cluster_unavailable`` at once;
5. on an upstream failure (after the replica's own retries) try the fallbacks in order.

With client keys, the route passes the request's ``Caller`` (``gateway.limits``): an
endpoint outside the key's chat_names is skipped (``forbidden`` in ``tried``; the route has
already refused the primary and request-given fallbacks with 403, so this is what stops
an endpoint's own fallbacks), and each endpoint actually called costs one call of the
key's rate and reserves what it may cost of its tokens and budgets, just before the call
(before its seat); ``rate_limited`` and ``budget_exceeded`` end the walk. The reservation is
settled with the answer's usage before the answer is returned (a stream's: when its ``Finish``
arrives, before it is handed on: ``gateway.streams``), charged what was streamed when a stream ends
without it, and given back when the call fails or is not made.

Everything here runs on the process's event loop (``gateway.aio``): a call in flight is a
coroutine awaiting its replica, not a thread. The dispatcher's collaborators are injected, with
defaults built from the cluster and settings (as httpx takes ``transport=``): the registry
(``RegistryClient``) and the replicas (``ReplicaClient``); this module imports no Ray, and the fast
tests (``tests/fast/test_dispatch_policy.py``) run its policy against in-memory fakes of both.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Optional, Union

import providers
from providers.base import indefinite

from . import broadcast
from .bulkhead import Bulkhead, take_seat
from .cluster import Cluster
from .config import Settings
from .cooldowns import Cooldowns
from .endpoint_cache import Endpoint, EndpointCache
from .registry_client import RegistryClient
from .replica_client import ApplicationGone, ReplicaClient
from .streams import Stream
from contract.calls import ChatCall, ChatResult
from contract.errors import TYPES, GatewayError
from contract.events import StreamEvent

if TYPE_CHECKING:
    from .limits import Caller
    from .reservations import Reservation

#: failures that move on to the next fallback (``errors.TYPES``); caller errors never do
FALLBACK_ON = frozenset(name for name, kind in TYPES.items() if kind.falls_back)
#: failures that count towards a cooldown; some (auth, quota) start one at once
UPSTREAM_FAILURES = frozenset(name for name, kind in TYPES.items() if kind.cooldown)
IMMEDIATE_COOLDOWN = frozenset(name for name, kind in TYPES.items() if kind.cooldown == "at_once")
log = logging.getLogger("gateway.dispatch")

#: how long a call waits for the registry actor (a restart by Ray takes a few seconds): the default registry
#: client's timeout
_REGISTRY_WAIT_S = 10.0


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


def _with_tried(err: GatewayError, tried: list[dict]) -> GatewayError:
    if len(tried) <= 1:
        return err
    return GatewayError.from_info(err.info.model_copy(update={"tried": tried}))


def _chain(primary: Endpoint, provider: Optional[str], fallbacks: Optional[list[str]]) -> list[str]:
    """The names to try in order: the endpoint asked for (of ``provider``, when given), then its fallbacks (or the
    request's)."""
    chat_name = primary.name
    if provider is not None and primary.provider != provider:
        raise GatewayError(
            "not_found",
            f"'{chat_name}' is {indefinite(primary.provider)} endpoint, not {provider}: use POST /{primary.provider}/chat or POST /chat",
        )
    names = list(primary.record.fallbacks) if fallbacks is None else list(fallbacks)
    return [chat_name] + [n for n in names if n != chat_name]


class Dispatcher:
    """Calls to endpoints by name, with their fallbacks, seats and cooldowns (see the module docstring)."""

    def __init__(self, cluster: Cluster, settings: Settings, registry: Optional[RegistryClient] = None,
                 replicas: Optional[ReplicaClient] = None) -> None:
        self.cluster, self.settings = cluster, settings
        self.registry = registry if registry is not None else RegistryClient(cluster, _REGISTRY_WAIT_S)
        self.replicas = replicas if replicas is not None else ReplicaClient(cluster, settings)
        #: every Serve call of this process is made on this loop (``gateway.aio``)
        self.loop = self.replicas.loop
        #: whether this process is still applying GATEWAY_ENDPOINTS_FILE (set by ``create_app``)
        self.applying: Callable[[], bool] = lambda: False
        self.cache = EndpointCache(self.registry, self.replicas, settings, applying=lambda: self.applying())
        self.cooldowns = Cooldowns(self.registry, settings, self.resolve, self._spawn)
        self._bulkhead = Bulkhead(settings.endpoint_seats, settings.max_calls, settings.endpoint_queue,
                                  settings.endpoint_queue_s)
        #: calls that run on their own (a success sent to the registry): held until done
        self._background: set[asyncio.Task] = set()
        #: round trips and handles made by ``resolve`` in this process (``EndpointCache.lookups``)
        self.lookups = self.cache.lookups

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- endpoints (``EndpointCache``) -------------------------------------------------
    async def resolve(self, chat_name: str, fresh: bool = False, visible: Optional[Callable[[str], bool]] = None) -> Endpoint:
        """The endpoint, from this process's cache unless older than ``endpoint_cache_s`` or ``fresh`` (``EndpointCache.resolve``)."""
        return await self.cache.resolve(chat_name, fresh, visible)

    def known(self, chat_name: str) -> Optional[Endpoint]:
        """The endpoint as this process last resolved it, whatever its age; None when it never did (asks nothing)."""
        return self.cache.known(chat_name)

    def forget(self, chat_name: str) -> None:
        """Read the endpoint's record again on its next call (a deploy changed it)."""
        self.cache.forget(chat_name)

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
        it after a success, for ``Stream.aclose`` to give back.

        ``caller`` (a client key's): endpoints outside its chat_names are skipped as
        ``forbidden`` (what the caller asked for first stays the error it gets), and each
        endpoint called costs one call of its rate and reserves what ``call`` may cost of its tokens
        and budgets, both taken before its seat (given back if none is free, or the call fails).
        Answers the reservation of the endpoint that answered (None without one), for the caller to settle.
        """
        primary = asked if isinstance(asked, Endpoint) else await self.resolve(asked, visible=caller and caller.allows)
        chain = _chain(primary, provider, fallbacks)
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
                endpoint, skip, probing = await self.cooldowns.skip_reason(endpoint)
            except GatewayError as err:
                tried.append(_tried(name, err))
                last = last or err
                continue
            held: Optional["Reservation"] = None
            if skip is None:
                try:
                    held, skip = await take_seat(self._bulkhead, endpoint, caller, call, stream=keep_seat)
                except GatewayError as err:  # (the caller's limits: no endpoint's; the walk stops)
                    if probing:
                        await self.cooldowns.release_probe(endpoint)
                    tried.append(_tried(name, err))
                    raise _with_tried(err, tried) from None
                if skip is not None and probing:
                    await self.cooldowns.release_probe(endpoint)
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
                    await self.cooldowns.release_probe(endpoint)
                tried.append(_tried(name, err))
                if err.type not in FALLBACK_ON:
                    raise _with_tried(err, tried) from None
                last = err
            except BaseException:  # (the caller left: the task was cancelled)
                if held is not None:
                    held.charge_streamed()  # (the upstream had the call: its input estimate is charged)
                if probing:
                    self._spawn(self.cooldowns.release_probe(endpoint))
                raise
            finally:
                if not keep:
                    self._bulkhead.give_back(name)
        raise _with_tried(last, tried)

    async def _report(self, endpoint: Endpoint, err: Optional[GatewayError]) -> None:
        """How a call ended (``err`` None: it succeeded), for the cooldown state: only upstream failures count."""
        if err is None or err.type in UPSTREAM_FAILURES:
            await self.cooldowns.report(endpoint, err, at_once=err is not None and err.type in IMMEDIATE_COOLDOWN)

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
                                                                lambda ep: self._call(ep, call, stream=True),
                                                                keep_seat=True, caller=caller, call=call)
        return Stream(endpoint, first, rest, tried, replicas=self.replicas, closed=self._stream_closed,
                      spawn=self._spawn, caller=caller, reservation=held)

    async def _call(self, endpoint: Endpoint, call: ChatCall, stream: bool = False) -> Any:
        """One endpoint's answer (``stream``: its stream's first event and the rest), through its replicas."""
        providers.get(endpoint.provider).check_call(call)
        try:
            if stream:
                return await self.replicas.open_stream(endpoint, call, endpoint.deadline)
            return await self.replicas.chat(endpoint, call, endpoint.deadline)
        except ApplicationGone as gone:
            # Serve no longer has the application: the registry says why. Undeployed (here or through
            # another gateway host, within this process's ``endpoint_cache_s``): ``not_found``, raised by
            # ``resolve``; being deployed again: ``endpoint_not_ready``; still registered: Serve gave up on it.
            self.cache.drop(endpoint.name)
            await self.resolve(endpoint.name, fresh=True)
            raise GatewayError.from_info(gone.info) from None

    async def _stream_closed(self, endpoint: Endpoint, failed: Optional[GatewayError], ended: bool) -> None:
        """(``Stream.aclose``) The endpoint's seat back; its health told how the stream ended (a caller who left
        before the end says nothing of it: a probe's lease is released)."""
        self._bulkhead.give_back(endpoint.name)
        try:
            if ended:
                await self._report(endpoint, failed)
            else:
                await self.cooldowns.release_probe(endpoint)
        except Exception as exc:  # noqa: BLE001 - health is best effort; the stream itself is over
            log.warning("reporting the stream of %s: %s", endpoint.name, type(exc).__name__)

    # -- fan-out (``gateway.broadcast``) -------------------------------------------------
    def broadcast_stream(self, chat_names: list[str], make_call: Callable[[str], ChatCall], caller: Optional["Caller"] = None
                         ) -> AsyncIterator[Optional[tuple[str, StreamEvent, Optional[Endpoint]]]]:
        """Stream from every endpoint at once, merged as the events come (``broadcast.merged``); close it when done."""
        return broadcast.merged(self.stream, chat_names, make_call, caller)

    async def broadcast(self, chat_names: list[str], make_call: Callable[[str], ChatCall],
                        caller: Optional["Caller"] = None) -> dict[str, Any]:
        """Ask every endpoint at once; answers per name, in the time of the slowest (each costs the caller's key a call)."""
        return await broadcast.gather(self.chat, chat_names, make_call, caller)
