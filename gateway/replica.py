"""The Serve deployment behind every endpoint: a thin shim around one provider adapter.

One class serves every provider; the deployment is named after the provider, the
application after the ``chat_name``, so the Ray dashboard reads "app openai_chat,
deployment openai, 4/4 replicas healthy". The key arrives only as a bound
constructor argument (a ``SecretStr`` inside the spec): never in ``user_config``,
``runtime_env``, environment variables or logs. A constructor that fails raises a
``DeployFailure`` with the spec's secrets redacted: Serve shows that traceback everywhere.

Nothing raised by an SDK crosses the Ray boundary: ``chat`` answers a ``ChatResult``
or an ``ErrorInfo`` value; ``stream`` yields the typed events of ``contract.events`` and
ends with ``Finish``, or with a ``Failure`` event when it fails. Retries (``gateway.retry``) happen here, next to the
upstream, and for streams only until the first event.

A hosted provider's replica holds an adapter per key of the endpoint's pool (``gateway.pool_member.PoolMember``):
each attempt goes to the pool's best key, and on to the next at once when a key answers 429, quota or auth
(``gateway.keypool``); answers and errors name the key that answered by its fingerprint (``key``).

On a loopback node (the embedded head) the constructor keeps the replica's Serve gRPC server on
loopback too: ``gateway.loopback``. Nothing here imports Ray: the Serve deployment of this class,
its Ray metrics and that loopback patch are ``gateway.serve_apps``'.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Optional, Union

from providers.base import Provider
from providers.deploy_failure import construction_failure
from providers.specs import DeploySpec, SaaSDeploySpec
from contract.errors import ErrorInfo, GatewayError
from contract.events import Failure, Finish, StreamEvent
from gateway.keypool import keyed
from gateway.pool_member import PoolMember
from gateway.retry import RetryPolicy, call_with_retries
from gateway.serve_apps import ReplicaMetrics, keep_replica_grpc_on_loopback
from contract.calls import ChatCall, ChatResult

log = logging.getLogger("ray.serve")


class ChatReplica:
    def __init__(self, provider: "Provider", spec: "DeploySpec", policy: RetryPolicy,
                 pool: Optional[dict] = None) -> None:
        """``pool``: ``{"generation", "namespace"}`` of the endpoint's key pool in the keeper
        (``gateway.pool_keeper``); None: the pool of this replica alone."""
        # Before Serve starts this replica's gRPC server (right after this constructor): on a
        # loopback node (the embedded head) it listens on loopback, not on all interfaces.
        keep_replica_grpc_on_loopback()
        self._provider = provider
        self._adapter = None
        self._keys: Optional[PoolMember] = None
        failure = None
        try:
            if isinstance(spec, SaaSDeploySpec):
                self._keys = PoolMember(provider, spec, **(pool or {}))
            else:
                self._adapter = provider.create_adapter(spec)
        except Exception as exc:  # noqa: BLE001 - an SDK's constructor may put the key in its error
            failure = construction_failure(exc, spec, provider.name)
        if failure is not None:
            # Raised here, not in the except block: Serve's status, dashboard and controller log
            # show this traceback, and the original error is not even chained to it.
            raise failure from None
        if self._keys is not None:
            self._keys.start()  # (its sync with the keeper, on this replica's event loop)
        self._chat_name = spec.chat_name
        self._policy = policy
        # Ray's own metrics (dashboard, Prometheus via Ray): per endpoint, no user input in tags.
        self._metrics = ReplicaMetrics(spec.chat_name, provider.name)

    def _observe(self, started: float, attempts: int, error: "ErrorInfo | None" = None) -> None:
        self._metrics.observe(time.perf_counter() - started, attempts, error.type if error is not None else None)

    def _crashed(self, call: ChatCall, exc: Exception) -> ErrorInfo:
        """An exception the adapter did not map: its class is logged and shown, never its text (it may hold input)."""
        log.error("adapter crashed request_id=%s chat_name=%s error=%s", call.request_id, self._chat_name, type(exc).__name__)
        info = ErrorInfo(type="upstream_error", provider=self._provider.name,
                         message=f"the {self._provider.name} adapter failed unexpectedly ({type(exc).__name__})")
        self._metrics.failed(info.type)
        return info

    def _log_failure(self, what: str, call: ChatCall, info: ErrorInfo) -> None:
        log.warning("%s failed request_id=%s chat_name=%s type=%s provider_code=%s upstream_status=%s attempts=%s",
                    what, call.request_id, self._chat_name, info.type, info.provider_code, info.upstream_status, info.attempts)

    def _info(self, err: GatewayError) -> ErrorInfo:
        return err.info if err.info.provider else err.info.model_copy(update={"provider": self._provider.name})

    async def _chat_once(self, call: ChatCall) -> ChatResult:
        """One attempt: the adapter's, or the key pool's (on to the next key at once on 429, quota, auth)."""
        if self._keys is None:
            return await self._adapter.chat(call)
        result, key = await self._keys.call(lambda adapter: adapter.chat(call))
        result.key = key
        return result

    async def chat(self, call: ChatCall) -> Union[ChatResult, ErrorInfo]:
        started = time.perf_counter()
        try:
            result, attempts = await call_with_retries(self._policy, lambda: self._chat_once(call))
        except GatewayError as err:
            info = self._info(err)
            self._observe(started, info.attempts or 1, info)
            self._log_failure("chat", call, info)
            return info
        except Exception as exc:  # noqa: BLE001 - a replica never lets an error escape raw
            return self._crashed(call, exc)
        result.attempts = attempts
        result.upstream_ms = (time.perf_counter() - started) * 1000
        self._observe(started, attempts)
        log.info("chat ok request_id=%s chat_name=%s attempts=%d upstream_ms=%.1f",
                 call.request_id, self._chat_name, attempts, result.upstream_ms)
        return result

    async def stream(self, call: ChatCall) -> AsyncIterator[StreamEvent]:
        """The adapter's events (``contract.events``), ending with ``Finish`` or ``Failure``.

        The first event carries ``upstream_ms`` (the upstream's time to it) and ``Finish``
        the attempts and timings, so that the gateway can tell its own overhead apart.
        """
        started = time.perf_counter()
        stream = None
        key: Optional[str] = None  # (the pool's key the stream came from)

        async def open_on(adapter):
            nonlocal stream
            if stream is not None:
                await stream.aclose()
                stream = None
            stream = adapter.stream(call).__aiter__()
            return await stream.__anext__()

        async def first_event():
            nonlocal key
            if self._keys is None:
                return await open_on(self._adapter)
            event, key = await self._keys.call(open_on)
            return event

        try:
            try:
                event, attempts = await call_with_retries(self._policy, first_event)
            except GatewayError as err:
                info = self._info(err)
                self._observe(started, info.attempts or 1, info)
                self._log_failure("stream", call, info)
                yield Failure(info)
                return
            except StopAsyncIteration:
                yield Failure(ErrorInfo(type="upstream_error", message="the provider's stream was empty", provider=self._provider.name))
                return
            except Exception as exc:  # noqa: BLE001 - nothing raw crosses Ray
                yield Failure(self._crashed(call, exc))
                return
            first_ms = (time.perf_counter() - started) * 1000
            event.upstream_ms = first_ms
            while True:
                if isinstance(event, Finish):
                    self._observe(started, attempts)
                    event.attempts = attempts
                    event.key = key
                    event.upstream_ms = (time.perf_counter() - started) * 1000
                    log.info("stream ok request_id=%s chat_name=%s attempts=%d upstream_ms=%.1f",
                             call.request_id, self._chat_name, attempts, event.upstream_ms)
                    yield event
                    break
                yield event
                try:
                    event = await asyncio.wait_for(stream.__anext__(), self._policy.deadline_s)
                except asyncio.TimeoutError:
                    info = ErrorInfo(type="upstream_timeout", message="the provider's stream stalled", provider=self._provider.name)
                    self._log_failure("stream", call, info)
                    yield Failure(info)
                    break
                except GatewayError as err:  # after the first byte: reported in the stream, no retry
                    if key is not None:
                        self._keys.ledger.failed(key, err.info, counted=False)  # (what it says of the key)
                    info = self._info(keyed(err, key) if key is not None else err)
                    self._log_failure("stream", call, info)
                    yield Failure(info)
                    break
                except StopAsyncIteration:
                    break
                except Exception as exc:  # noqa: BLE001 - nothing raw crosses Ray
                    yield Failure(self._crashed(call, exc))
                    break
        except (asyncio.CancelledError, GeneratorExit):  # the caller left: the upstream stream is closed below
            log.info("stream cancelled request_id=%s chat_name=%s", call.request_id, self._chat_name)
            raise
        finally:
            if stream is not None:
                await stream.aclose()  # also on cancellation: the upstream stream is closed

    async def ping(self) -> str:
        return self._provider.name

    async def __del__(self) -> None:
        if self._adapter is not None:  # (None: the constructor failed)
            await self._adapter.aclose()
        if self._keys is not None:
            await self._keys.aclose()

