"""The one dispatch path: ``chat_name`` -> its Serve application -> a ``ChatResult``.

Every chat route goes through ``Dispatcher.chat`` (or ``Dispatcher.stream``):

1. resolve the endpoint (a short per-process cache over the registry actor);
2. skip it while it cools down (shared state in the registry; one caller probes after);
3. call a replica through its Serve handle; a replica that dies mid-call, a full queue
   or a replica being replaced is retried on another replica; a lost cluster answers
   ``cluster_unavailable`` at once;
4. on an upstream failure (after the replica's own retries) try the fallbacks in order.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import ray
from ray import serve

import providers
from ray.exceptions import RayActorError, RayError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException

from .cluster import Cluster
from .config import Settings
from .errors import ErrorInfo, GatewayError
from .schemas import ChatCall, ChatResult

#: failures that move on to the next fallback; caller errors never do
FALLBACK_ON = frozenset({"upstream_auth", "upstream_quota", "upstream_rate_limited", "upstream_error",
                         "upstream_timeout", "endpoint_not_ready"})
#: failures that count towards a cooldown; auth and quota start one at once
UPSTREAM_FAILURES = frozenset({"upstream_auth", "upstream_quota", "upstream_rate_limited", "upstream_error", "upstream_timeout"})
IMMEDIATE_COOLDOWN = frozenset({"upstream_auth", "upstream_quota"})
#: Ray-side failures retried on another replica
_REPLICA_GONE = (RayActorError, BackPressureError, RayServeException)
_RAY_ATTEMPTS = 3
#: a waiting call looks at the cluster's health this often (each look costs the worker CPU:
#: 1 000 calls in flight at 0.5 s were 2 000 wake-ups a second)
_POLL_S = 2.0


@dataclass
class Endpoint:
    record: dict
    handle: Any
    expires: float

    @property
    def name(self) -> str:
        return self.record["chat_name"]

    @property
    def provider(self) -> str:
        return self.record["provider"]

    @property
    def health(self) -> dict:
        return self.record.get("health") or {"state": "ok", "consecutive_failures": 0}


@dataclass
class Outcome:
    """What answered (``served_by``) and what was tried before it, and why."""

    endpoint: Endpoint
    result: Any
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


class Dispatcher:
    def __init__(self, cluster: Cluster, settings: Settings) -> None:
        self.cluster = cluster
        self.settings = settings
        self._cache: dict[str, Endpoint] = {}
        self._handles: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(32, thread_name_prefix="broadcast")

    # -- endpoints ---------------------------------------------------------------
    def resolve(self, chat_name: str) -> Endpoint:
        now = time.monotonic()
        hit = self._cache.get(chat_name)
        if hit is not None and hit.expires > now:
            return hit
        self.cluster.ensure_up()
        record = ray.get(self.cluster.registry().get.remote(chat_name), timeout=10)
        if record is None:
            self.forget(chat_name)
            raise GatewayError("not_found", f"no endpoint named '{chat_name}'")
        status = record.get("status", "RUNNING")
        if status == "DEPLOYING":
            raise GatewayError("endpoint_not_ready", f"'{chat_name}' is still deploying (loading its model); "
                               f"GET /deployments/{chat_name} shows progress", retry_after=5)
        if status == "DEPLOY_FAILED":
            failure = record.get("failure") or {}
            raise GatewayError("endpoint_not_ready", f"'{chat_name}' failed to deploy ({failure.get('reason')}): "
                               f"{failure.get('message')}; deploy it again")
        with self._lock:
            # A handle is bound to the deployment's name, which is the provider's: an endpoint
            # undeployed and deployed again under another provider needs a new one.
            handle_key = (chat_name, record["provider"])
            handle = self._handles.get(handle_key)
            if handle is None:
                try:
                    handle = serve.get_app_handle(chat_name)
                except RayServeException:
                    raise GatewayError("endpoint_not_ready", f"'{chat_name}' is registered but not running", retry_after=2) from None
                self._handles[handle_key] = handle
            endpoint = Endpoint(record, handle, now + self.settings.endpoint_cache_s)
            self._cache[chat_name] = endpoint
        return endpoint

    def forget(self, chat_name: str) -> None:
        with self._lock:
            self._cache.pop(chat_name, None)
            for key in [k for k in self._handles if k[0] == chat_name]:
                del self._handles[key]

    def _chain(self, chat_name: str, provider: Optional[str], fallbacks: Optional[list[str]]) -> tuple[Endpoint, list[str]]:
        primary = self.resolve(chat_name)
        if provider is not None and primary.provider != provider:
            raise GatewayError(
                "not_found",
                f"'{chat_name}' is a {primary.provider} endpoint, not {provider}: use POST /{primary.provider}/chat or POST /chat",
            )
        names = list(primary.record.get("fallbacks") or []) if fallbacks is None else list(fallbacks)
        return primary, [chat_name] + [n for n in names if n != chat_name]

    # -- health (cooldowns) -------------------------------------------------------
    def _skip_reason(self, endpoint: Endpoint) -> Optional[GatewayError]:
        health = endpoint.health
        if health.get("state") in (None, "ok"):
            return None
        until = health.get("cooldown_until") or 0
        now = time.time()
        if until > now:
            return GatewayError("endpoint_not_ready", f"'{endpoint.name}' is cooling down after upstream failures "
                                f"({health.get('last_error')})", retry_after=until - now)
        lease = float(endpoint.record.get("timeout", 60)) + 5
        if ray.get(self.cluster.registry().claim_probe.remote(endpoint.name, lease), timeout=10):
            return None  # this request probes it
        return GatewayError("endpoint_not_ready", f"'{endpoint.name}' is being probed after a cooldown", retry_after=1)

    def _report(self, endpoint: Endpoint, err: Optional[GatewayError]) -> None:
        s = self.settings
        if s.cooldown_s <= 0:
            return  # cooldowns off
        registry = self.cluster.registry()
        if err is None:
            if endpoint.health.get("state") == "ok" and not endpoint.health.get("consecutive_failures"):
                return  # the common case costs nothing
            health = ray.get(registry.record_success.remote(endpoint.name), timeout=10)
        elif err.type in UPSTREAM_FAILURES:
            health = ray.get(registry.record_failure.remote(
                endpoint.name, err.type, err.type in IMMEDIATE_COOLDOWN, s.cooldown_failures, s.cooldown_window_s, s.cooldown_s,
            ), timeout=10)
        else:
            return
        endpoint.record = {**endpoint.record, "health": health}

    # -- one endpoint, through Ray ------------------------------------------------
    def _wait(self, response: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            if self.cluster.lost:
                response.cancel()
                self.cluster.ensure_up()  # raises cluster_unavailable
            try:
                return response.result(timeout_s=min(_POLL_S, max(0.01, deadline - time.monotonic())))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    response.cancel()
                    raise

    def _call(self, endpoint: Endpoint, call: ChatCall) -> ChatResult:
        providers.get(endpoint.provider).check_call(call)
        timeout = float(endpoint.record.get("timeout", 60)) + 5.0
        for attempt in range(_RAY_ATTEMPTS):
            self.cluster.ensure_up()
            try:
                reply = self._wait(endpoint.handle.chat.remote(call), timeout)
            except TimeoutError:
                raise GatewayError("upstream_timeout", f"'{endpoint.name}' did not answer within {timeout:.0f}s") from None
            except DeploymentUnavailableError:
                self.forget(endpoint.name)
                raise GatewayError("endpoint_not_ready", f"'{endpoint.name}' failed to deploy", retry_after=5) from None
            except _REPLICA_GONE:
                if attempt + 1 < _RAY_ATTEMPTS:
                    time.sleep(0.05 * 2 ** attempt)  # Serve routes the retry to a live replica
                    continue
                raise GatewayError("endpoint_not_ready", f"no replica of '{endpoint.name}' could take the call", retry_after=1) from None
            except RayError:
                raise GatewayError("cluster_unavailable", "the Ray cluster failed while serving the call", retry_after=2) from None
            if isinstance(reply, ErrorInfo):
                raise GatewayError.from_info(reply)
            return reply
        raise AssertionError("unreachable")

    # -- the dispatch path ----------------------------------------------------------
    def _walk(self, chat_name: str, provider: Optional[str], fallbacks: Optional[list[str]],
              attempt: Callable[[Endpoint], Any]) -> tuple[Endpoint, Any, list[dict]]:
        """Try ``chat_name``, then its fallbacks, with ``attempt``; the first answer wins.

        Endpoints that cool down are skipped; an upstream failure moves on, a caller error stops.
        """
        primary, chain = self._chain(chat_name, provider, fallbacks)
        tried: list[dict] = []
        last: Optional[GatewayError] = None
        for name in chain:
            try:
                endpoint = primary if name == chat_name else self.resolve(name)
            except GatewayError as err:
                tried.append(_tried(name, err))
                last = last or err
                continue
            skip = self._skip_reason(endpoint)
            if skip is not None:
                tried.append(_tried(name, skip))
                last = skip
                continue
            try:
                return endpoint, attempt(endpoint), tried
            except GatewayError as err:
                self._report(endpoint, err)
                tried.append(_tried(name, err))
                if err.type not in FALLBACK_ON:
                    raise _with_tried(err, tried) from None
                last = err
        raise _with_tried(last, tried)

    def chat(self, chat_name: str, call: ChatCall, provider: Optional[str] = None,
             fallbacks: Optional[list[str]] = None) -> Outcome:
        """Answer ``call`` on ``chat_name`` or its fallbacks; ``provider`` restricts the primary."""
        endpoint, result, tried = self._walk(chat_name, provider, fallbacks, lambda ep: self._call(ep, call))
        self._report(endpoint, None)
        return Outcome(endpoint, result, tried)

    def stream(self, chat_name: str, call: ChatCall, provider: Optional[str] = None,
               fallbacks: Optional[list[str]] = None) -> tuple[Outcome, Iterator[dict]]:
        """Like ``chat``, but retries and fallbacks only until the first event is in hand.

        Answers the outcome (``result`` is the first event) and an iterator over the rest;
        closing the iterator cancels the replica's stream, which closes the upstream one.
        Success or failure is reported to the cooldown state when the stream ends.
        """
        endpoint, (first, rest), tried = self._walk(chat_name, provider, fallbacks, lambda ep: self._open_stream(ep, call))
        return Outcome(endpoint, first, tried), self._follow(endpoint, rest)

    def _open_stream(self, endpoint: Endpoint, call: ChatCall) -> tuple[dict, Any]:
        providers.get(endpoint.provider).check_call(call)
        timeout = float(endpoint.record.get("timeout", 60)) + 5.0
        for attempt in range(_RAY_ATTEMPTS):
            self.cluster.ensure_up()
            gen = endpoint.handle.options(stream=True).stream.remote(call)
            try:
                first = self._next_event(gen, timeout)
            except _REPLICA_GONE:
                if attempt + 1 < _RAY_ATTEMPTS:
                    time.sleep(0.05 * 2 ** attempt)
                    continue
                raise GatewayError("endpoint_not_ready", f"no replica of '{endpoint.name}' could take the call", retry_after=1) from None
            except StopIteration:
                raise GatewayError("upstream_error", f"'{endpoint.name}' ended its stream at once") from None
            except RayError:
                raise GatewayError("cluster_unavailable", "the Ray cluster failed while serving the call", retry_after=2) from None
            if "error" in first:
                raise GatewayError.from_info(first["error"])
            return first, gen
        raise AssertionError("unreachable")

    def _next_event(self, gen: Any, timeout: float) -> dict:
        result: dict = {}

        def pull() -> None:
            try:
                result["event"] = next(gen)
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                result["error"] = exc

        puller = threading.Thread(target=pull, daemon=True)
        puller.start()
        deadline = time.monotonic() + timeout
        while puller.is_alive():
            puller.join(0.25)
            if self.cluster.lost or time.monotonic() > deadline:
                gen.cancel()
                self.cluster.ensure_up()
                raise GatewayError("upstream_timeout", "the endpoint did not start its stream in time")
        if "error" in result:
            raise result["error"]
        return result["event"]

    def _follow(self, endpoint: Endpoint, gen: Any) -> Iterator[dict]:
        failed: Optional[GatewayError] = None
        try:
            for event in gen:
                if "error" in event:
                    failed = GatewayError.from_info(event["error"])
                yield event
        except RayError:
            failed = GatewayError("upstream_error", f"'{endpoint.name}' lost its stream mid-way")
            yield {"error": failed.info}
        finally:
            gen.cancel()  # no-op when finished; cancels the replica's (and upstream) stream otherwise
            self._report(endpoint, failed)

    # -- fan-out ----------------------------------------------------------------------
    def broadcast(self, chat_names: list[str], make_call) -> dict[str, Any]:
        """Ask every endpoint at once; answers per name, in the time of the slowest."""
        futures = {name: self._pool.submit(self.chat, name, make_call(name)) for name in chat_names}
        out: dict[str, Any] = {}
        for name, future in futures.items():
            try:
                out[name] = future.result()
            except GatewayError as err:
                out[name] = err
        return out
