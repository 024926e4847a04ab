"""Zhipu (GLM) through the official ``zhipuai`` SDK.

The SDK is synchronous: calls run on a thread pool of the replica's own, so the event
loop keeps serving other calls. Its own retries (3, ignoring Retry-After) are off.

Parameters at the edges: Zhipu samples with temperature in (0, 1) and top_p in (0, 1).
The gateway caps temperature at 1 and the SDK then sends 0.99; temperature 0 means
greedy decoding (the SDK sends ``temperature: 0.01, do_sample: false``); top_p 1 is sent
as 0.99 by the SDK.
"""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Optional

import httpx
import zhipuai
from pydantic import field_validator

from contract.errors import GatewayError
from contract.events import StreamEvent
from contract.calls import ChatCall, ChatResult

from .base import ChatAdapter, Provider
from .error_mapping import (CONNECTION_FAILED, MALFORMED, MESSAGES, TIMED_OUT, ErrorTable, auth_message, fixed,
                            map_by_class, reraise_as_gateway_error, retry_after_seconds, unexpected)
from .keys import judge_key_check
from .openai_shape import ChunkReader, completion_result
from .params import MAX_TOKENS, SAME, ParamMap, Wire, as_list, honoured, wire_params
from .specs import SaaSDeploySpec

DEFAULT_BASE_URL = "https://open.bigmodel.cn/api/paas/v4"

#: Zhipu business codes -> gateway types (docs.bigmodel.cn api-code)
CODE_TYPES: dict[str, str] = {
    **{str(c): "upstream_auth" for c in range(1000, 1005)},
    "1113": "upstream_quota",
    "1304": "upstream_quota",  # daily call limit: does not pass in seconds
    **{str(c): "upstream_quota" for c in range(1308, 1314)},
    "1301": "content_filter",
    "1302": "upstream_rate_limited",
    "1303": "upstream_rate_limited",
    "1305": "upstream_rate_limited",
    **{str(c): "upstream_bad_request" for c in range(1210, 1235)},
    "1261": "upstream_bad_request",
}

#: our sampling parameters -> the SDK's (``providers.params``): temperature capped at Zhipu's 1 (the SDK
#: then sends 0.99; see above), ``stop`` always a list, ``user`` as ``user_id``
ZHIPU_PARAMS: ParamMap = {
    "temperature": Wire(at_most=1.0), "top_p": SAME, **MAX_TOKENS, "stop": Wire(transform=as_list),
    "user": Wire("user_id"), "seed": SAME, "response_format": SAME, "tools": SAME, "tool_choice": SAME,
}

class ZhipuDeploySpec(SaaSDeploySpec):
    MODEL_TYPES = ("saas/zhipu",)

    @field_validator("api_key")
    @classmethod
    def _id_dot_secret(cls, value):
        key = value.get_secret_value()
        ident, dot, secret = key.partition(".")
        if not (ident and dot and secret) or "." in secret:
            raise ValueError("a Zhipu key has the form id.secret")
        return value


def _business_error(exc: zhipuai.APIStatusError) -> tuple[Optional[str], str, Optional[list]]:
    try:
        body = exc.response.json()
    except ValueError:
        return None, "", None
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None, "", None
    return (str(error["code"]) if error.get("code") is not None else None), str(error.get("message") or ""), body.get("contentFilter")


def _status_error(exc: zhipuai.APIStatusError) -> GatewayError:
    """An HTTP error answer: Zhipu's business code first (``CODE_TYPES``), then the HTTP status."""
    status = exc.status_code
    code, message, content_filter = _business_error(exc)
    if code in CODE_TYPES:
        kind = CODE_TYPES[code]
    elif code is None and status in (401, 403):
        kind = "upstream_auth"
    elif code is None and status == 429:
        kind = "upstream_rate_limited"
    elif code is None and 400 <= status < 500:
        kind = "upstream_bad_request"
    else:
        kind = "upstream_error"  # unknown codes, 5xx: the code is kept
    details: dict[str, Any] = dict(
        provider_code=code,
        upstream_status=status,
        provider_request_id=exc.response.headers.get("x-request-id") or exc.response.headers.get("request-id"),
    )
    if kind == "upstream_rate_limited":
        details["retry_after"] = retry_after_seconds(exc.response.headers)
    text = MESSAGES[kind] + (f": {message}" if message else f" (HTTP {status})")
    if content_filter:
        text += f" (content filter: {content_filter})"
    if kind == "upstream_auth":
        text = auth_message(text)
    return GatewayError(kind, text, **details)


#: every exception class the pinned ``zhipuai`` exports, and what the SDK's transport lets through;
#: the most specific class of an exception wins (``map_by_class``)
ZHIPU_ERRORS: ErrorTable = {
    # the SDK's root: raised bare only by the client's constructor (no key given)
    zhipuai.ZhipuAIError: unexpected,
    # an HTTP error answer; the SDK picks the subclass by status (400, 401, 429, 500, 503, other),
    # the mapper reads the business code in the body, which says more than the status
    zhipuai.APIStatusError: _status_error,
    zhipuai.APIRequestFailedError: _status_error,
    zhipuai.APIAuthenticationError: _status_error,
    zhipuai.APIReachLimitError: _status_error,
    zhipuai.APIInternalError: _status_error,
    zhipuai.APIServerFlowExceedError: _status_error,
    # no answer, or not the answer expected
    zhipuai.APIResponseError: unexpected,  # the root of the three below; never raised bare
    zhipuai.APIResponseValidationError: MALFORMED,
    zhipuai.APIConnectionError: CONNECTION_FAILED,
    zhipuai.APITimeoutError: TIMED_OUT,  # a subclass of APIConnectionError: its own entry wins
    # outside the SDK's classes
    httpx.TransportError: fixed("upstream_error", "the connection to the provider broke"),  # e.g. a stream cut half-way
    ValueError: MALFORMED,
}


def map_zhipu_error(exc: BaseException) -> GatewayError:
    return map_by_class(exc, ZHIPU_ERRORS)


class ZhipuAdapter(ChatAdapter):
    def __init__(self, spec: ZhipuDeploySpec, threads: int = 64) -> None:
        self._spec = spec
        self._threads = threads
        self._pool: Optional[ThreadPoolExecutor] = None
        self._client: Optional[zhipuai.ZhipuAI] = None

    def _get_client(self) -> zhipuai.ZhipuAI:
        if self._client is None:
            spec = self._spec
            timeout = httpx.Timeout(spec.timeout, connect=min(spec.timeout, 10.0))
            self._client = zhipuai.ZhipuAI(
                api_key=spec.api_key.get_secret_value(),
                base_url=spec.base_url or DEFAULT_BASE_URL,
                max_retries=0,  # the gateway owns retries
                timeout=timeout,
                http_client=httpx.Client(proxy=spec.proxy, timeout=timeout) if spec.proxy else None,
            )
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="zhipu")
        return self._client

    def _request(self, call: ChatCall) -> dict[str, Any]:
        return {
            "model": self._spec.model_name,
            "messages": [m.model_dump(exclude_none=True) for m in call.messages],
            "request_id": call.request_id,
            **wire_params(call.params, ZHIPU_PARAMS),
        }

    async def chat(self, call: ChatCall) -> ChatResult:
        client = self._get_client()
        kwargs = self._request(call)
        started = time.perf_counter()
        with reraise_as_gateway_error("zhipu", self._spec.api_key.get_secret_value(), map_zhipu_error):
            loop = asyncio.get_running_loop()
            completion = await loop.run_in_executor(self._pool, lambda: client.chat.completions.create(**kwargs))
            result = completion_result(completion.model_dump(exclude_none=True), completion.request_id or completion.id)
            result.upstream_ms = (time.perf_counter() - started) * 1000
            return result

    async def stream(self, call: ChatCall) -> AsyncIterator[StreamEvent]:
        """The SDK's stream is a blocking iterator: a pool thread pumps it into a queue."""
        client = self._get_client()
        kwargs = {**self._request(call), "stream": True}
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def pump() -> None:
            response = None
            try:
                response = client.chat.completions.create(**kwargs)
                for chunk in response:
                    if stop.is_set():
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, ("chunk", chunk))
                loop.call_soon_threadsafe(queue.put_nowait, ("end", None))
            except Exception as exc:  # noqa: BLE001 - handed to the event loop as a value
                loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))
            finally:
                if response is not None:
                    response.response.close()  # frees the upstream connection, also when abandoned

        with reraise_as_gateway_error("zhipu", self._spec.api_key.get_secret_value(), map_zhipu_error):
            loop.run_in_executor(self._pool, pump)
            reader = ChunkReader()
            try:
                while True:
                    kind, item = await queue.get()
                    if kind == "error":
                        raise item
                    if kind == "end":
                        break
                    for event in reader.events(item):
                        yield event
            finally:
                stop.set()
            yield reader.end()

    async def aclose(self) -> None:
        if self._client is not None:
            self._client.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)


class ZhipuProvider(Provider):
    """Zhipu's GLM models with the user's ``id.secret`` key; parameters go as ``ZHIPU_PARAMS`` says."""

    name = "zhipu"
    spec_class = ZhipuDeploySpec
    params = honoured(ZHIPU_PARAMS)

    def verify_key(self, spec: ZhipuDeploySpec) -> Optional[str]:
        """``GET {base_url}/models`` (Zhipu's free, OpenAI-shaped model list) through the SDK's own client.

        The zhipuai SDK has no models resource; its generic ``get`` sends the same auth as chat.
        """
        base_url = spec.base_url or DEFAULT_BASE_URL
        limit = self.key_check_timeout
        timeout = httpx.Timeout(limit, connect=min(limit, 3.0))
        client = zhipuai.ZhipuAI(
            api_key=spec.api_key.get_secret_value(), base_url=base_url, max_retries=0, timeout=timeout,
            http_client=httpx.Client(proxy=spec.proxy, timeout=timeout) if spec.proxy else None,
        )
        try:
            client.get("/models", cast_type=httpx.Response)
        except Exception as exc:  # noqa: BLE001 - every SDK failure is judged below
            return judge_key_check(map_zhipu_error(exc), base_url, self.name)
        finally:
            client.close()
        return None

    def create_adapter(self, spec: ZhipuDeploySpec) -> ZhipuAdapter:
        return ZhipuAdapter(spec)
