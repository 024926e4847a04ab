"""Who may do what: the admin token, client keys (scoped to chat_names, rate limited, budgeted).

- ``GATEWAY_ADMIN_TOKEN``: when set, deploy, undeploy, the listings and ``/metrics`` need
  ``Authorization: Bearer <token>``; the admin token is also accepted on chat routes.
- ``GATEWAY_METRICS_TOKEN``: read-only, for Prometheus: ``/metrics`` and the details of
  ``/readyz`` (without either token ``/readyz`` says only ready or not, and why in general).
- ``GATEWAY_API_KEYS`` (``key1,key2``) or ``GATEWAY_API_KEYS_FILE`` (YAML/JSON list of
  ``{key, name, chat_names, rate_per_minute, tokens_per_minute, tokens_per_day, tokens_per_month,
  spend_per_month}``): when set, chat routes need one of them. A key limited to chat_names cannot
  reach others (403 ``forbidden``; an endpoint's own fallbacks outside them are skipped, see
  ``dispatch``). Its limits and budgets are kept for the whole cluster and charged per upstream
  call (see ``gateway.limits``): budgets reset at the start of each UTC day or month, spend is
  counted at the endpoints' ``price`` (per million tokens, in the operator's currency).

Tokens are compared in constant time (``hmac.compare_digest`` of their SHA-256) and never
logged; keys are named in logs by their ``name`` only, and in the cluster by ``ClientKey.id``.
A bad entry stops the start with a message that names the entry, never its key.
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from contract.errors import GatewayError


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8")).digest()


def key_id(digest: bytes) -> str:
    """How the cluster (the limits keeper, its GCS entries) names a key: a short keyed hash of its
    digest. The same key gets the same id in every gateway process; the id leads back to no key
    (and it is never logged or answered either)."""
    return hmac.new(b"llm-gateway client key id", digest, hashlib.sha256).hexdigest()[:20]


class KeySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=8)
    name: Optional[str] = None
    chat_names: Optional[list[str]] = None
    #: upstream calls a minute (fractions work: 0.5 is one call every two minutes)
    rate_per_minute: Optional[float] = Field(None, gt=0, allow_inf_nan=False)
    #: tokens a minute: each call reserves its most before it is made, settled with its usage after
    tokens_per_minute: Optional[float] = Field(None, gt=0, allow_inf_nan=False)
    #: budgets, reserved and settled the same way: tokens a UTC day, tokens a UTC month, and spend a UTC
    #: month at the endpoints' prices (``price``, per million tokens)
    tokens_per_day: Optional[float] = Field(None, gt=0, allow_inf_nan=False)
    tokens_per_month: Optional[float] = Field(None, gt=0, allow_inf_nan=False)
    spend_per_month: Optional[float] = Field(None, gt=0, allow_inf_nan=False)


@dataclass(frozen=True)
class ClientKey:
    digest: bytes = field(repr=False)
    name: str
    chat_names: Optional[frozenset]
    rate_per_minute: Optional[float] = None
    tokens_per_minute: Optional[float] = None
    tokens_per_day: Optional[float] = None
    tokens_per_month: Optional[float] = None
    spend_per_month: Optional[float] = None
    #: the key's name in the cluster (``key_id``)
    id: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", key_id(self.digest))

    @property
    def limited(self) -> bool:
        return self.rate_per_minute is not None or self.budgeted

    @property
    def budgeted(self) -> bool:
        """Has a token limit or a budget: its calls reserve and settle (``gateway.reservations``)."""
        return (self.tokens_per_minute is not None or self.tokens_per_day is not None or self.tokens_per_month is not None
                or self.spend_per_month is not None)

    def limits(self) -> dict:
        """Its token limit and budgets, as the limits keeper takes them (``budgets.LIMITS``; None: none)."""
        return {"tokens_per_minute": self.tokens_per_minute, "tokens_per_day": self.tokens_per_day,
                "tokens_per_month": self.tokens_per_month, "spend_per_month": self.spend_per_month}

    def allows(self, chat_name: str) -> bool:
        return self.chat_names is None or chat_name in self.chat_names


def _problems(exc: ValidationError) -> str:
    """Pydantic's complaints without the input (it may be the key): known field names and messages only."""
    out = []
    for e in exc.errors(include_input=False, include_url=False, include_context=False):
        where = ".".join(str(part) for part in e["loc"])
        field_name = str(e["loc"][0]) if e["loc"] else ""
        if field_name and field_name not in KeySpec.model_fields:
            where = "a field the entry should not have"  # its name could be a key pasted in the wrong place
        out.append(f"{where}: {e['msg']}" if where else e["msg"])
    return "; ".join(out)


def _spec(item: Any, where: str) -> KeySpec:
    try:
        return KeySpec.model_validate(item)
    except ValidationError as exc:
        name = item.get("name") if isinstance(item, dict) else None
        named = f" (name {name!r})" if isinstance(name, str) and name else ""
        raise SystemExit(f"{where}{named}: {_problems(exc)}") from None


def load_keys(inline: Optional[str], path: Optional[str]) -> list[ClientKey]:
    """The client keys of ``GATEWAY_API_KEYS`` and ``GATEWAY_API_KEYS_FILE``.

    A bad entry, or a key given twice, stops the start (``SystemExit``) naming the variable, the
    entry's number and its ``name``; never the key, so the message is safe in any log.
    """
    specs: list = []  # (KeySpec, where it was given)
    if inline:
        entries = [k.strip() for k in inline.split(",") if k.strip()]
        specs += [(_spec({"key": k}, f"GATEWAY_API_KEYS entry #{i}"), f"GATEWAY_API_KEYS entry #{i}")
                  for i, k in enumerate(entries, 1)]
    if path:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or []
        except OSError as exc:
            raise SystemExit(f"GATEWAY_API_KEYS_FILE {path} cannot be read ({type(exc).__name__})") from None
        except yaml.YAMLError as exc:  # its text would quote the file, which holds keys: the line only
            mark = getattr(exc, "problem_mark", None)
            line = f" near line {mark.line + 1}" if mark is not None else ""
            raise SystemExit(f"GATEWAY_API_KEYS_FILE {path} is not valid YAML/JSON{line}") from None
        if not isinstance(raw, list):
            raise SystemExit(f"GATEWAY_API_KEYS_FILE {path} must be a list of {{key, name, chat_names, rate_per_minute, "
                             f"tokens_per_minute, tokens_per_day, tokens_per_month, spend_per_month}}")
        specs += [(_spec(item, f"GATEWAY_API_KEYS_FILE {path} entry #{i}"), f"GATEWAY_API_KEYS_FILE {path} entry #{i}")
                  for i, item in enumerate(raw, 1)]
    # the same key twice would keep only the last entry's name, names and limits, silently: refused
    first: dict[str, str] = {}
    for spec, where in specs:
        named = f"{where} (name {spec.name!r})" if spec.name else where
        earlier = first.setdefault(_digest(spec.key), named)
        if earlier is not named:
            raise SystemExit(f"{named} has the same key as {earlier}: give each application its own key, "
                             f"or merge the two entries")
    specs = [spec for spec, _ in specs]
    return [ClientKey(_digest(s.key), s.name or f"key#{i + 1}", frozenset(s.chat_names) if s.chat_names is not None else None,
                      s.rate_per_minute, s.tokens_per_minute, s.tokens_per_day, s.tokens_per_month, s.spend_per_month)
            for i, s in enumerate(specs)]


def bearer(header: Optional[str]) -> Optional[str]:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class Auth:
    def __init__(self, admin_token: Optional[str], keys: Iterable[ClientKey], metrics_token: Optional[str] = None) -> None:
        self._admin = _digest(admin_token) if admin_token else None
        self._metrics = _digest(metrics_token) if metrics_token else None
        self.keys = list(keys)

    @property
    def enabled(self) -> bool:
        return self._admin is not None or bool(self.keys)

    def _is_admin(self, token: Optional[str]) -> bool:
        return self._admin is not None and token is not None and hmac.compare_digest(_digest(token), self._admin)

    def admin(self, header: Optional[str]) -> None:
        """Deploy, undeploy, listings, metrics."""
        if self._admin is None:
            return
        if not self._is_admin(bearer(header)):
            raise GatewayError("unauthorized", "this route needs the admin token: Authorization: Bearer <GATEWAY_ADMIN_TOKEN>")

    def may_read(self, header: Optional[str]) -> bool:
        """May this caller read the gateway's state (metrics, readiness details)? The admin token
        or the read-only ``GATEWAY_METRICS_TOKEN``; anyone when neither is set."""
        if self._admin is None and self._metrics is None:
            return True
        token = bearer(header)
        return self._is_admin(token) or (
            self._metrics is not None and token is not None and hmac.compare_digest(_digest(token), self._metrics))

    def reader(self, header: Optional[str]) -> None:
        """``/metrics``: the admin token or the metrics token."""
        if not self.may_read(header):
            raise GatewayError("unauthorized", "this route needs the metrics token or the admin token: "
                                               "Authorization: Bearer <GATEWAY_METRICS_TOKEN>")

    def client(self, header: Optional[str]) -> Optional[ClientKey]:
        """Chat routes: the caller's key (``None`` when keys are off or the admin calls)."""
        if not self.keys:
            return None
        token = bearer(header)
        if self._is_admin(token):
            return None
        found = None
        if token is not None:
            digest = _digest(token)
            for key in self.keys:  # every key is compared: the time does not tell which matched
                if hmac.compare_digest(digest, key.digest):
                    found = key
        if found is None:
            raise GatewayError("unauthorized", "this route needs a client key: Authorization: Bearer <key>")
        return found  # (its limits are charged per upstream call: ``gateway.limits``)


def check_chat_names(key: Optional[ClientKey], names: Iterable[str]) -> None:
    if key is None:
        return
    denied = sorted({n for n in names if not key.allows(n)})
    if denied:
        raise GatewayError("forbidden", f"{key.name} may not use: {', '.join(denied)}; it may use "
                                        f"{', '.join(sorted(key.chat_names or ())) or 'none'} (ask the gateway's operator "
                                        f"to add it to the key's chat_names in GATEWAY_API_KEYS_FILE)")
