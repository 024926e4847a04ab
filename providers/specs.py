"""What a deploy says: the spec every endpoint has, the hosted providers' one, and their parts.

``POST /<provider>/deploy`` is validated with a provider's ``spec_class``, a subclass of one of
these (``Provider.spec_class``); unknown fields are refused. Keys (``api_key``, every key of
``api_keys``) are ``SecretStr``: what a message may show of them (``public``, ``scrub``) goes
through ``providers.keys``. Kept apart from the adapters: the gateway validates and digests
specs without loading any provider's SDK.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import math
from typing import Any, ClassVar, Iterator, Mapping, Optional
from urllib.parse import urlsplit

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from contract.calls import ChatName

from .keys import key_fingerprint, redact


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
