"""The one dispatch path: ``chat_name`` -> its Serve application -> a ``ChatResult``.

Every chat route (``/chat``, ``/<provider>/chat`` and later renderings) goes through
``Dispatcher.chat``. It resolves the endpoint (a short per-process cache over the
registry), calls the replica through a Serve handle, and turns every Ray-side
failure into a gateway error type.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

import ray
from ray import serve
from ray.exceptions import GetTimeoutError, RayActorError, RayError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException

from .cluster import Cluster
from .config import Settings
from .errors import ErrorInfo, GatewayError
from .schemas import ChatCall, ChatResult


@dataclass
class Endpoint:
    record: dict
    handle: Any
    expires: float

    @property
    def provider(self) -> str:
        return self.record["provider"]


class Dispatcher:
    def __init__(self, cluster: Cluster, settings: Settings) -> None:
        self.cluster = cluster
        self.settings = settings
        self._cache: dict[str, Endpoint] = {}
        self._handles: dict[str, Any] = {}
        self._lock = threading.Lock()

    def resolve(self, chat_name: str) -> Endpoint:
        now = time.monotonic()
        hit = self._cache.get(chat_name)
        if hit is not None and hit.expires > now:
            return hit
        record = ray.get(self.cluster.registry().get.remote(chat_name), timeout=5)
        if record is None:
            self.forget(chat_name)
            raise GatewayError("not_found", f"no endpoint named '{chat_name}'")
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

    def chat(self, chat_name: str, call: ChatCall, provider: Optional[str] = None) -> tuple[Endpoint, ChatResult]:
        """Answer ``call`` on ``chat_name``; ``provider`` restricts to that provider's endpoints."""
        self.cluster.connect()
        endpoint = self.resolve(chat_name)
        if provider is not None and endpoint.provider != provider:
            raise GatewayError(
                "not_found",
                f"'{chat_name}' is a {endpoint.provider} endpoint, not {provider}: use POST /{endpoint.provider}/chat or POST /chat",
            )
        timeout = float(endpoint.record.get("timeout", 60)) + 5.0
        response = endpoint.handle.chat.remote(call)
        try:
            reply = response.result(timeout_s=timeout)
        except (TimeoutError, GetTimeoutError):
            response.cancel()
            raise GatewayError("upstream_timeout", f"'{chat_name}' did not answer within {timeout:.0f}s") from None
        except BackPressureError:
            raise GatewayError("endpoint_not_ready", f"'{chat_name}' is at capacity; retry shortly", retry_after=1) from None
        except DeploymentUnavailableError:
            self.forget(chat_name)
            raise GatewayError("endpoint_not_ready", f"'{chat_name}' failed to deploy", retry_after=5) from None
        except (RayActorError, RayServeException):
            self.forget(chat_name)
            raise GatewayError("endpoint_not_ready", f"a replica of '{chat_name}' went away mid-call; retry", retry_after=1) from None
        except RayError:
            raise GatewayError("cluster_unavailable", "the Ray cluster failed while serving the call", retry_after=2) from None
        if isinstance(reply, ErrorInfo):
            raise GatewayError.from_info(reply)
        return endpoint, reply
