"""Who may do what: the admin token, client keys (scoped to chat_names, rate limited).

- ``GATEWAY_ADMIN_TOKEN``: when set, deploy, undeploy, the listings and ``/metrics`` need
  ``Authorization: Bearer <token>``; the admin token is also accepted on chat routes.
- ``GATEWAY_API_KEYS`` (``key1,key2``) or ``GATEWAY_API_KEYS_FILE`` (YAML/JSON list of
  ``{key, name, chat_names, rate_per_minute}``): when set, chat routes need one of them.
  A key limited to chat_names cannot reach others (403 ``forbidden``); past its rate it
  gets 429 ``rate_limited`` with ``Retry-After``. The rate is counted per gateway process.

Tokens are compared in constant time (``hmac.compare_digest`` of their SHA-256) and never
logged; keys are named in logs by their ``name`` only.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import GatewayError


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8")).digest()


class KeySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=8)
    name: Optional[str] = None
    chat_names: Optional[list[str]] = None
    rate_per_minute: Optional[float] = Field(None, gt=0)


@dataclass
class ClientKey:
    digest: bytes
    name: str
    chat_names: Optional[frozenset]
    rate_per_minute: Optional[float]
    _tokens: float = 0.0
    _stamp: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._tokens = self.rate_per_minute or 0.0

    def allows(self, chat_name: str) -> bool:
        return self.chat_names is None or chat_name in self.chat_names

    def take(self) -> Optional[float]:
        """Spend one request; ``None`` if allowed, else the seconds until the next one is."""
        if not self.rate_per_minute:
            return None
        with self._lock:
            now = time.monotonic()
            per_second = self.rate_per_minute / 60.0
            self._tokens = min(self.rate_per_minute, self._tokens + (now - self._stamp) * per_second)
            self._stamp = now
            if self._tokens >= 1:
                self._tokens -= 1
                return None
            return (1 - self._tokens) / per_second


def load_keys(inline: Optional[str], path: Optional[str]) -> list[ClientKey]:
    specs: list[KeySpec] = []
    if inline:
        specs += [KeySpec(key=k.strip()) for k in inline.split(",") if k.strip()]
    if path:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or []
            specs += [KeySpec.model_validate(item) for item in raw]
        except (OSError, yaml.YAMLError, ValidationError, TypeError) as exc:
            # the file's content is never echoed: it holds keys
            raise SystemExit(f"GATEWAY_API_KEYS_FILE {path} is unreadable or invalid ({type(exc).__name__})") from None
    return [ClientKey(_digest(s.key), s.name or f"key#{i + 1}", frozenset(s.chat_names) if s.chat_names is not None else None,
                      s.rate_per_minute) for i, s in enumerate(specs)]


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
        wait = found.take()
        if wait is not None:
            raise GatewayError("rate_limited", f"{found.name} is over its rate of {found.rate_per_minute:g} requests a minute",
                               retry_after=max(1.0, wait))
        return found


def check_chat_names(key: Optional[ClientKey], names: Iterable[str]) -> None:
    if key is None:
        return
    denied = sorted({n for n in names if not key.allows(n)})
    if denied:
        raise GatewayError("forbidden", f"{key.name} may not use: {', '.join(denied)}")


def is_loopback(bind: str) -> bool:
    host = bind.rpartition(":")[0].strip("[]") if ":" in bind else bind
    if bind.startswith("unix:"):
        return True
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
