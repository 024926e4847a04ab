"""Every exception class of each pinned provider SDK has its own entry in the provider's table.

Modelled on httpx's ``test_httpcore_all_exceptions_mapped``: an SDK upgrade that adds an exception
class fails here, naming it, instead of the class falling through ``map_by_class`` to a guess.
Then each class is built the way the SDK builds it and mapped, and the results that matter are
spot-checked. Pure: no Ray, no network.
"""
from __future__ import annotations

import inspect
import types
from types import SimpleNamespace
from typing import Any, Callable, NamedTuple, Optional

import aiohttp
import dashscope.common.error as dashscope_errors
import httpx
import httpx2
import openai
import pytest
import zhipuai

import providers.openai_provider as module

from contract.errors import TYPES, GatewayError
from providers.error_mapping import map_by_class, reraise_as_gateway_error
from providers.qwen_provider import DASHSCOPE_ERRORS, classify, error_from_response, map_dashscope_error
from providers.zhipu_provider import ZHIPU_ERRORS, map_zhipu_error

URL = "https://x/v1/chat/completions"

#: classes a chat call (or a key check) can never meet, left out of an SDK's table on purpose,
#: by SDK: each one with the reason. Prefer an entry (upstream_error) to a line here.
EXCLUDED: dict[str, dict[str, str]] = {
    "zhipuai": {},
    "dashscope": {},
    "openai": {},
}


def exception_classes(namespace: Any) -> set[type]:
    """The public exception classes a module (or namespace) holds: no ``_`` names."""
    found = set()
    for name in dir(namespace):  # dir, not vars: an SDK may resolve names lazily (and add to vars while doing so)
        obj = getattr(namespace, name, None)
        if not name.startswith("_") and isinstance(obj, type) and issubclass(obj, BaseException):
            found.add(obj)
    return found


class Sdk(NamedTuple):
    name: str
    classes: set[type]
    table: Any
    mapper: Callable[[BaseException], GatewayError]
    #: the HTTP library whose Request/Response the SDK's exceptions hold
    http: types.ModuleType


def _openai() -> Sdk:

    return Sdk("openai", exception_classes(openai), module.OPENAI_ERRORS, module.map_openai_error, httpx2)


SDKS: dict[str, Callable[[], Sdk]] = {
    "zhipuai": lambda: Sdk("zhipuai", exception_classes(zhipuai), ZHIPU_ERRORS, map_zhipu_error, httpx),
    # dashscope exports no exception at top level: its classes live in dashscope.common.error
    "dashscope": lambda: Sdk("dashscope", exception_classes(dashscope_errors), DASHSCOPE_ERRORS, map_dashscope_error, httpx),
    "openai": _openai,
}


@pytest.fixture(params=list(SDKS))
def sdk(request) -> Sdk:
    return SDKS[request.param]()


def test_the_sdks_export_what_the_tables_were_written_for():
    """A guard on the collection itself: an empty set would make the next test pass vacuously."""
    assert {c.__name__ for c in exception_classes(zhipuai)} >= {"ZhipuAIError", "APIStatusError", "APITimeoutError"}
    assert {c.__name__ for c in exception_classes(dashscope_errors)} >= {"DashScopeException", "AuthenticationError",
                                                                         "RequestFailure", "TimeoutException"}


def test_every_sdk_exception_class_has_its_own_entry(sdk):
    excluded = EXCLUDED[sdk.name]
    unmapped = sorted(c.__name__ for c in sdk.classes if c not in sdk.table and c.__name__ not in excluded)
    assert not unmapped, f"{sdk.name} exception classes without their own entry in the table: {', '.join(unmapped)}"
    stale = sorted(excluded.keys() - {c.__name__ for c in sdk.classes})
    assert not stale, f"{sdk.name}: excluded classes the SDK no longer has: {', '.join(stale)}"


# --- building each class the way its SDK does -----------------------------------------------

#: the status an SDK gives each status-bearing class (the rest get 500)
STATUS_OF = {
    "APIRequestFailedError": 400, "BadRequestError": 400, "AuthenticationError": 401, "APIAuthenticationError": 401,
    "OAuthError": 401, "PermissionDeniedError": 403, "NotFoundError": 404, "ConflictError": 409,
    "UnprocessableEntityError": 422, "APIReachLimitError": 429, "RateLimitError": 429, "APIServerFlowExceedError": 503,
    "APIStatusError": 418,
}


def build(cls: type, http: types.ModuleType, status: Optional[int] = None, body: Any = None,
          headers: Optional[dict] = None) -> BaseException:
    """An instance of ``cls``, its constructor's arguments filled by name (the SDKs' shapes differ)."""
    status = status or STATUS_OF.get(cls.__name__, 500)
    body = {"error": {"code": "x", "message": "boom"}} if body is None else body
    request = http.Request("POST", URL)
    response = http.Response(status, json=body, headers=headers or {}, request=request)
    values = {"message": "boom", "request": request, "response": response, "body": body, "json_data": body,
              "completion": SimpleNamespace(usage=None), "unsent_messages": []}
    init = cls.__init__
    if init is BaseException.__init__ or init is Exception.__init__:
        return cls("boom")
    args, kwargs = [], {}
    for name, param in list(inspect.signature(init).parameters.items())[1:]:
        if param.kind is param.VAR_POSITIONAL:
            args.append("boom")
        elif param.kind is param.VAR_KEYWORD:
            continue
        elif name in values:
            if param.kind is param.KEYWORD_ONLY:
                kwargs[name] = values[name]
            else:
                args.append(values[name])
        elif param.default is param.empty:
            raise AssertionError(f"{cls.__name__}: no value for its constructor's {name!r}; teach build() it")
    return cls(*args, **kwargs)


def test_every_sdk_exception_maps_to_a_gateway_type(sdk):
    for cls in sorted(sdk.classes, key=lambda c: c.__name__):
        if cls.__name__ in EXCLUDED[sdk.name]:
            continue
        err = sdk.mapper(build(cls, sdk.http))
        assert isinstance(err, GatewayError), cls
        assert err.type in TYPES, (cls, err.type)
        assert err.info.message, cls


# --- map_by_class ----------------------------------------------------------------------------

class Outer(Exception):
    pass


class Inner(Outer):
    pass


def test_map_by_class_the_most_specific_class_wins():
    table = {Outer: lambda exc: GatewayError("upstream_error", "outer"),
             Inner: lambda exc: GatewayError("upstream_timeout", "inner")}
    assert map_by_class(Inner(), table).info.message == "inner"
    assert map_by_class(Outer(), table).info.message == "outer"
    assert map_by_class(type("Deeper", (Inner,), {})(), table).info.message == "inner"
    # the order of the table does not matter
    assert map_by_class(Inner(), dict(reversed(list(table.items())))).info.message == "inner"


def test_map_by_class_an_unknown_exception_is_upstream_error_naming_its_class():
    class Strange(Exception):
        pass

    err = map_by_class(Strange("secret-ish text"), {ValueError: lambda exc: GatewayError("upstream_bad_request", "v")})
    assert err.type == "upstream_error" and err.info.message == "unexpected Strange while calling the provider"


# --- zhipu -----------------------------------------------------------------------------------

def zhipu_status(status: int, code: Optional[str] = None, message: str = "", headers: Optional[dict] = None,
                 **extra: Any) -> GatewayError:
    error = {"code": code, "message": message} if code is not None else None
    body = {"error": error, **extra} if error else {}
    cls = {400: zhipuai.APIRequestFailedError, 401: zhipuai.APIAuthenticationError, 429: zhipuai.APIReachLimitError,
           500: zhipuai.APIInternalError, 503: zhipuai.APIServerFlowExceedError}.get(status, zhipuai.APIStatusError)
    return map_zhipu_error(build(cls, httpx, status, body, headers))


@pytest.mark.parametrize("status, code, kind", [
    (401, "1001", "upstream_auth"),
    (400, "1113", "upstream_quota"),
    (400, "1301", "content_filter"),
    (400, "1214", "upstream_bad_request"),
    (429, "1302", "upstream_rate_limited"),
    (500, "1500", "upstream_error"),  # an unknown code: kept, never guessed from the status
    (400, "9999", "upstream_error"),
])
def test_zhipu_business_codes(status, code, kind):
    err = zhipu_status(status, code, "said the provider")
    assert err.type == kind
    assert err.info.provider_code == code and err.info.upstream_status == status
    assert "said the provider" in err.info.message


def test_zhipu_messages():
    assert zhipu_status(401, "1001", "bad key").info.message == \
        "the provider rejected the endpoint's key: bad key - deploy it again with a valid key"
    assert zhipu_status(500).info.message == "the provider failed (HTTP 500)"
    err = zhipu_status(400, "1301", "unsafe", contentFilter=[{"role": "user", "level": 1}])
    assert err.info.message == "the provider refused the content: unsafe (content filter: [{'role': 'user', 'level': 1}])"


def test_zhipu_rate_limit_keeps_retry_after_and_request_id():
    err = zhipu_status(429, "1302", "slow down", headers={"Retry-After": "7", "x-request-id": "req-1"})
    assert err.type == "upstream_rate_limited" and err.info.retry_after == 7.0
    assert err.info.provider_request_id == "req-1"


@pytest.mark.parametrize("status, kind", [(401, "upstream_auth"), (403, "upstream_auth"), (429, "upstream_rate_limited"),
                                          (404, "upstream_bad_request"), (500, "upstream_error"), (503, "upstream_error")])
def test_zhipu_status_without_a_code(status, kind):
    err = zhipu_status(status)
    assert err.type == kind and err.info.provider_code is None and err.info.upstream_status == status


def test_zhipu_transport_errors():
    request = httpx.Request("POST", URL)
    assert map_zhipu_error(zhipuai.APITimeoutError(request)).type == "upstream_timeout"
    err = map_zhipu_error(zhipuai.APIConnectionError(request=request))
    assert (err.type, err.info.message) == ("upstream_error", "could not reach the provider (connection failed)")
    err = map_zhipu_error(httpx.RemoteProtocolError("cut", request=request))
    assert (err.type, err.info.message) == ("upstream_error", "the connection to the provider broke")
    response = httpx.Response(200, json={}, request=request)
    for exc in (zhipuai.APIResponseValidationError(response, {}), ValueError("bad json")):
        assert map_zhipu_error(exc).info.message == "the provider's answer was malformed"
    assert map_zhipu_error(zhipuai.ZhipuAIError("no key")).info.message == \
        "unexpected ZhipuAIError while calling the provider"


def test_the_key_never_reaches_the_message():
    secret = "abcdef123456.0123456789abcdefSECRET"
    with pytest.raises(GatewayError) as caught:
        with reraise_as_gateway_error("zhipu", secret, map_zhipu_error):
            body = {"error": {"code": "1001", "message": f"key {secret} is not valid"}}
            raise build(zhipuai.APIAuthenticationError, httpx, 401, body)
    err = caught.value
    assert err.type == "upstream_auth" and err.info.provider == "zhipu"
    assert secret not in err.info.message and secret not in str(err)
    assert "0123456789abcdef" not in err.info.message  # nor a long run of it
    assert "[redacted]" in err.info.message


# --- dashscope -------------------------------------------------------------------------------

@pytest.mark.parametrize("code, status, kind", [
    ("InvalidApiKey", 401, "upstream_auth"),
    ("AccessDenied.Unpurchased", 403, "upstream_auth"),
    ("Arrearage", 400, "upstream_quota"),
    ("Throttling.RateQuota", 429, "upstream_rate_limited"),
    ("Throttling", 429, "upstream_rate_limited"),
    ("DataInspectionFailed", 400, "content_filter"),
    ("InvalidParameter", 400, "upstream_bad_request"),
    ("ModelNotFound", 404, "upstream_bad_request"),
    ("RequestTimeOut", 408, "upstream_timeout"),
    ("InternalError", 500, "upstream_error"),
    ("SomethingNew", 400, "upstream_error"),
])
def test_dashscope_codes(code, status, kind):
    assert classify(code, status) == kind
    resp = SimpleNamespace(status_code=status, code=code, message="said the provider", request_id="rid-1")
    err = error_from_response(resp)
    assert err.type == kind
    assert (err.info.provider_code, err.info.upstream_status, err.info.provider_request_id) == (code, status, "rid-1")
    assert "said the provider" in err.info.message


def test_dashscope_error_values():
    resp = SimpleNamespace(status_code=401, code="InvalidApiKey", message="Invalid API-key provided.", request_id="")
    err = error_from_response(resp)
    assert err.info.message == \
        "the provider rejected the endpoint's key: Invalid API-key provided. - deploy it again with a valid key"
    assert err.info.provider_request_id is None
    err = error_from_response(SimpleNamespace(status_code=500, code="", message="", request_id=None))
    assert (err.type, err.info.message, err.info.provider_code) == ("upstream_error", "the provider failed (HTTP 500)", None)


def test_dashscope_exceptions():
    E = dashscope_errors
    assert map_dashscope_error(E.AuthenticationError("No api key provided.")).type == "upstream_auth"
    assert map_dashscope_error(E.InvalidParameter("bad")).type == "upstream_bad_request"
    assert map_dashscope_error(E.InvalidInput("bad")).type == "upstream_bad_request"
    assert map_dashscope_error(E.ModelRequired("Model is required!")).info.message == \
        "the provider's SDK refused the request (ModelRequired)"
    assert map_dashscope_error(E.TimeoutException("late")).type == "upstream_timeout"
    assert map_dashscope_error(E.ServiceUnavailableError("down")).type == "upstream_error"
    failure = E.RequestFailure(request_id="rid-2", message="slow down", name="Throttling.RateQuota", http_code=429)
    err = map_dashscope_error(failure)
    assert (err.type, err.info.provider_code, err.info.upstream_status, err.info.provider_request_id) == \
        ("upstream_rate_limited", "Throttling.RateQuota", 429, "rid-2")
    assert map_dashscope_error(E.RequestFailure()).type == "upstream_error"
    err = map_dashscope_error(E.AssistantError(message='{"code": "InvalidApiKey", "message": "no", "request_id": "r"}'))
    assert (err.type, err.info.provider_code) == ("upstream_auth", "InvalidApiKey")


def test_dashscope_transports():
    import asyncio

    import aiohttp
    import requests

    assert map_dashscope_error(asyncio.TimeoutError()).type == "upstream_timeout"
    assert map_dashscope_error(aiohttp.ServerTimeoutError()).type == "upstream_timeout"  # also a ClientError
    err = map_dashscope_error(aiohttp.ServerDisconnectedError())
    assert (err.type, err.info.message) == ("upstream_error", "could not reach the provider (ServerDisconnectedError)")
    # the key check's transport
    for exc in (requests.Timeout(), requests.ReadTimeout(), requests.ConnectTimeout()):
        assert map_dashscope_error(exc).type == "upstream_timeout", exc
    err = map_dashscope_error(requests.ConnectionError())
    assert (err.type, err.info.message) == ("upstream_error", "could not reach the provider (connection failed)")
    for exc in (ValueError(), KeyError("x"), TypeError(), AttributeError()):
        assert map_dashscope_error(exc).info.message == "the provider's answer was malformed"


# --- openai: OpenAI's own codes, and what each configuration overrides ---------------------------
def openai_status(status: int, code: Optional[str] = None, type_: Optional[str] = None, headers: Optional[dict] = None,
                  table: Any = None) -> GatewayError:
    body = {"message": "said", "type": type_, "param": None, "code": code}
    request = httpx2.Request("POST", URL)
    response = httpx2.Response(status, json={"error": body}, headers=headers or {}, request=request)
    exc = openai.OpenAI(api_key="k", base_url="https://x/v1")._make_status_error("said", body=body, response=response)
    return map_by_class(exc, table if table is not None else module.OPENAI_ERRORS)


@pytest.mark.parametrize("status, code, type_, kind", [
    (401, "invalid_api_key", "invalid_request_error", "upstream_auth"),
    (403, None, None, "upstream_auth"),
    (402, None, None, "upstream_quota"),
    (429, "insufficient_quota", "insufficient_quota", "upstream_quota"),  # a spent quota comes as a 429
    (429, "rate_limit_exceeded", "requests", "upstream_rate_limited"),
    (400, "content_policy_violation", "invalid_request_error", "content_filter"),
    (400, "invalid_value", "invalid_request_error", "upstream_bad_request"),
    (404, "model_not_found", "invalid_request_error", "upstream_bad_request"),
    (408, None, None, "upstream_timeout"),
    (500, None, "server_error", "upstream_error"),
    (503, None, None, "upstream_error"),
])
def test_openai_statuses_and_codes(status, code, type_, kind):
    err = openai_status(status, code, type_)
    assert err.type == kind and err.info.upstream_status == status
    assert err.info.provider_code == (code or type_)
    assert "said" in err.info.message
    if kind == "upstream_auth":
        assert err.info.message.endswith("deploy it again with a valid key")


def test_openai_rate_limit_keeps_the_providers_wait():
    err = openai_status(429, "rate_limit_exceeded", headers={"retry-after-ms": "1500"})
    assert err.type == "upstream_rate_limited" and err.info.retry_after == 1.5


def test_a_configurations_codes_decide_before_the_status():
    from providers.openai_compatible import ARK, MOONSHOT

    assert openai_status(429, None, "exceeded_current_quota_error", table=MOONSHOT.errors).type == "upstream_quota"
    assert openai_status(429, None, "rate_limit_reached_error", table=MOONSHOT.errors).type == "upstream_rate_limited"
    assert openai_status(403, "AccountOverdueError", table=ARK.errors).type == "upstream_quota"  # not a wrong key
    assert openai_status(400, "InputTextSensitiveContentDetected", table=ARK.errors).type == "content_filter"  # a glob
    assert openai_status(429, "insufficient_quota", table=ARK.errors).type == "upstream_rate_limited"  # OpenAI's code only counts for openai


def test_openai_transport_errors():
    request = httpx2.Request("POST", URL)
    assert module.map_openai_error(openai.APITimeoutError(request)).type == "upstream_timeout"
    assert module.map_openai_error(openai.APIConnectionError(request=request)).type == "upstream_error"
    # aiohttp reports a refused connection as a connect timeout: the table looks beneath it
    try:
        try:
            raise aiohttp.ClientConnectorError(SimpleNamespace(ssl=None, host="x", port=1), ConnectionRefusedError(111, "refused"))
        except aiohttp.ClientConnectorError as cause:
            raise openai.APITimeoutError(request) from cause
    except openai.APITimeoutError as exc:
        err = module.map_openai_error(exc)
    assert err.type == "upstream_error" and "connection failed" in err.info.message
