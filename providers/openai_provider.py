"""OpenAI (and any OpenAI-wire relay) through the official ``openai`` SDK's async client.

The module is deliberately not called ``openai.py``: a file of that name shadows the
SDK for anything that runs with this folder on ``sys.path``.
"""
from __future__ import annotations

import time
from typing import AsyncIterator, Optional

import aiohttp
import httpx2  # the openai SDK's own HTTP library
import openai

from gateway.errors import GatewayError
from gateway.schemas import ChatCall, ChatResult, Usage

from .base import (ChatAdapter, Provider, SaaSDeploySpec, auth_message, chunk_events, completion_result, end_event,
                   judge_key_check, reraise_as_gateway_error, retry_after_seconds, usage_of)

DEFAULT_BASE_URL = "https://api.openai.com/v1"


class OpenAIDeploySpec(SaaSDeploySpec):
    MODEL_TYPES = ("saas/openai", "saas/official_openai")


def _refused(exc: BaseException) -> bool:
    """The aiohttp transport reports a refused connection as a connect *timeout*; look beneath."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, (ConnectionRefusedError, aiohttp.ClientConnectorError)) and not isinstance(
            exc, aiohttp.ServerTimeoutError
        ):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def map_openai_error(exc: Exception) -> GatewayError:
    """Every ``openai`` exception onto the gateway's types; provider codes pass through."""
    if isinstance(exc, openai.APITimeoutError) and not _refused(exc):
        return GatewayError("upstream_timeout", "the provider did not answer in time")
    if isinstance(exc, openai.APIConnectionError):
        return GatewayError("upstream_error", "could not reach the provider (connection failed)")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        body = exc.body if isinstance(exc.body, dict) else {}
        code = str(exc.code or body.get("code") or body.get("type") or "") or None
        message = str(body.get("message") or f"the provider answered HTTP {status}")
        details = dict(
            provider_code=code,
            provider_request_id=exc.request_id,
            upstream_status=status,
        )
        if status in (401, 403):
            return GatewayError("upstream_auth", auth_message(f"the provider rejected the endpoint's key: {message}"),
                                **details)
        if status == 402 or code == "insufficient_quota" or body.get("type") == "insufficient_quota":
            return GatewayError("upstream_quota", f"the provider's quota or balance is exhausted: {message}", **details)
        if status == 429:
            return GatewayError(
                "upstream_rate_limited",
                f"the provider is rate limiting this key: {message}",
                retry_after=retry_after_seconds(exc.response.headers),
                **details,
            )
        if code in ("content_filter", "content_policy_violation"):
            return GatewayError("content_filter", f"the provider refused the content: {message}", **details)
        if status == 408:
            return GatewayError("upstream_timeout", f"the provider timed out: {message}", **details)
        if 400 <= status < 500:
            return GatewayError("upstream_bad_request", f"the provider refused the request: {message}", **details)
        return GatewayError("upstream_error", f"the provider failed: {message}", **details)
    if isinstance(exc, openai.APIResponseValidationError) or isinstance(exc, ValueError):
        return GatewayError("upstream_error", "the provider's answer was malformed")
    return GatewayError("upstream_error", f"unexpected {type(exc).__name__} while calling the provider")


class OpenAIAdapter(ChatAdapter):
    def __init__(self, spec: OpenAIDeploySpec) -> None:
        self._spec = spec
        self._client: Optional[openai.AsyncOpenAI] = None

    def _get_client(self) -> openai.AsyncOpenAI:
        # Built on first use, inside the replica's event loop (aiohttp wants one).
        if self._client is None:
            spec = self._spec
            self._client = openai.AsyncOpenAI(
                api_key=spec.api_key.get_secret_value(),
                base_url=spec.base_url or DEFAULT_BASE_URL,
                max_retries=0,  # the gateway owns retries
                timeout=openai.Timeout(spec.timeout, connect=min(spec.timeout, 10.0)),
                http_client=openai.DefaultAioHttpClient(proxy=spec.proxy) if spec.proxy else openai.DefaultAioHttpClient(),
            )
        return self._client

    async def chat(self, call: ChatCall) -> ChatResult:
        spec = self._spec
        body = {"model": spec.model_name, "messages": [m.model_dump(exclude_none=True) for m in call.messages],
                **call.params.model_dump(exclude_none=True)}
        started = time.perf_counter()
        with reraise_as_gateway_error("openai", spec.api_key.get_secret_value(), map_openai_error):
            # The SDK's documented raw request ("undocumented endpoints": ``client.post``): the same
            # auth, timeouts and typed errors as ``chat.completions.create``, without building typed
            # request and response objects, which cost the replica ~0.5 ms of CPU a call.
            response = await self._get_client().post(
                "/chat/completions", cast_to=httpx2.Response, body=body,
                options={"headers": {"X-Request-Id": call.request_id}},
            )
            result = completion_result(response.json(), response.headers.get("x-request-id"))
            result.upstream_ms = (time.perf_counter() - started) * 1000
            return result

    async def stream(self, call: ChatCall) -> AsyncIterator[dict]:
        spec = self._spec
        with reraise_as_gateway_error("openai", spec.api_key.get_secret_value(), map_openai_error):
            chunks = await self._get_client().chat.completions.create(
                model=spec.model_name,
                messages=[m.model_dump(exclude_none=True) for m in call.messages],
                stream=True,
                stream_options={"include_usage": True},
                extra_headers={"X-Request-Id": call.request_id},
                **call.params.model_dump(exclude_none=True),
            )
            finish, usage = None, Usage()
            try:
                async for chunk in chunks:
                    if chunk.usage:
                        usage = usage_of(chunk.usage)
                    events, chunk_finish = chunk_events(chunk)
                    finish = chunk_finish or finish
                    for event in events:
                        yield event
            finally:
                await chunks.close()  # also when cancelled: the upstream stream is closed
            yield end_event(finish, usage)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()


class OpenAIProvider(Provider):
    name = "openai"
    spec_class = OpenAIDeploySpec
    params = Provider.params | {"seed", "user", "response_format", "tools", "tool_choice"}

    def create_adapter(self, spec: OpenAIDeploySpec) -> OpenAIAdapter:
        return OpenAIAdapter(spec)

    def verify_key(self, spec: OpenAIDeploySpec) -> Optional[str]:
        """``GET {base_url}/models`` (free; every OpenAI-wire server and most relays have it), no retries."""
        return verify_openai_wire_key(spec, spec.base_url or DEFAULT_BASE_URL, self.key_check_timeout, self.name)


def verify_openai_wire_key(spec: SaaSDeploySpec, base_url: str, limit: float, provider: str = "openai") -> Optional[str]:
    """The key check of any OpenAI-wire upstream, through the SDK's sync client: ``models.list``.

    The raw response is not parsed: any 2xx means the key was accepted, whatever a relay lists.
    """
    timeout = openai.Timeout(limit, connect=min(limit, 3.0))
    http_client = openai.DefaultHttpxClient(proxy=spec.proxy, timeout=timeout) if spec.proxy else None
    try:
        with openai.OpenAI(api_key=spec.api_key.get_secret_value(), base_url=base_url, max_retries=0,
                           timeout=timeout, http_client=http_client) as client:
            client.models.with_raw_response.list()
    except Exception as exc:  # noqa: BLE001 - every SDK failure is judged below
        return judge_key_check(map_openai_error(exc), base_url, provider)
    return None
