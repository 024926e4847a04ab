"""What a provider is: a deploy spec, an adapter, and how it maps its errors.

A provider module defines a ``Provider`` subclass and registers it in
``providers/__init__.py``. The gateway never imports a provider module directly:
it looks providers up by name, validates deploy bodies with ``spec_class``,
builds Serve options with ``replica_options`` and, inside the replica, calls
``create_adapter``. An adapter follows the engine protocol documented on
``ChatAdapter`` and raises only ``GatewayError``: its SDK's exceptions are mapped by an
exception-class table (``map_by_class``) inside ``reraise_as_gateway_error``, which
also redacts the key.
"""
from __future__ import annotations

import abc
import contextlib
import hashlib
import hmac
import json
import math
import re
from typing import Any, AsyncIterator, Callable, ClassVar, Iterator, Mapping, Optional
from urllib.parse import urlsplit

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from contract.errors import GatewayError
from contract.events import Delta, Finish, StreamEvent, ToolCallDelta
from contract.calls import ChatCall, ChatName, ChatResult, Usage


#: words of field names written as a person writes them in a title (the rest: lower case)
_TITLE_WORDS = {"api": "API", "url": "URL", "http": "HTTP", "https": "HTTPS", "gpu": "GPU", "gpus": "GPUs",
                "cpu": "CPU", "cpus": "CPUs", "id": "ID", "len": "length", "args": "arguments", "dtype": "data type"}


def field_title(name: str, _info: Any = None) -> str:
    """A field's title in its JSON schema (the console's form labels): ``api_key`` -> "API key", ``base_url`` ->
    "Base URL", ``gpus_per_worker`` -> "GPUs per worker" (pydantic's own would be "Api Key", "Base Url" ...)."""
    words = [_TITLE_WORDS.get(word, word) for word in name.strip("_").split("_") if word]
    if not words:
        return name
    return " ".join([words[0][:1].upper() + words[0][1:], *words[1:]])


class Price(BaseModel):
    """What a provider charges, in the deploy's currency per million tokens (both required: half a price
    would count the other half as free)."""

    model_config = ConfigDict(extra="forbid", frozen=True, field_title_generator=field_title)

    input_per_mtok: float = Field(ge=0, le=1e6, allow_inf_nan=False)
    output_per_mtok: float = Field(ge=0, le=1e6, allow_inf_nan=False)


class PoolKey(BaseModel):
    """One key of an endpoint's pool (``api_keys``): calls go to the usable keys by ``weight``; 0 drains it."""

    model_config = ConfigDict(extra="forbid", frozen=True, field_title_generator=field_title)

    key: SecretStr = Field(min_length=1, max_length=512)
    weight: int = Field(1, ge=0, le=100)


#: the most keys one endpoint's pool holds
MAX_POOL_KEYS = 32


class DeploySpec(BaseModel):
    """Fields every endpoint has. Unknown fields are refused (a typo must not deploy)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, field_title_generator=field_title)

    #: Byzer-style ``model_type`` values this provider accepts (e.g. ``saas/openai``)
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ()

    chat_name: ChatName
    model_name: str = Field(min_length=1, max_length=200)
    workers: int = Field(1, ge=1, le=64)
    #: the deadline of one chat call, retries included (and of each attempt)
    timeout: float = Field(60.0, gt=0, le=3600)
    #: upstream retries inside the replica (rate limits, 5xx, timeouts, broken connections)
    max_retries: int = Field(2, ge=0, le=10)
    #: other chat_names (any provider) tried in order when this one fails upstream
    fallbacks: list[ChatName] = Field(default_factory=list, max_length=8)
    model_type: Optional[str] = None
    #: how long replicas may take to start (load weights) before the deploy is failed
    deploy_timeout: float = Field(300.0, gt=0, le=86400)
    #: custom Ray resources each worker needs: it runs only on a node that carries them (the Ray way to
    #: pin workers to nodes); given, it also replaces the default that keeps SaaS workers off GPU nodes
    resources: dict[str, float] = Field(
        default_factory=dict, max_length=16, title="Custom resources per worker",
        description='Custom Ray resources each worker needs, e.g. {"cpu_pool": 0.01}: each worker runs only on a '
                    'node started with them (ray start --resources, a KubeRay group\'s rayStartParams), the Ray way to '
                    'pin workers to nodes. Given, SaaS workers are no longer kept off GPU nodes by default. CPUs and '
                    'GPUs have their own fields.')
    #: what the provider charges, for the budgets of client keys (``gateway.limits``): given at deploy, never
    #: fetched from anywhere
    price: Optional[Price] = Field(
        None, description='What the provider charges per million tokens, e.g. {"input_per_mtok": 0.15, '
                          '"output_per_mtok": 0.6}: the spend of client keys with a spend_per_month is counted at it')

    @field_validator("model_type")
    @classmethod
    def _model_type(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and value not in cls.MODEL_TYPES:
            raise ValueError(f"{value!r} does not match this provider; use one of {list(cls.MODEL_TYPES)} or omit it")
        return value

    @field_validator("resources")
    @classmethod
    def _resources(cls, value: dict[str, float]) -> dict[str, float]:
        return check_resources(value)

    @field_validator("fallbacks")
    @classmethod
    def _fallbacks(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("fallbacks name an endpoint twice")
        return value

    def secret_values(self) -> Iterator[str]:
        """The values of this spec's ``SecretStr`` fields (keys, tokens, every key of a pool): what no message may show."""
        seen = set()
        for _, value in self:
            values = [value] if isinstance(value, SecretStr) else \
                [item.key for item in value if isinstance(item, PoolKey)] if isinstance(value, list) else []
            for secret in values:
                if secret.get_secret_value() and secret.get_secret_value() not in seen:
                    seen.add(secret.get_secret_value())
                    yield secret.get_secret_value()

    def scrub(self, text: str) -> str:
        """``text`` with every secret of this spec redacted (see ``redact``)."""
        for secret in self.secret_values():
            text = redact(text, secret)
        return text

    def digest(self, cluster_secret: bytes) -> str:
        """HMAC-SHA256 of the whole spec, key included, keyed with the cluster's secret.

        Tells an unchanged redeploy apart. Keyed, because it is shown (``config_digest``):
        a plain hash of a spec that holds the key would confirm a guessed or leaked key
        offline. The cluster secret lives in the GCS (``gateway.registry``), never in a spec.
        """
        if len(cluster_secret) < 16:
            raise ValueError("the digest secret must be at least 16 bytes")
        data = self.model_dump(mode="json")
        # (fields left at their empty default: the digest of a spec from before the field existed)
        for name in ("resources", "api_keys", "price"):
            if not data.get(name):
                data.pop(name, None)
        for name, value in self:
            if isinstance(value, SecretStr):
                data[name] = value.get_secret_value()
            elif isinstance(value, list) and value and isinstance(value[0], PoolKey):
                data[name] = [{"key": item.key.get_secret_value(), "weight": item.weight} for item in value]
        message = json.dumps(data, sort_keys=True).encode()
        return hmac.new(cluster_secret, message, hashlib.sha256).hexdigest()[:16]

    def public(self) -> dict[str, Any]:
        """What may be shown about this endpoint (listing, logs): never a secret."""
        out = {"model": self.model_name, "workers": self.workers, "timeout": self.timeout,
               "max_retries": self.max_retries, "fallbacks": list(self.fallbacks), "resources": dict(self.resources)}
        if self.price is not None:  # (what the budgets read: ``Endpoint.record["price"]``)
            out["price"] = self.price.model_dump()
        return out


#: Ray's own resources, which have fields of their own (``cpus_per_worker``, ``gpus_per_worker``) or are
#: not a placement (memory): never in a ``resources`` map
RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
#: the smallest amount Ray tells apart (its resource unit is 1/10000)
_RESOURCE_UNIT = 0.0001


def check_resources(value: Mapping[str, float], whole: bool = False) -> dict[str, float]:
    """``value`` as a map of custom Ray resources, or ``ValueError`` naming what is wrong.

    Names: non-empty, at most 128 characters, no white space, none of ``RAY_BUILTIN_RESOURCES``.
    Amounts: finite, at least 0.0001 (Ray's unit), at most 1e9; ``whole``: whole numbers (what a node
    carries, ``ray start --resources``; a worker may ask for a fraction).
    """
    out: dict[str, float] = {}
    for name, amount in value.items():
        if not isinstance(name, str) or not name.strip() or len(name) > 128 or any(c.isspace() for c in name) \
                or not name.isprintable():
            raise ValueError(f"{name!r} is not a resource name (1 to 128 characters, no spaces)")
        if name in RAY_BUILTIN_RESOURCES:
            raise ValueError(f"{name!r} is one of Ray's own resources, not a custom one (CPUs and GPUs have "
                             f"fields of their own)")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not math.isfinite(amount):
            raise ValueError(f"the amount of {name!r} must be a finite number")
        if amount < _RESOURCE_UNIT or amount > 1e9:
            raise ValueError(f"the amount of {name!r} must be between {_RESOURCE_UNIT:g} and 1e9 (got {amount:g})")
        if whole and amount != int(amount):
            raise ValueError(f"the amount of {name!r} a node carries must be a whole number (got {amount:g})")
        out[name] = float(amount)
    return out


def _http_url(value: Optional[str], field: str) -> Optional[str]:
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{field} must be an http:// or https:// URL")
    return value.rstrip("/")


class SaaSDeploySpec(DeploySpec):
    """A hosted provider reached with the user's key, or with a pool of keys (``api_keys``).

    ``api_key`` is always set: to the one key given, or to the first key of ``api_keys``, so
    that what builds one adapter (``create_adapter``, ``verify_key``, ``check_deploy``) keeps
    reading one key. A replica builds one adapter per key of the pool, each from ``for_key``.
    """

    api_key: SecretStr = Field(min_length=1, max_length=512)
    #: several keys (``"sk-..."`` or ``{"key": "sk-...", "weight": N}``), instead of ``api_key``
    api_keys: Optional[list[PoolKey]] = Field(
        None, min_length=1, max_length=MAX_POOL_KEYS,
        description='Several keys instead of api_key: ["sk-...", {"key": "sk-...", "weight": 2}]. Calls go to the '
                    'healthy keys by weight (0 drains a key); a key the provider refuses (auth, quota) is disabled and '
                    'checked again by itself, one that is rate limited cools down.')
    #: ``http_proxy`` is accepted as an alias: the user's old requests name the relay so
    base_url: Optional[str] = Field(None, validation_alias=AliasChoices("base_url", "http_proxy"))
    #: a real HTTP(S) proxy between the replica and the provider
    proxy: Optional[str] = None
    #: check the key at deploy with a call that costs nothing (``Provider.verify_key``);
    #: false for relays that have no such call
    verify_key: bool = True

    @model_validator(mode="before")
    @classmethod
    def _one_base_url(cls, data: Any) -> Any:
        if isinstance(data, dict) and "base_url" in data and "http_proxy" in data:
            raise ValueError("give base_url or its alias http_proxy, not both")
        return data

    @model_validator(mode="before")
    @classmethod
    def _one_key_field(cls, data: Any) -> Any:
        """``api_key`` or ``api_keys``, not both; with ``api_keys``, ``api_key`` is its first key."""
        if not isinstance(data, dict) or data.get("api_keys") is None:
            return data
        if data.get("api_key") not in (None, ""):
            raise ValueError("give api_key (one key) or api_keys (a list of keys), not both")
        keys = data["api_keys"]
        if isinstance(keys, list):
            keys = [{"key": item} if isinstance(item, (str, SecretStr)) else item for item in keys]
            first = keys[0].get("key") if keys and isinstance(keys[0], dict) else None
            data = {**data, "api_keys": keys}
            if isinstance(first, (str, SecretStr)):
                data["api_key"] = first
        return data

    @field_validator("api_keys")
    @classmethod
    def _pool(cls, value: Optional[list[PoolKey]]) -> Optional[list[PoolKey]]:
        """Each key valid for this provider (its ``api_key`` rules); no key twice, no fingerprint twice; one in use.

        Entries are named by their number (1 is the first), never by their key.
        """
        if value is None:
            return value
        seen: dict[str, int] = {}
        prints: dict[str, int] = {}
        for number, item in enumerate(value, 1):
            key = item.key.get_secret_value()
            problem = cls.key_problem(key)
            if problem:
                raise ValueError(f"entry {number}: {problem}")
            if key in seen:
                raise ValueError(f"entries {seen[key]} and {number} are the same key")
            fingerprint = key_fingerprint(key)
            if fingerprint in prints:
                raise ValueError(f"entries {prints[fingerprint]} and {number} have the same fingerprint "
                                 f"({fingerprint}), so they could not be told apart in listings and edits")
            seen[key], prints[fingerprint] = number, number
        if not any(item.weight > 0 for item in value):
            raise ValueError("every key has weight 0: give at least one a weight above 0")
        return value

    @classmethod
    def key_problem(cls, key: str) -> Optional[str]:
        """What this provider's ``api_key`` rules say of ``key`` (e.g. Zhipu's ``id.secret`` form), or None.

        Runs the ``api_key`` field's own validators (a provider's ``field_validator("api_key")``), so
        every key of a pool, and a key added later (``POST /deployments/<chat_name>/keys``), meets
        the same rules as the one key of ``api_key``. Never says the key.
        """
        try:
            cls.__pydantic_validator__.validate_assignment(cls.model_construct(), "api_key", key)
        except ValidationError as exc:
            said = [e["msg"].removeprefix("Value error, ") for e in exc.errors(include_input=False, include_url=False)]
            return "; ".join(said) or "not a valid key"
        return None

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: Optional[str]) -> Optional[str]:
        return _http_url(value, "base_url")

    @field_validator("proxy")
    @classmethod
    def _proxy(cls, value: Optional[str]) -> Optional[str]:
        return _http_url(value, "proxy")

    def pool(self) -> list[tuple[str, int]]:
        """The endpoint's keys with their weights: ``api_keys``, or the one ``api_key`` (weight 1)."""
        if self.api_keys:
            return [(item.key.get_secret_value(), item.weight) for item in self.api_keys]
        return [(self.api_key.get_secret_value(), 1)]

    def for_key(self, key: str) -> "SaaSDeploySpec":
        """This spec with ``key`` as its one key: what an adapter and a key check of that key are given."""
        return self.model_copy(update={"api_key": SecretStr(key), "api_keys": None})

    def public(self) -> dict[str, Any]:
        out = super().public()
        out["base_url_host"] = urlsplit(self.base_url).hostname if self.base_url else None
        out["key_fingerprint"] = key_fingerprint(self.api_key.get_secret_value())
        out["keys"] = len(self.api_keys) if self.api_keys else 1
        return out


def auth_message(said: str) -> str:
    """The chat-time ``upstream_auth`` message: what the provider said, then what to do."""
    return f"{said.rstrip()} - deploy it again with a valid key"


def indefinite(word: str) -> str:
    """``word`` with its article: ``an openai``, ``an hf``, ``a zhipu``."""
    return ("an " if word[:1].lower() in "aeiou" or word.lower() == "hf" else "a ") + word


def shown_url(url: str) -> str:
    """``url`` as a message may show it: no user, password, query or fragment (a relay's token may be there)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]  # (an IPv6 host keeps its brackets)
    return f"{parts.scheme}://{host}{parts.path}"


def judge_key_check(err: GatewayError, base_url: str, provider: str) -> Optional[str]:
    """What a failed deploy-time key check means, the same for every provider.

    ``err`` is the provider's own mapping (``map_*_error``) of the check's failure. A key the
    provider refused (401, or an auth business code) raises ``invalid_key``; a 403 (a key without
    the permission to list models, a blocked region) could still chat, so it only warns. ``verify_key:
    false`` is named only where the check could not tell (never after the provider refused the key:
    that advice would deploy a bad key). A base URL
    without the route (404/405: a relay without ``GET /models``, or a wrong path) raises
    ``invalid_request``. Anything else (unreachable, a timeout, 5xx, 429, a malformed answer)
    says nothing about the key: the deploy goes on and the returned warning is logged.
    """
    shown = shown_url(base_url)
    status = err.info.upstream_status
    if status == 403:  # a key without the models permission, or a blocked region: not a wrong key
        return (f"the key could not be checked ({shown}/models answered HTTP 403: a missing permission or a "
                f"blocked region, not a wrong key), deployed anyway")
    if err.type == "upstream_auth" or status == 401:
        said = ", ".join(str(x) for x in (f"HTTP {status}" if status else None, err.info.provider_code) if x)
        raise GatewayError(
            "invalid_key",
            f"the provider rejected this key ({said or 'auth'}) at {shown}: check that it is the right key for "
            f"this provider and account, and that it is still active",
            provider=provider, provider_code=err.info.provider_code, upstream_status=status, fields=["api_key"],
        )
    if status in (404, 405):
        raise GatewayError(
            "invalid_request",
            f"could not check the key: {shown}/models answered HTTP {status}; check base_url, or deploy "
            f"with verify_key: false if this relay has no GET /models",
            provider=provider, upstream_status=status, fields=["base_url", "verify_key"],
        )
    return f"the key could not be checked, deployed anyway: {err.info.message}"


def key_fingerprint(key: str) -> str:
    """``sk-...a1b2``: enough to tell keys apart, never enough to use one."""
    if len(key) < 12:
        return "..." + key[-2:] if len(key) >= 8 else "***"
    prefix = key[:3] if key[:3].isascii() else ""
    return f"{prefix}...{key[-4:]}"


def redact(text: str, secret: str, min_run: int = 8) -> str:
    """Remove ``secret`` and every run of ``min_run``+ of its characters from ``text``."""
    if not text or not secret:
        return text
    out = text.replace(secret, "[redacted]")
    if len(secret) < min_run:
        return out
    i = 0
    while i + min_run <= len(secret):
        piece = secret[i : i + min_run]
        if piece in out:
            out = out.replace(piece, "[redacted]")
        i += 1
    return out


def retry_after_seconds(headers: Any) -> Optional[float]:
    """``retry-after-ms`` first, then ``retry-after`` in seconds (as the SDK reads them)."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                seconds = float(value) / scale
            except ValueError:
                continue
            if math.isfinite(seconds):  # ("inf", "1e400": a wait no one can honour)
                return max(0.0, seconds)
    return None


#: how a ``DeployFailure`` reads in a traceback: ``DeployFailure: <reason>: <message>`` on one line
_FAILURE_LINE = re.compile(r"DeployFailure: ([a-z_]+): (.+)")


class DeployFailure(Exception):
    """Raised by an adapter that cannot start in a replica; ``reason`` is a stable code.

    The gateway reads it back from Serve's report of the failed replica (``parse``) and shows
    it in ``GET /deployments/<chat_name>`` (see ``ErrorInfo.reason``).
    The replica raises every construction failure as one (``construction_failure``), so that
    report never holds a key.
    """

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        self.message = " ".join(message.split())  # one line: the gateway reads it from a traceback
        super().__init__(f"{reason}: {self.message}")

    def __reduce__(self):  # pickles with both arguments (Exception's default passes only the text)
        return type(self), (self.reason, self.message)

    @classmethod
    def parse(cls, text: str) -> Optional["DeployFailure"]:
        """The last ``DeployFailure`` in ``text`` (Serve's report of a failed replica), or None.

        Serve's status message (a traceback's text) is the only channel Serve gives a failed
        constructor; this is the one place that reads what ``__init__`` wrote there.
        """
        found = _FAILURE_LINE.findall(text or "")
        if not found:
            return None
        reason, message = found[-1]
        return cls(reason, message.strip())


def construction_failure(exc: BaseException, spec: DeploySpec, provider: str) -> DeployFailure:
    """The one form a failure to build an adapter leaves in: a ``DeployFailure`` without secrets.

    An SDK's constructor may put the key in its error, and Serve shows a failed replica's
    traceback in its status, the dashboard and its logs. So the replica (and the gateway's own
    ``check_deploy``) raise this instead, with ``raise ... from None`` outside the ``except``
    block: the original exception is not even its ``__context__``. A ``DeployFailure`` keeps
    its reason; anything else is ``load_error`` with its class and its redacted text.
    """
    if isinstance(exc, DeployFailure):
        reason, text = exc.reason, exc.message
    else:
        try:
            said = str(exc)
        except Exception:  # noqa: BLE001 - a broken __str__ must not hide the failure
            said = ""
        reason = "load_error"
        text = f"the {provider} adapter could not be built: {type(exc).__name__}" + (f": {said}" if said else "")
    return DeployFailure(reason, spec.scrub(text)[:500])


class ChatAdapter(abc.ABC):
    """Lives in a replica and talks to one upstream with one key.

    The engine protocol, which every provider implements and the replica relies on:

    ``chat(call) -> ChatResult``
        One whole answer. Failures raise ``GatewayError`` (map SDK exceptions with the
        provider's exception-class table and ``reraise_as_gateway_error``); nothing else
        may escape (the replica reports any other exception as ``upstream_error`` with its
        class name only). The replica retries what ``errors.TYPES`` marks ``retried``.

    ``stream(call) -> AsyncIterator[StreamEvent]``
        ``Delta`` / ``ToolCallDelta`` events as the upstream sends them, then exactly one
        ``Finish`` (``end_event``), and nothing after; see ``contract.events``. Failures raise
        ``GatewayError``, never a ``Failure`` event: before the first event the replica may
        retry the whole stream (a new ``stream(call)``), after it the failure is reported
        in the stream. Being cancelled (``aclose`` of the generator: the caller went away)
        must close the upstream stream.

    ``aclose()``
        Release connections, threads, models; called when the replica stops.
    """

    @abc.abstractmethod
    async def chat(self, call: ChatCall) -> ChatResult:
        """Answer one call or raise ``GatewayError``."""

    async def stream(self, call: ChatCall) -> AsyncIterator[StreamEvent]:
        raise GatewayError("upstream_bad_request", "this provider cannot stream")
        yield Delta("")  # pragma: no cover - makes this an async generator

    async def aclose(self) -> None:
        """Release connections (called when the replica stops)."""


class Provider(abc.ABC):
    #: route prefix and registry name, e.g. ``openai`` -> ``POST /openai/deploy``
    name: ClassVar[str]
    #: the pydantic model of ``POST /<name>/deploy``
    spec_class: ClassVar[type[DeploySpec]]
    #: ``saas`` (I/O-bound, a fraction of a CPU) or ``local`` (holds a model)
    kind: ClassVar[str] = "saas"
    #: the sampling parameters (``SamplingParams`` fields) this provider honours
    params: ClassVar[frozenset] = frozenset({"temperature", "top_p", "max_tokens", "max_completion_tokens", "stop"})

    def check_call(self, call: ChatCall) -> None:
        """What this provider cannot do is a clear 400, never silently dropped."""
        missing = sorted(call.params.given() - self.params)
        if missing:
            raise GatewayError("invalid_request", f"the {self.name} provider does not support: {', '.join(missing)}",
                               fields=missing)

    def replica_options(self, spec: DeploySpec, settings: Any) -> dict[str, Any]:
        """Serve deployment options; SaaS replicas are I/O-bound and take many calls each."""
        return {
            "num_replicas": spec.workers,
            # the adapter's code runs on the replica's own event loop, not in a thread of its own:
            # SaaS adapters only await I/O (a blocking SDK runs in the adapter's executor), and the
            # hop between the two loops was about a quarter of a replica's CPU per call (bench.serve_paths)
            # (and its gRPC server, which the gateway's calls travel on, takes any body the gateway
            # accepts: 4 MiB by default, a pickled call can be larger than its JSON body)
            "ray_actor_options": {"num_cpus": settings.saas_replica_cpus,
                                  "runtime_env": {"env_vars": {
                                      "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                                      "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(max(4 << 20, 4 * settings.max_body_bytes)),
                                  }}},
            "max_ongoing_requests": settings.saas_max_ongoing_requests,
            # the replica's own line per call ("chat ok request_id=... upstream_ms=...") says more than
            # Serve's access line, which would be a second log write per call
            "logging_config": {"enable_access_log": False},
            "health_check_period_s": 10,
            "graceful_shutdown_wait_loop_s": 0.1,  # how often a stopping replica looks for calls still running
            "graceful_shutdown_timeout_s": spec.timeout + 5,
        }

    #: seconds the deploy-time key check may wait, per phase (the SDKs' connect and read timeouts;
    #: it holds the deploy request)
    key_check_timeout: ClassVar[float] = 5.0

    def verify_key(self, spec: DeploySpec) -> Optional[str]:
        """Check the spec's key with a call that costs nothing, in the gateway, before anything starts.

        Called at deploy when the spec has ``verify_key: true``. Raises ``GatewayError``
        (``invalid_key``, ``invalid_request``; see ``judge_key_check``) when the deploy must
        fail; returns ``None`` when the key was accepted, or a warning (no secret) when the
        check could not tell. The default has no such call and checks nothing.
        """
        return None

    def check_deploy(self, spec: DeploySpec) -> None:
        """Refuse, in the gateway and before the cluster, a spec that cannot work.

        SaaS adapters are cheap to build, so building one is the check; providers that
        load a model in the replica override this with checks that load nothing.
        """
        self.create_adapter(spec)

    @abc.abstractmethod
    def create_adapter(self, spec: DeploySpec) -> ChatAdapter:
        """Build the adapter inside the replica (also called once at deploy to validate)."""


def usage_of(usage: Any) -> Usage:
    """An OpenAI-shaped usage object (openai and zhipuai SDKs) in the gateway's shape."""
    return Usage(prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                 completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
                 total_tokens=getattr(usage, "total_tokens", 0) or 0)


def completion_result(data: Any, request_id: Optional[str]) -> ChatResult:
    """An OpenAI-shaped ``chat.completion`` as the wire has it (JSON) as a ``ChatResult``.

    SDK objects (zhipuai) come here as ``model_dump(exclude_none=True)``.
    """
    try:
        if not data["choices"]:
            raise GatewayError("upstream_error", "the provider answered without choices")
        choice = data["choices"][0]
        message = choice["message"]
        usage = data.get("usage") or {}
        return ChatResult(
            output=message.get("content") or "",
            tool_calls=message.get("tool_calls") or None,
            finish_reason=choice.get("finish_reason"),
            usage=Usage(prompt_tokens=usage.get("prompt_tokens") or 0, completion_tokens=usage.get("completion_tokens") or 0,
                        total_tokens=usage.get("total_tokens") or 0),
            upstream_model=data.get("model"),
            provider_request_id=request_id,
        )
    except (KeyError, IndexError, TypeError, AttributeError, ValidationError):
        raise GatewayError("upstream_error", "the provider's answer was malformed") from None


class ChunkReader:
    """Reads an OpenAI-shaped stream (the openai and zhipuai SDKs' chunks): ``events(chunk)`` for each
    chunk as it comes, then ``end()``, the stream's ``Finish`` with the usage its chunks carried."""

    def __init__(self) -> None:
        self.finish: Optional[str] = None
        self.usage = Usage()

    def events(self, chunk: Any) -> list[StreamEvent]:
        if chunk.usage:
            self.usage = usage_of(chunk.usage)
        events: list[StreamEvent] = []
        for choice in chunk.choices:
            if choice.delta and choice.delta.content:
                events.append(Delta(choice.delta.content))
            if choice.delta and choice.delta.tool_calls:
                events.append(ToolCallDelta([tc.model_dump(exclude_none=True) for tc in choice.delta.tool_calls]))
            if choice.finish_reason:
                self.finish = choice.finish_reason
        return events

    def end(self) -> Finish:
        return end_event(self.finish, self.usage)


def end_event(finish_reason: Optional[str], usage: Usage) -> Finish:
    """The last event of a stream; a stream that never said why it ended was cut."""
    if not finish_reason:
        raise GatewayError("upstream_error", "the provider's stream ended before it finished")
    return Finish(finish_reason, usage)


#: how one exception becomes a ``GatewayError``
ErrorMapper = Callable[[BaseException], GatewayError]
#: an SDK's exception classes -> their mappers (``map_by_class``)
ErrorTable = Mapping[type, ErrorMapper]


def fixed(type: str, message: str) -> ErrorMapper:
    """A mapper that answers one type and message, whatever the exception says."""
    return lambda exc: GatewayError(type, message)


#: what each upstream type says before the provider's own words, for every provider
MESSAGES: dict[str, str] = {
    "upstream_auth": "the provider rejected the endpoint's key",
    "upstream_quota": "the provider's balance or quota is exhausted",
    "upstream_rate_limited": "the provider is rate limiting this key",
    "content_filter": "the provider refused the content",
    "upstream_bad_request": "the provider refused the request",
    "upstream_timeout": "the provider timed out",
    "upstream_error": "the provider failed",
}


def unexpected(exc: BaseException) -> GatewayError:
    """An exception no table entry says more about: its class is named, never its text (it may hold input)."""
    return GatewayError("upstream_error", f"unexpected {type(exc).__name__} while calling the provider")


#: the entries every SDK's table shares
TIMED_OUT = fixed("upstream_timeout", "the provider did not answer in time")
MALFORMED = fixed("upstream_error", "the provider's answer was malformed")
CONNECTION_FAILED = fixed("upstream_error", "could not reach the provider (connection failed)")


def map_by_class(exc: BaseException, table: ErrorTable) -> GatewayError:
    """``exc`` mapped by the entry of its most specific class in ``table`` (its MRO, as httpx does).

    Each provider keeps one such table of its SDK's exception classes; a fast test checks
    that every public exception class of the pinned SDK has its own entry, so an SDK upgrade
    that adds one fails the test instead of falling through to a guess.
    """
    for cls in type(exc).__mro__:
        mapper = table.get(cls)
        if mapper is not None:
            return mapper(exc)
    return unexpected(exc)


@contextlib.contextmanager
def reraise_as_gateway_error(provider: str, secret: str, mapper) -> Iterator[None]:
    """Map any exception to a ``GatewayError`` with ``mapper(exc)`` and scrub the key."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - every SDK failure must become ours
        err = exc if isinstance(exc, GatewayError) else mapper(exc)
        info = err.info.model_copy(update={"provider": provider, "message": redact(err.info.message, secret)})
        raise GatewayError.from_info(info) from None
