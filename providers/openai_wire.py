"""Every OpenAI-wire provider: one adapter on the official ``openai`` SDK, configured by an ``OpenAIWire``.

A provider that speaks OpenAI's wire (OpenAI, DeepSeek, Moonshot, Ark, Ollama, vLLM's server ...) is
a configuration, not a module: its name, default base URL, ``model_type`` values, whether a key is
required, the parameters it honours and its own error codes. The deploy spec, the adapter and the
``Provider`` come from it (``OpenAIWire.provider()``), and ``providers/__init__.py`` registers the
configuration itself (``"deepseek": "providers.openai_compatible:DEEPSEEK"``), the way Portkey builds
providers/dashscope on open-ai-base. Zhipu and Qwen keep their own SDKs and modules.

The module is deliberately not called ``openai.py``: a file of that name shadows the SDK.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from fnmatch import fnmatchcase
from functools import cached_property
from typing import Any, AsyncIterator, ClassVar, Literal, Mapping, Optional

import aiohttp
import httpx2  # the openai SDK's own HTTP library
import openai
from pydantic import AliasChoices, Field, SecretStr, field_validator

from contract.errors import TYPES, GatewayError
from contract.events import StreamEvent
from contract.calls import ChatCall, ChatResult

from .base import ChatAdapter, Provider
from .error_mapping import (CONNECTION_FAILED, MALFORMED, MESSAGES, TIMED_OUT, ErrorTable, auth_message, fixed,
                            map_by_class, reraise_as_gateway_error, retry_after_seconds, unexpected)
from .keys import judge_key_check, shown_url
from .openai_shape import ChunkReader, completion_result
from .specs import SaaSDeploySpec

#: the SDK's client refuses to be built without a key (and reads OPENAI_API_KEY from the environment
#: when given none, which must never reach another server): a keyless endpoint's client gets this
#: placeholder, and every request it makes omits the Authorization header, so the placeholder is never sent
_NO_KEY = "no-key-never-sent"
_OMIT_AUTH = {"Authorization": openai.omit}
#: the SDK adds these from OPENAI_ORG_ID / OPENAI_PROJECT_ID in the environment: OpenAI's account, for OpenAI only
_OMIT_ACCOUNT = {"OpenAI-Organization": openai.omit, "OpenAI-Project": openai.omit}


@dataclass(frozen=True, eq=False)
class OpenAIWire:
    """One OpenAI-wire provider, as configuration."""

    #: route prefix and registry name (``POST /<name>/deploy``)
    name: str
    #: Byzer-style ``model_type`` values a deploy may name (``saas/deepseek``)
    model_types: tuple[str, ...]
    #: where the provider answers when the deploy gives no ``base_url``; None: ``base_url`` is required
    default_base_url: Optional[str] = None
    #: the usual base URL, said when a required ``base_url`` is missing (a local server's usual port)
    base_url_example: Optional[str] = None
    #: ``required``: a deploy without ``api_key`` is refused; ``optional``: without one, no Authorization is sent
    key: Literal["required", "optional"] = "required"
    #: the provider answers ``GET {base_url}/models``, so deploys check the key by default (``verify_key``)
    key_check: bool = True
    #: the sampling parameters it honours beyond ``Provider.params``
    params: frozenset = frozenset()
    #: the provider's own error codes (or error types) -> gateway types, consulted before the HTTP status;
    #: a key may be a glob (``RateLimitExceeded*``)
    error_codes: Mapping[str, str] = field(default_factory=dict)
    #: one line for humans: what it is, where its codes come from
    about: str = ""
    #: send the OpenAI account headers the SDK reads from the environment (OpenAI itself only)
    account_headers: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(set(self.error_codes.values()) - set(TYPES))
        if unknown or self.key not in ("required", "optional"):
            raise ValueError(f"{self.name}: unknown error types {unknown} or key policy {self.key!r}")

    def __getstate__(self) -> dict:  # only the configuration travels to a replica, not what is built from it
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @cached_property
    def spec_class(self) -> type["WireDeploySpec"]:
        base = WireDeploySpec if self.key == "required" else OptionalKeyWireDeploySpec
        title = "".join(part.capitalize() for part in self.name.split("_"))
        namespace: dict[str, Any] = {"__module__": __name__, "__qualname__": f"{title}DeploySpec",
                                     "__doc__": self.about or None, "WIRE": self, "MODEL_TYPES": self.model_types}
        if not self.key_check:
            namespace.update(__annotations__={"verify_key": bool}, verify_key=False)
        # (not a module attribute: Ray's cloudpickle ships it by value to the replica, which imports only
        # this module and could not find a class made from another module's configuration by name)
        return type(f"{title}DeploySpec", (base,), namespace)

    def headers(self, key: str) -> dict[str, Any]:
        """Headers every request of an endpoint with ``key`` sets or omits (``openai.omit``)."""
        return {**({} if key else _OMIT_AUTH), **({} if self.account_headers else _OMIT_ACCOUNT)}

    @cached_property
    def errors(self) -> ErrorTable:
        return error_table(self.error_codes)

    def provider(self) -> "OpenAIWireProvider":
        return OpenAIWireProvider(self)


# -- errors -------------------------------------------------------------------------


def _kind(codes: Mapping[str, str], status: Optional[int], *names: Optional[str]) -> str:
    """The provider's code or error type first (exact, then globs), then the HTTP status."""
    names = tuple(n for n in names if n)
    for name in names:
        if name in codes:
            return codes[name]
    for pattern, kind in codes.items():
        if "*" in pattern and any(fnmatchcase(name, pattern) for name in names):
            return kind
    if status is None:  # an error event inside a stream, without a code we know
        return "upstream_error"
    if status in (401, 403):
        return "upstream_auth"
    if status == 402:
        return "upstream_quota"
    if status == 429:
        return "upstream_rate_limited"
    if status == 408:
        return "upstream_timeout"
    return "upstream_bad_request" if 400 <= status < 500 else "upstream_error"


def _answered(codes: Mapping[str, str]):
    """The mapper of an error the provider answered: an HTTP error status, or an error event in a stream."""

    def mapper(exc: openai.APIError) -> GatewayError:
        status = getattr(exc, "status_code", None)
        body = exc.body if isinstance(exc.body, dict) else {}
        code = str(exc.code or body.get("code") or body.get("type") or "") or None
        kind = _kind(codes, status, exc.code or (str(body["code"]) if body.get("code") is not None else None),
                     body.get("type") if isinstance(body.get("type"), str) else None)
        said = body.get("message") or (f"the provider answered HTTP {status}" if status else exc.message)
        text = f"{MESSAGES[kind]}: {said}"
        details: dict[str, Any] = dict(provider_code=code, provider_request_id=getattr(exc, "request_id", None),
                                       upstream_status=status)
        if kind == "upstream_rate_limited" and getattr(exc, "response", None) is not None:
            details["retry_after"] = retry_after_seconds(exc.response.headers)
        return GatewayError(kind, auth_message(text) if kind == "upstream_auth" else text, **details)

    return mapper


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


def _timeout(exc: BaseException) -> GatewayError:
    return CONNECTION_FAILED(exc) if _refused(exc) else TIMED_OUT(exc)


def error_table(codes: Mapping[str, str]) -> ErrorTable:
    """Every public exception class of the pinned ``openai`` SDK, with ``codes`` read by the status mapper."""
    answered = _answered(codes)
    return {
        # the SDK's root: raised bare by the client's constructor (no key) and by helpers we do not call
        openai.OpenAIError: unexpected,
        # raised bare for an error event inside a stream (``data: {"error": {...}}``): its code still counts
        openai.APIError: answered,
        # an HTTP error answer; the SDK picks the subclass by status, the mapper reads the code first
        openai.APIStatusError: answered,
        openai.BadRequestError: answered,
        openai.AuthenticationError: answered,
        openai.OAuthError: answered,  # (a 401 of OAuth token exchanges)
        openai.PermissionDeniedError: answered,
        openai.NotFoundError: answered,
        openai.ConflictError: answered,
        openai.UnprocessableEntityError: answered,
        openai.RateLimitError: answered,
        openai.InternalServerError: answered,
        openai.APIConnectionError: CONNECTION_FAILED,
        openai.APITimeoutError: _timeout,
        openai.APIResponseValidationError: MALFORMED,
        # ``.parse()`` helpers only (not called here); what they would mean
        openai.LengthFinishReasonError: fixed("upstream_bad_request",
                                              "the answer hit its length limit before it was complete: raise max_tokens"),
        openai.ContentFilterFinishReasonError: fixed("content_filter", "the provider's content filter stopped the answer"),
        # webhooks and the Realtime API's websockets: not used by a chat endpoint
        openai.InvalidWebhookSignatureError: unexpected,
        openai.WebSocketConnectionClosedError: unexpected,
        openai.WebSocketQueueFullError: unexpected,
        # ``response.json()`` of a body that is not JSON
        ValueError: MALFORMED,
    }


# -- the deploy spec ------------------------------------------------------------------
class WireDeploySpec(SaaSDeploySpec):
    """A deploy of an OpenAI-wire provider (``OpenAIWire.spec_class`` makes one per configuration)."""

    WIRE: ClassVar[OpenAIWire]

    base_url: Optional[str] = Field(None, validation_alias=AliasChoices("base_url", "http_proxy"), validate_default=True)

    @field_validator("base_url")
    @classmethod
    def _base_url_given(cls, value: Optional[str]) -> Optional[str]:
        wire = cls.WIRE
        if value is None and wire.default_base_url is None:
            example = f", e.g. {wire.base_url_example}" if wire.base_url_example else ""
            raise ValueError(f"the {wire.name} server's OpenAI URL is required, as every node of the cluster reaches "
                             f"it{example} (localhost would be each replica's own node)")
        return value

    def base(self) -> str:
        """The base URL calls go to."""
        return self.base_url or self.WIRE.default_base_url


class OptionalKeyWireDeploySpec(WireDeploySpec):
    """A server that may run without a key (Ollama, vLLM, ...): without ``api_key``, no Authorization is sent."""

    api_key: SecretStr = Field(SecretStr(""), max_length=512)

    def public(self) -> dict[str, Any]:
        out = super().public()
        if not self.api_key.get_secret_value():
            out["key_fingerprint"] = None
        return out


# -- the adapter ------------------------------------------------------------------------
class OpenAIWireAdapter(ChatAdapter):
    """Calls one OpenAI-wire upstream through the SDK's async client; errors named after ``name``."""

    def __init__(self, spec: WireDeploySpec, wire: Optional[OpenAIWire] = None, name: Optional[str] = None) -> None:
        self._spec = spec
        self._wire = wire or type(spec).WIRE
        self._name = name or self._wire.name
        self._key = spec.api_key.get_secret_value()
        self._auth = self._wire.headers(self._key)
        self._client: Optional[openai.AsyncOpenAI] = None

    def _get_client(self) -> openai.AsyncOpenAI:
        # Built on first use, inside the replica's event loop (aiohttp wants one).
        if self._client is None:
            spec = self._spec
            self._client = openai.AsyncOpenAI(
                api_key=self._key or _NO_KEY,
                base_url=spec.base(),
                max_retries=0,  # the gateway owns retries
                timeout=openai.Timeout(spec.timeout, connect=min(spec.timeout, 10.0)),
                http_client=openai.DefaultAioHttpClient(proxy=spec.proxy) if spec.proxy else openai.DefaultAioHttpClient(),
                default_headers=self._auth or None,
            )
        return self._client

    def _errors(self):
        return reraise_as_gateway_error(self._name, self._key, lambda exc: map_by_class(exc, self._wire.errors))

    async def chat(self, call: ChatCall) -> ChatResult:
        spec = self._spec
        body = {"model": spec.model_name, "messages": [m.model_dump(exclude_none=True) for m in call.messages],
                **call.params.model_dump(exclude_none=True)}
        started = time.perf_counter()
        with self._errors():
            # The SDK's documented raw request ("undocumented endpoints": ``client.post``): the same
            # auth, timeouts and typed errors as ``chat.completions.create``, without building typed
            # request and response objects, which cost the replica ~0.5 ms of CPU a call.
            response = await self._get_client().post(
                "/chat/completions", cast_to=httpx2.Response, body=body,
                options={"headers": {"X-Request-Id": call.request_id, **self._auth}},
            )
            result = completion_result(response.json(), response.headers.get("x-request-id"))
            result.upstream_ms = (time.perf_counter() - started) * 1000
            return result

    async def stream(self, call: ChatCall) -> AsyncIterator[StreamEvent]:
        spec = self._spec
        with self._errors():
            chunks = await self._get_client().chat.completions.create(
                model=spec.model_name,
                messages=[m.model_dump(exclude_none=True) for m in call.messages],
                stream=True,
                stream_options={"include_usage": True},
                extra_headers={"X-Request-Id": call.request_id, **self._auth},
                **call.params.model_dump(exclude_none=True),
            )
            reader = ChunkReader()
            try:
                async for chunk in chunks:
                    for event in reader.events(chunk):
                        yield event
            finally:
                await chunks.close()  # also when cancelled: the upstream stream is closed
            yield reader.end()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()


# -- the provider -------------------------------------------------------------------------
class OpenAIWireProvider(Provider):
    """A configured OpenAI-wire provider. ``OpenAIWire.provider()`` makes one; a subclass may instead set
    ``wire``, ``name``, ``spec_class`` and ``params`` as class attributes (``OpenAIProvider``)."""

    wire: OpenAIWire

    def __init__(self, wire: Optional[OpenAIWire] = None) -> None:
        if wire is not None:
            self.wire, self.name, self.spec_class = wire, wire.name, wire.spec_class
            self.params = Provider.params | wire.params

    def create_adapter(self, spec: WireDeploySpec) -> OpenAIWireAdapter:
        return OpenAIWireAdapter(spec, self.wire, self.name)

    def verify_key(self, spec: WireDeploySpec) -> Optional[str]:
        """``GET {base_url}/models`` (free; every OpenAI-wire server and most relays have it), no retries."""
        return verify_openai_wire_key(spec, spec.base(), self.key_check_timeout, self.name, self.wire.errors)


def verify_openai_wire_key(spec: SaaSDeploySpec, base_url: str, limit: float, provider: str,
                           errors: ErrorTable) -> Optional[str]:
    """The key check of any OpenAI-wire upstream, through the SDK's sync client: ``models.list``.

    The raw response is not parsed: any 2xx means the key was accepted, whatever a relay lists.
    Without a key (a local server), it checks that the server answers the route without one.
    """
    key = spec.api_key.get_secret_value()
    auth = spec.WIRE.headers(key)
    timeout = openai.Timeout(limit, connect=min(limit, 3.0))
    http_client = openai.DefaultHttpxClient(proxy=spec.proxy, timeout=timeout) if spec.proxy else None
    try:
        with openai.OpenAI(api_key=key or _NO_KEY, base_url=base_url, max_retries=0, timeout=timeout,
                           http_client=http_client, default_headers=auth or None) as client:
            client.models.with_raw_response.list(extra_headers=auth or None)
    except Exception as exc:  # noqa: BLE001 - every SDK failure is judged below
        err = map_by_class(exc, errors)
        if not key and err.info.upstream_status == 401:
            raise GatewayError("invalid_key", f"{shown_url(base_url)} asks for a key (HTTP 401): deploy with the "
                                              f"server's api_key", provider=provider, upstream_status=401,
                               fields=["api_key"]) from None
        return judge_key_check(err, base_url, provider)
    return None
