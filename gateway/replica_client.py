"""The gateway's one way to an endpoint's replicas: Serve handles, the attempt loop, Ray's failures as the gateway's errors.

Everything of Ray, Serve and gRPC that a chat call meets is here, behind ``ReplicaClient``, so that
the dispatcher's policy (``gateway.dispatch``: fallbacks, seats, cooldowns, how a stream ends) is
plain asyncio, and is tested with a fake of this class (``tests/fast/test_dispatch_policy.py``).

- ``Handles`` / ``new_handles``: an endpoint's Serve handles, made with their router in this
  process's event loop (``ReplicaClient.loop``);
- ``ReplicaClient.chat`` / ``open_stream``: the one attempt loop. A call no replica started (a full
  queue; Serve's router itself sends a call a dead or stopping replica refused to another one) is
  sent again; a call a replica started and then lost is not (the provider may have billed it: see
  ``never_started``); a lost cluster answers ``cluster_unavailable`` at once;
- ``RAY_ERRORS``: the one table from the exception classes of Ray, Serve and gRPC to the gateway's
  errors, read by ``ray_failure`` as the providers read their SDKs' tables (most specific class
  first); ``tests/fast/test_replica_client.py`` checks that every class a call can meet is in it.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping, Optional

import grpc
from ray import serve
from ray.exceptions import RayActorError, RayError
from ray.serve._private.utils import asyncio_grpc_exception_handler
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException
from ray.serve.handle import DeploymentHandle

from .aio import EventLoop
from .cluster import Cluster
from .config import Settings
from contract.calls import ChatCall, ChatResult
from contract.errors import ErrorInfo, GatewayError
from contract.events import Failure, StreamEvent

if TYPE_CHECKING:
    from .endpoint_cache import Endpoint

#: attempts of a call that no replica started (``never_started``)
_RAY_ATTEMPTS = 3
#: a waiting call looks at the cluster's health this often (each look costs the worker CPU:
#: 1 000 calls in flight at 0.5 s were 2 000 wake-ups a second)
_POLL_S = 2.0
#: a call that no replica has taken this long, while Serve knows of no running replica of its
#: endpoint (its node died, its workers cannot be placed), is answered ``endpoint_not_ready`` rather
#: than left to wait for its whole deadline
_NO_REPLICA_S = 2.0


@dataclass(frozen=True)
class Handles:
    """An endpoint's Serve handles in this process, made on its event loop: whole answers and streams."""

    chat: Any
    stream: Any


async def new_handles(deployment: str, app: str, grpc: bool = True) -> Handles:
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
    """Whether calls through ``handle`` (made by ``new_handles``) wait in its router for a replica while
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


# -- Ray's failures as the gateway's errors ---------------------------------------------------------------
class ApplicationGone(GatewayError):
    """Serve no longer has the endpoint's application (``DeploymentUnavailableError``): ``endpoint_not_ready``,
    unless the registry says more (the dispatcher asks it: undeployed is ``not_found``)."""


def _gave_up(exc: BaseException, endpoint: str) -> GatewayError:
    return ApplicationGone("endpoint_not_ready", f"'{endpoint}' is not running: Serve gave up on it (it failed to "
                           f"deploy or to recover); deploy it again, or try again shortly", retry_after=5)


def _queue_full(exc: BaseException, endpoint: str) -> GatewayError:
    return GatewayError("endpoint_not_ready", f"no replica of '{endpoint}' could take the call (its queue is "
                        f"full); try again shortly", retry_after=1)


def _replica_failed(exc: BaseException, endpoint: str) -> GatewayError:
    # (after a replica accepted the call: see ``never_started``; a gRPC status Serve did not
    # turn into a Ray error is the replica's failure too, not the upstream's)
    return GatewayError("endpoint_not_ready", f"the replica of '{endpoint}' that took the call failed during it "
                        f"({type(exc).__name__}); it was not sent again, since the provider may have answered "
                        f"(and billed) it already: try again", retry_after=1)


def _grpc_status(exc: BaseException, endpoint: str) -> GatewayError:
    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return GatewayError("payload_too_large", f"the call is larger than '{endpoint}''s replicas take over gRPC "
                            f"(4 MiB by default): shorten it, or run the gateway with GATEWAY_SERVE_GRPC=0")
    return _replica_failed(exc, endpoint)


def _cluster_failed(exc: BaseException, endpoint: str) -> GatewayError:
    return GatewayError("cluster_unavailable", "the Ray cluster failed while serving the call; try again shortly",
                        retry_after=2)


#: what an endpoint's call (through its Serve handle) can raise -> its mapper (``ray_failure``: by the
#: most specific class, as ``providers.error_mapping.map_by_class``). A deployment Serve gave up on is
#: ``endpoint_not_ready`` (deploy it again); a full queue, once its retries are spent, or a replica
#: that failed during the call (not retried: ``never_started``) is ``endpoint_not_ready`` too (try
#: again shortly); any other Ray failure means the cluster itself failed: ``cluster_unavailable``.
RAY_ERRORS: Mapping[type, Callable[[BaseException, str], GatewayError]] = {
    DeploymentUnavailableError: _gave_up,
    BackPressureError: _queue_full,
    #: a replica that died or was cut off (ActorDiedError, ActorUnavailableError, ...)
    RayActorError: _replica_failed,
    RayServeException: _replica_failed,
    #: what a replica's gRPC server answers that Serve does not turn into a Ray error (it turns only
    #: UNAVAILABLE into ActorUnavailableError)
    grpc.aio.AioRpcError: _grpc_status,
    RayError: _cluster_failed,
}
#: the classes the attempt loop and a stream's reads catch: those of the table, nothing else
RAY_FAILURES: tuple[type, ...] = tuple(RAY_ERRORS)


def ray_failure(exc: BaseException, endpoint: Optional[str] = None) -> GatewayError:
    """A Ray exception raised by a call as the gateway's error (streams that break mid-way end
    with a ``Failure`` in ``Stream`` instead: their answer has begun).

    On an endpoint's call: the entry of ``RAY_ERRORS`` for its most specific class. Any failure
    outside an endpoint's call (the registry actor, a listing), or of a class the table lacks,
    means the cluster itself failed: ``cluster_unavailable``.
    """
    if endpoint is None:
        return GatewayError("cluster_unavailable", "the Ray cluster did not answer; try again shortly", retry_after=2)
    for cls in type(exc).__mro__:
        mapper = RAY_ERRORS.get(cls)
        if mapper is not None:
            return mapper(exc, endpoint)
    return _cluster_failed(exc, endpoint)


def as_gateway_error(exc: BaseException) -> Optional[GatewayError]:
    """A Ray failure met outside an endpoint's call (an error handler's: ``gateway.web``) as the gateway's
    error (``ray_failure``: ``cluster_unavailable``); None when ``exc`` is not Ray's."""
    return ray_failure(exc) if isinstance(exc, RayError) else None


def never_started(exc: BaseException) -> bool:
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


# -- the client ---------------------------------------------------------------------------------------------
class ReplicaClient:
    """Calls to endpoints' replicas through their Serve handles, on this process's event loop (``loop``)."""

    def __init__(self, cluster: Cluster, settings: Settings) -> None:
        self.cluster = cluster
        self.grpc = settings.serve_grpc
        #: every Serve call of this process is made on this loop (``gateway.aio``)
        # (gRPC's asyncio poller reports a harmless EAGAIN now and then; Serve filters it on its own loops)
        self.loop = EventLoop(exception_handler=asyncio_grpc_exception_handler)

    # -- handles ------------------------------------------------------------------------
    async def ingress(self, chat_name: str) -> str:
        """The name of the ingress deployment of ``chat_name``'s application; ``endpoint_not_ready`` when Serve has
        none. (Asks Serve's controller, which blocks: in a thread; once per endpoint and process.)"""
        try:
            return (await asyncio.to_thread(serve.get_app_handle, chat_name)).deployment_name  # (raises when gone)
        except RayServeException:
            raise GatewayError("endpoint_not_ready", f"'{chat_name}' is registered but not running: try again shortly, "
                               f"or deploy it again", retry_after=2) from None

    async def handles(self, deployment: str, chat_name: str) -> Handles:
        """New handles of ``chat_name``'s application, whose ingress is ``deployment`` (see ``new_handles``)."""
        return await new_handles(deployment, chat_name, self.grpc)

    def close(self, handles: Handles) -> None:
        """Shut down the router of ``handles`` (the chat and stream handles share it): a router wakes the
        loop ten times a second to report its metrics for as long as it lives."""
        self.loop.submit(handles.chat.shutdown_async())

    # -- calls --------------------------------------------------------------------------
    def up(self) -> None:
        """Fail at once when the cluster is lost (never connects: that blocks, and the loop must not)."""
        if self.cluster.lost:
            self.cluster.ensure_up()  # raises cluster_unavailable

    async def wait(self, pending: Awaitable[Any], timeout: float, cancel: Callable[[], Any],
                   endpoint: "Optional[Endpoint]" = None) -> Any:
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
                self.up()
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

    async def chat(self, endpoint: "Endpoint", call: ChatCall, timeout: float) -> ChatResult:
        """The replica's whole answer; its ``ErrorInfo`` (after its own retries) raised as a ``GatewayError``."""
        def send() -> tuple[Any, Callable[[], Any]]:
            response = endpoint.handle.chat.chat.remote(call)
            return response, response.cancel

        reply = await self._attempts(endpoint, send, timeout, "did not answer within {:.0f}s")
        if isinstance(reply, ErrorInfo):
            raise GatewayError.from_info(reply)
        return reply

    async def open_stream(self, endpoint: "Endpoint", call: ChatCall, timeout: float) -> tuple[StreamEvent, Any]:
        """The replica's stream and its first event (the rest is read with ``next_event``); a first event
        that is a ``Failure`` raised as its ``GatewayError``."""
        sent: list[Any] = []

        def send() -> tuple[Any, Callable[[], Any]]:
            sent.append(endpoint.handle.stream.stream.remote(call))
            return sent[-1].__anext__(), sent[-1].cancel

        try:
            first = await self._attempts(endpoint, send, timeout, "did not start its stream within {:.0f}s; try again")
        except StopAsyncIteration:
            raise GatewayError("upstream_error", f"'{endpoint.name}' ended its stream at once; try again") from None
        if isinstance(first, Failure):
            raise GatewayError.from_info(first.error)
        return first, sent[-1]

    async def _attempts(self, endpoint: "Endpoint", send: Callable[[], tuple[Any, Callable[[], Any]]], timeout: float,
                        late: str) -> Any:
        """The one attempt loop: ``send`` (a Serve call, and how to cancel it) until a replica takes it."""
        for attempt in range(_RAY_ATTEMPTS):
            self.up()
            pending, cancel = send()
            try:
                return await self.wait(pending, timeout, cancel, endpoint)
            except TimeoutError:
                raise GatewayError("upstream_timeout", f"'{endpoint.name}' {late.format(timeout)}") from None
            except RAY_FAILURES as exc:
                if attempt + 1 < _RAY_ATTEMPTS and never_started(exc):
                    await asyncio.sleep(0.05 * 2 ** attempt)
                    continue
                raise ray_failure(exc, endpoint.name) from None
        raise AssertionError("unreachable")

    async def next_event(self, endpoint: "Endpoint", gen: Any, timeout: float) -> StreamEvent:
        """The stream's next event, within ``timeout`` (``TimeoutError``); ``StopAsyncIteration`` at its end.

        (Each event within the endpoint's deadline, like the first: the replica bounds a stalled
        upstream, this bounds a replica whose node died without a word.) A Ray failure mid-way is the
        stream's cut, not the cluster's: ``upstream_error`` (its answer has begun; try again).
        """
        try:
            return await self.wait(gen.__anext__(), timeout, gen.cancel)
        except TimeoutError:
            raise
        except RAY_FAILURES:
            raise GatewayError("upstream_error", f"'{endpoint.name}' lost its stream mid-way; try again") from None
