"""Qwen through Alibaba's official ``dashscope`` SDK (``AioGeneration``, ``result_format="message"``).

The key and the base URL go with every call (``api_key=``, ``base_address=``), never
into the SDK's module globals, so endpoints in one process cannot leak into each other.
DashScope answers errors as values (``status_code``, ``code``), not exceptions; both are
mapped here. Temperature is in [0, 2) on DashScope: 2 is sent as 1.99.
"""
from __future__ import annotations

import asyncio
import math
import time
from typing import Any, AsyncIterator, Optional

import aiohttp
import dashscope
import requests  # the dashscope SDK's sync HTTP library
from dashscope.common import error as dashscope_errors
from pydantic import field_validator

from contract.errors import GatewayError
from contract.events import Delta, StreamEvent, ToolCallDelta
from contract.calls import ChatCall, ChatResult, Usage

from .base import ChatAdapter, Provider
from .error_mapping import (MALFORMED, MESSAGES, TIMED_OUT, ErrorTable, auth_message, fixed, map_by_class,
                            reraise_as_gateway_error, unexpected)
from .keys import judge_key_check
from .openai_shape import end_event
from .params import MAX_TOKENS, SAME, ParamMap, Wire, as_list, honoured, wire_params
from .specs import SaaSDeploySpec

DEFAULT_BASE_URL = "https://dashscope.aliyuncs.com/api/v1"

QUOTA_CODES = {"Arrearage", "PrepaidBillOverdue", "PostpaidBillOverdue", "CommodityNotPurchased"}

#: our sampling parameters -> the SDK's (``providers.params``): temperature below DashScope's 2 (2 is sent
#: as 1.99), ``stop`` always a list; no ``user``: a call that gives one is refused (``check_call``)
QWEN_PARAMS: ParamMap = {
    "temperature": Wire(at_most=1.99), "top_p": SAME, **MAX_TOKENS, "stop": Wire(transform=as_list),
    "seed": SAME, "response_format": SAME, "tools": SAME, "tool_choice": SAME,
}

class QwenDeploySpec(SaaSDeploySpec):
    MODEL_TYPES = ("saas/qwen", "saas/qianwen", "saas/dashscope")

    @field_validator("proxy")
    @classmethod
    def _no_proxy(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            raise ValueError(
                "the dashscope SDK cannot take a proxy per endpoint; set HTTPS_PROXY in the cluster's environment instead"
            )
        return value


def classify(code: str, status: int) -> str:
    """A DashScope error code (and HTTP status) -> the gateway's error type."""
    if code == "InvalidApiKey" or code.startswith("AccessDenied"):
        return "upstream_auth"
    if code in QUOTA_CODES:
        return "upstream_quota"
    if code == "Throttling" or code.startswith("Throttling.") or code == "LimitRequests":
        return "upstream_rate_limited"
    if code.startswith("DataInspectionFailed") or code == "data_inspection_failed":
        return "content_filter"
    if code.startswith("InvalidParameter") or code == "ModelNotFound":
        return "upstream_bad_request"
    if code == "RequestTimeOut":
        return "upstream_timeout"
    return "upstream_error"  # InternalError*, SystemError, ModelUnavailable, 5xx and unknown codes


def _coded_error(code: Optional[str], status: Optional[int], message: str, request_id: Optional[str]) -> GatewayError:
    """An error DashScope described with its code (and HTTP status), as a value or in an exception."""
    kind = classify(code or "", status or 0)
    text = MESSAGES[kind] + (f": {message}" if message else (f" (HTTP {status})" if status is not None else ""))
    return GatewayError(
        kind,
        text if kind != "upstream_auth" else auth_message(text),
        provider_code=code,
        provider_request_id=request_id or None,
        upstream_status=status,
    )


def error_from_response(resp: Any) -> GatewayError:
    """A non-200 ``DashScopeAPIResponse`` (DashScope answers errors as values)."""
    return _coded_error(str(resp.code or "") or None, int(resp.status_code), str(resp.message or ""), resp.request_id)


def _request_failure(exc: BaseException) -> GatewayError:
    """``RequestFailure`` (the SDK's websocket calls): the server's error name, HTTP code and message."""
    status = getattr(exc, "http_code", None)
    try:
        status = int(status) if status is not None else None
    except (TypeError, ValueError):
        status = None
    return _coded_error(str(getattr(exc, "name", None) or "") or None, status,
                        str(getattr(exc, "message", None) or ""), getattr(exc, "request_id", None))


def _assistant_error(exc: BaseException) -> GatewayError:
    """``AssistantError`` (the assistants API): the server's code, message and request id, no status."""
    return _coded_error(str(getattr(exc, "code", None) or "") or None, None,
                        str(getattr(exc, "message", None) or ""), getattr(exc, "request_id", None))


def _sdk_refused(exc: BaseException) -> GatewayError:
    """The SDK refused the request before sending it (what it says is in its class's name)."""
    return GatewayError("upstream_bad_request", f"the provider's SDK refused the request ({type(exc).__name__})")


def _sdk_cannot(exc: BaseException) -> GatewayError:
    """The SDK cannot make this kind of call at all (protocol, HTTP method): another endpoint may."""
    return GatewayError("upstream_error", f"the provider's SDK cannot make this call ({type(exc).__name__})")


def _unreachable(exc: BaseException) -> GatewayError:
    return GatewayError("upstream_error", f"could not reach the provider ({type(exc).__name__})")


_E = dashscope_errors
#: every exception class of the pinned ``dashscope`` (``dashscope.common.error``; it exports none at
#: top level) and what its transports (aiohttp for chat, requests for ``verify_key``) let through;
#: the most specific class of an exception wins (``map_by_class``). Most of DashScope's errors come
#: as values instead (``error_from_response``).
DASHSCOPE_ERRORS: ErrorTable = {
    # the SDK's root: never raised bare
    _E.DashScopeException: unexpected,
    # no key reached the SDK (it looked in its globals, the environment and ~/.dashscope)
    _E.AuthenticationError: fixed("upstream_auth", auth_message("the provider's SDK found no key for the endpoint")),
    # the server's error, raised rather than answered (websocket calls, assistants): its code decides
    _E.RequestFailure: _request_failure,
    _E.AssistantError: _assistant_error,
    # the SDK checked the request before sending it and refused it
    _E.InvalidParameter: _sdk_refused,
    _E.InvalidInput: _sdk_refused,
    _E.InvalidModel: _sdk_refused,
    _E.InvalidTask: _sdk_refused,
    _E.InvalidFileFormat: _sdk_refused,
    _E.ModelRequired: _sdk_refused,
    _E.InputRequired: _sdk_refused,
    _E.InputDataRequired: _sdk_refused,
    _E.UnsupportedModel: _sdk_refused,
    _E.UnsupportedTask: _sdk_refused,
    _E.UnsupportedData: _sdk_refused,
    _E.UnsupportedDataType: _sdk_refused,
    _E.MultiInputsWithBinaryNotSupported: _sdk_refused,
    # the SDK cannot make such a call (the gateway's use of it, not the caller's request)
    _E.UnsupportedApiProtocol: _sdk_cannot,
    _E.UnsupportedHTTPMethod: _sdk_cannot,
    _E.NotImplemented: _sdk_cannot,
    # the provider's side
    _E.ServiceUnavailableError: fixed("upstream_error", "the provider failed (service unavailable)"),
    _E.AsyncTaskCreateFailed: fixed("upstream_error", "the provider failed (it could not create the task)"),
    _E.UploadFileException: fixed("upstream_error", "the provider failed (a file upload failed)"),
    _E.TimeoutException: TIMED_OUT,
    _E.UnexpectedMessageReceived: MALFORMED,
    _E.UnknownMessageReceived: MALFORMED,
    # the chat transport (aiohttp) and the call's own deadline (asyncio.wait_for)
    asyncio.TimeoutError: TIMED_OUT,
    aiohttp.ServerTimeoutError: TIMED_OUT,  # also a ClientError: its own entry wins
    aiohttp.ClientError: _unreachable,
    # the key check's transport (requests)
    requests.Timeout: TIMED_OUT,
    requests.ConnectTimeout: TIMED_OUT,  # also a requests.ConnectionError: its own entry wins
    requests.ConnectionError: fixed("upstream_error", "could not reach the provider (connection failed)"),
    # an answer not in the shape expected
    ValueError: MALFORMED,
    KeyError: MALFORMED,
    TypeError: MALFORMED,
    AttributeError: MALFORMED,
}


def map_dashscope_error(exc: BaseException) -> GatewayError:
    return map_by_class(exc, DASHSCOPE_ERRORS)


def _tool_call(tc: Any) -> dict:
    """DashScope's tool call (it adds ``index``) in OpenAI's shape."""
    fn = dict(tc.get("function") or {})
    return {"id": tc.get("id"), "type": tc.get("type") or "function",
            "function": {"name": fn.get("name"), "arguments": fn.get("arguments") or ""}}


class QwenAdapter(ChatAdapter):
    def __init__(self, spec: QwenDeploySpec) -> None:
        self._spec = spec

    def _request(self, call: ChatCall) -> dict[str, Any]:
        spec = self._spec
        return {
            "model": spec.model_name,
            "messages": [m.model_dump(exclude_none=True) for m in call.messages],
            "result_format": "message",
            "api_key": spec.api_key.get_secret_value(),
            "base_address": spec.base_url or DEFAULT_BASE_URL,
            "request_timeout": max(1, math.ceil(spec.timeout)),
            "headers": {"X-Request-Id": call.request_id},
            **wire_params(call.params, QWEN_PARAMS),
        }

    async def chat(self, call: ChatCall) -> ChatResult:
        started = time.perf_counter()
        with reraise_as_gateway_error("qwen", self._spec.api_key.get_secret_value(), map_dashscope_error):
            resp = await asyncio.wait_for(dashscope.AioGeneration.call(**self._request(call)), self._spec.timeout + 1)
            if int(resp.status_code) != 200:
                raise error_from_response(resp)
            choices = (resp.output or {}).get("choices") or []
            if not choices:
                raise GatewayError("upstream_error", "the provider answered without choices")
            choice = choices[0]
            usage = resp.usage or {}
            prompt, completion = int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)
            message = choice.get("message") or {}
            return ChatResult(
                output=message.get("content") or "",
                tool_calls=[_tool_call(tc) for tc in message.get("tool_calls") or []] or None,
                finish_reason=choice.get("finish_reason"),
                usage=Usage(prompt_tokens=prompt, completion_tokens=completion,
                            total_tokens=int(usage.get("total_tokens") or prompt + completion)),
                provider_request_id=resp.request_id or None,
                upstream_ms=(time.perf_counter() - started) * 1000,
            )


    async def stream(self, call: ChatCall) -> AsyncIterator[StreamEvent]:
        with reraise_as_gateway_error("qwen", self._spec.api_key.get_secret_value(), map_dashscope_error):
            responses = await dashscope.AioGeneration.call(**self._request(call), stream=True, incremental_output=True)
            finish, usage = None, Usage()
            try:
                async for resp in responses:
                    if int(resp.status_code) != 200:
                        raise error_from_response(resp)
                    for choice in (resp.output or {}).get("choices") or []:
                        text = (choice.get("message") or {}).get("content")
                        if text:
                            yield Delta(text)
                        if (choice.get("message") or {}).get("tool_calls"):
                            yield ToolCallDelta([dict(tc) for tc in choice["message"]["tool_calls"]])
                        if choice.get("finish_reason") not in (None, "null"):
                            finish = choice["finish_reason"]
                    if resp.usage:
                        p, c = int(resp.usage.get("input_tokens") or 0), int(resp.usage.get("output_tokens") or 0)
                        usage = Usage(prompt_tokens=p, completion_tokens=c, total_tokens=int(resp.usage.get("total_tokens") or p + c))
            finally:
                await responses.aclose()
            yield end_event(finish, usage)


class QwenProvider(Provider):
    """Qwen through DashScope's native API with the user's key; parameters go as ``QWEN_PARAMS`` says."""

    name = "qwen"
    spec_class = QwenDeploySpec
    params = honoured(QWEN_PARAMS)

    def verify_key(self, spec: QwenDeploySpec) -> Optional[str]:
        """``GET {base_url}/models?page_no=1&page_size=1`` through the SDK (``dashscope.Models.list``): free.

        The native API's model list, on the same base URL as the endpoint's calls (the SDK's
        sync ``requests`` client; DashScope answers errors as values, not exceptions).
        """
        base_url = spec.base_url or DEFAULT_BASE_URL
        try:
            resp = dashscope.Models.list(page=1, page_size=1, api_key=spec.api_key.get_secret_value(),
                                         base_address=base_url, request_timeout=self.key_check_timeout)
        except Exception as exc:  # noqa: BLE001 - every SDK failure is judged below
            return judge_key_check(map_dashscope_error(exc), base_url, self.name)
        if int(resp.status_code) != 200:
            return judge_key_check(error_from_response(resp), base_url, self.name)
        return None

    def create_adapter(self, spec: QwenDeploySpec) -> QwenAdapter:
        return QwenAdapter(spec)
