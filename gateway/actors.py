"""The gateway's named Ray actors, and the GCS key-value store they keep their state in.

Three small detached actors serve every gateway process of a cluster: the endpoint registry
(``gateway.registry``), the client-key limits keeper (``gateway.keeper``) and the key pools keeper
(``gateway.key_pools``, whose logic is ``gateway.pool_keeper``). Their classes are plain Python;
this is the one module that makes them actors (``named_actor``: found, or made, by name), finds one
without making it (``find_actor``), calls them (``call``/``acall``, ``send`` then ``answer``/``aanswer``
/``resolve``/``when_answered``) and kills them (``kill``), and that reads and writes the GCS's
key-value store for them (``kv_get``/``kv_put``). The rest of Ray the gateway uses is the connection
(``gateway.cluster``) and Serve (``gateway.serve_apps``, ``gateway.replica_client``).

One mapping of Ray's failures: whatever Ray raises for a call (``RayError``: the actor died or is
restarting, no answer within the timeout, the cluster is gone, the method raised) comes out as
``ActorCallFailed``, whose ``why`` is the name of Ray's exception's class (what callers put in their
messages) and ``died`` says the actor is gone for good (``RayActorError``: killed, or out of
restarts), when callers find or make it again. An actor without the method asked for (one an older
gateway made) raises ``AttributeError`` as Ray does, at once: callers replace such an actor.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import ray
from ray.exceptions import RayActorError, RayError
from ray.experimental import internal_kv

#: the resource only the head node has (Ray Serve places its controller with it too)
HEAD_NODE_RESOURCE = "node:__internal_head__"

#: what every named actor of the gateway is, as a Ray actor: it takes no CPU, Ray starts it again whenever
#: its process dies (``max_restarts=-1``), and a call in flight then is sent again to the restarted one
#: (``max_task_retries=-1``: every method of each is safe to run twice)
_ACTOR_OPTIONS = {"num_cpus": 0, "max_restarts": -1, "max_task_retries": -1}
#: each plain class, as a Ray actor class (made once per process)
_actor_classes: dict[type, Any] = {}


class ActorCallFailed(Exception):
    """Ray failed a call to a named actor (or making it); its text is Ray's. ``why``: in words for a
    message (the class name of Ray's exception, or how long the caller waited); ``died``: the actor is gone
    for good (killed, or out of restarts), so the next call should find or make it again."""

    def __init__(self, why: str, text: str = "", died: bool = False) -> None:
        super().__init__(text or why)
        self.why = why
        self.died = died


def _mapped(exc: BaseException) -> BaseException:
    """The one mapping: a Ray failure as ``ActorCallFailed``; anything else as it is."""
    if isinstance(exc, RayError):
        return ActorCallFailed(type(exc).__name__, str(exc), died=isinstance(exc, RayActorError))
    return exc


def reason(exc: BaseException) -> str:
    """How ``exc`` reads in a message: Ray's exception's class name for a failed call, else its own class's name."""
    return exc.why if isinstance(exc, ActorCallFailed) else type(exc).__name__


# -- making, finding, killing ----------------------------------------------------------------------
def named_actor(cls: type, name: str, namespace: str, *args: Any) -> Any:
    """The actor ``name`` in ``namespace`` (a handle): found, or made of ``cls`` with ``args`` (detached, on the
    head node, where the GCS is). One that exists already is found as it is, whatever its class and
    arguments (one an older gateway made runs that gateway's code: callers check its protocol)."""
    actor_class = _actor_classes.get(cls)
    if actor_class is None:
        actor_class = _actor_classes[cls] = ray.remote(**_ACTOR_OPTIONS)(cls)
    try:
        return actor_class.options(name=name, namespace=namespace, lifetime="detached", get_if_exists=True,
                                   resources={HEAD_NODE_RESOURCE: 0.001}).remote(*args)
    except RayError as exc:
        raise _mapped(exc) from exc


def find_actor(name: str, namespace: str) -> Optional[Any]:
    """The actor ``name`` in ``namespace``, or None when there is none (never made here)."""
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def kill(actor: Any) -> None:
    """Stop ``actor`` for good (it runs an older gateway's code): Ray does not start it again, and its name is
    free once the GCS has seen it die."""
    try:
        ray.kill(actor, no_restart=True)
    except RayError as exc:
        raise _mapped(exc) from exc


# -- calls -------------------------------------------------------------------------------------------
def send(actor: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    """Send ``method(*args, **kwargs)`` to ``actor``: its ObjectRef (Ray runs one caller's calls to an actor in
    the order sent). ``AttributeError`` when the actor has no such method."""
    bound = getattr(actor, method)
    try:
        return bound.remote(*args, **kwargs)
    except RayError as exc:
        raise _mapped(exc) from exc


def answer(ref: Any, timeout: float) -> Any:
    """The answer to the call sent as ``ref``, waited for here (blocking: in a thread) at most ``timeout`` s."""
    try:
        return ray.get(ref, timeout=timeout)
    except RayError as exc:  # (``GetTimeoutError`` is one)
        raise _mapped(exc) from exc


def call(actor: Any, method: str, *args: Any, timeout: float, **kwargs: Any) -> Any:
    """``send`` then ``answer``: one blocking call (in a thread) of at most ``timeout`` seconds."""
    return answer(send(actor, method, *args, **kwargs), timeout)


async def resolve(ref: Any) -> Any:
    """The answer to the call sent as ``ref``, awaited on the running loop for as long as it takes (an ObjectRef
    is awaited as ``asyncio.wrap_future(ref.future())``)."""
    try:
        return await ref
    except RayError as exc:
        raise _mapped(exc) from exc


async def aanswer(ref: Any, timeout: float) -> Any:
    """The answer to the call sent as ``ref``, awaited for at most ``timeout`` seconds (then ``ActorCallFailed``
    with ``why`` "no answer within ...")."""
    try:
        return await asyncio.wait_for(resolve(ref), timeout)
    except asyncio.TimeoutError:
        raise ActorCallFailed(f"no answer within {timeout:g}s") from None


async def acall(actor: Any, method: str, *args: Any, timeout: float, **kwargs: Any) -> Any:
    """``send`` then ``aanswer``: one call awaited for at most ``timeout`` seconds."""
    return await aanswer(send(actor, method, *args, **kwargs), timeout)


def when_answered(ref: Any, then: Callable[[Optional[BaseException]], None]) -> None:
    """Call ``then`` (in Ray's thread) once the call sent as ``ref`` ended: with None when it answered, else with
    what failed it; never when it was cancelled. For calls sent without waiting (their failures are logged)."""
    def done(future: Any) -> None:
        try:
            error = future.exception()
        except BaseException:  # noqa: BLE001 - (cancelled)
            return
        then(None if error is None else _mapped(error))

    ref.future().add_done_callback(done)


# -- inside an actor ---------------------------------------------------------------------------------
def runtime_namespace() -> str:
    """The Ray namespace this process runs in (an actor's: the one it was made in)."""
    return ray.get_runtime_context().namespace


def ray_version() -> str:
    return ray.__version__


def pickled(obj: Any) -> bytes:
    """``obj`` pickled with Ray's cloudpickle (what an actor keeps as bytes, without needing its classes);
    the standard library's ``pickle.loads`` reads it back."""
    from ray import cloudpickle

    return cloudpickle.dumps(obj)


# -- the GCS key-value store -------------------------------------------------------------------------
def kv_get(key: str, namespace: str) -> Optional[bytes]:
    """The value of ``key`` in ``namespace`` of the GCS's key-value store, or None."""
    return internal_kv._internal_kv_get(key, namespace=namespace)


def kv_put(key: str, value: Any, namespace: str, overwrite: bool = True) -> None:
    """Write ``value`` (bytes or str) as ``key`` in ``namespace``; ``overwrite`` False: only when it is absent."""
    internal_kv._internal_kv_put(key, value, overwrite=overwrite, namespace=namespace)


def dashboard_address() -> Optional[str]:
    """Where the Ray dashboard registered itself in the GCS (what ``ray job submit`` reads too), or None."""
    from ray._private import ray_constants

    raw = internal_kv._internal_kv_get(ray_constants.DASHBOARD_ADDRESS, namespace=ray_constants.KV_NAMESPACE_DASHBOARD)
    return raw.decode() if raw else None


# -- a look from outside (``python -m gateway.status_probe``) ---------------------------------------
@contextmanager
def looking_at(address: str, namespace: str) -> Iterator[Any]:
    """Connected to the cluster at ``address`` as a driver that only looks (it makes no actor: ``find_actor``,
    ``call``, ``nodes``): Ray's context (its ``dashboard_url``); disconnected on leaving. Connect errors are
    Ray's, as they are (the caller says them in words)."""
    context = ray.init(address=address, namespace=namespace, log_to_driver=False,
                       logging_level=logging.ERROR, configure_logging=False)
    try:
        yield context
    finally:
        ray.shutdown()


def nodes() -> list[dict]:
    """Ray's view of the cluster's nodes (``ray.nodes()``: ``NodeID``, ``NodeManagerAddress``, ``Alive``,
    ``Resources``)."""
    return ray.nodes()
