"""The Serve deployment behind every endpoint: a thin shim around one provider adapter.

One class serves every provider; the deployment is named after the provider, the
application after the ``chat_name``, so the Ray dashboard reads "app openai_chat,
deployment openai, 4/4 replicas healthy". The key arrives only as a bound
constructor argument (a ``SecretStr`` inside the spec): never in ``user_config``,
``runtime_env``, environment variables or logs.

Nothing raised by an SDK crosses the Ray boundary: ``chat`` answers a
``ChatResult`` or an ``ErrorInfo`` value.
"""
from __future__ import annotations

import logging
import time
from typing import Union

from ray import serve

from providers.base import DeploySpec, Provider
from gateway.errors import ErrorInfo, GatewayError
from gateway.schemas import ChatCall, ChatResult

log = logging.getLogger("ray.serve")


class ChatEndpoint:
    def __init__(self, provider: "Provider", spec: "DeploySpec") -> None:
        self._provider = provider
        self._adapter = self._provider.create_adapter(spec)
        self._chat_name = spec.chat_name

    async def chat(self, call: ChatCall) -> Union[ChatResult, ErrorInfo]:
        started = time.perf_counter()
        try:
            result = await self._adapter.chat(call)
        except GatewayError as err:
            info = err.info if err.info.provider else err.info.model_copy(update={"provider": self._provider.name})
            log.warning(
                "chat failed request_id=%s chat_name=%s type=%s provider_code=%s upstream_status=%s",
                call.request_id, self._chat_name, info.type, info.provider_code, info.upstream_status,
            )
            return info
        except Exception as exc:  # noqa: BLE001 - a replica never lets an error escape raw
            log.error("chat crashed request_id=%s chat_name=%s error=%s", call.request_id, self._chat_name, type(exc).__name__)
            return ErrorInfo(
                type="upstream_error",
                message=f"the {self._provider.name} adapter failed unexpectedly ({type(exc).__name__})",
                provider=self._provider.name,
            )
        log.info(
            "chat ok request_id=%s chat_name=%s attempts=%d upstream_ms=%.1f total_ms=%.1f",
            call.request_id, self._chat_name, result.attempts, result.upstream_ms,
            (time.perf_counter() - started) * 1000,
        )
        return result

    async def ping(self) -> str:
        return self._provider.name

    async def __del__(self) -> None:
        await self._adapter.aclose()


#: the Serve deployment; per-endpoint options are set with ``.options`` at deploy time
ChatDeployment = serve.deployment(ChatEndpoint)
