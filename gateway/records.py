"""The registry's record of one endpoint, typed: ``EndpointRecord``, with its ``Health`` and pending deploy.

The registry actor (``gateway.registry``) stores plain dicts, written through to the GCS as JSON: a record
written by an older gateway must still load, and a detached registry runs whichever gateway's code started
it. So the dict stays the stored form, and ``gateway.registry_client`` turns it into these types and back.

``to_dict(from_dict(d)) == d`` for every record the registry stores (key order included, which is what
``GET /deployments`` shows): a field keeps the value it was read with while it is unchanged (an int
timeout stays an int, a health view its short form), keys a record lacks stay absent, and a key this
gateway does not know stays in ``spec``. No Ray here: the fast tests and the renderers use these types.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

_HEALTH_KEYS = ("state", "consecutive_failures", "cooldown_until", "last_error", "cooldowns")


@dataclass(frozen=True)
class Health:
    """The registry's shared cooldown view of one endpoint (``EndpointRegistry._health_view``)."""

    state: str = "ok"  # "ok" | "cooling_down" | "probing" | "probe_due"
    consecutive_failures: int = 0
    cooldown_until: Optional[float] = None  # time.time() seconds
    last_error: Optional[str] = None
    cooldowns: int = 0
    #: the dict it was read from (``to_dict`` answers it again while nothing changed)
    _source: Optional[Mapping[str, Any]] = field(default=None, compare=False, repr=False)

    @property
    def ok(self) -> bool:
        return self.state == "ok"

    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]]) -> "Health":
        """None (no health in the record) is a healthy endpoint."""
        if d is None:
            return cls()
        return cls(state=d.get("state", "ok"), consecutive_failures=d.get("consecutive_failures", 0),
                   cooldown_until=d.get("cooldown_until"), last_error=d.get("last_error"),
                   cooldowns=d.get("cooldowns", 0), _source=dict(d))

    def to_dict(self) -> dict:
        """Today's shape: the registry answers ``{state, consecutive_failures}`` for an endpoint it has
        seen no call of, and all five keys once it has; a health made here is shown the same way."""
        if self._source is not None and Health.from_dict(self._source) == self:
            return dict(self._source)
        if self == Health():
            return {"state": self.state, "consecutive_failures": self.consecutive_failures}
        return {key: getattr(self, key) for key in _HEALTH_KEYS}


class _SpecFields:
    """Typed reads of a deployed spec's public fields (``_spec_fields``: their dict)."""

    def _spec_fields(self) -> dict:
        raise NotImplementedError

    @property
    def workers(self) -> Optional[int]:
        return self._spec_fields().get("workers")

    @property
    def resources(self) -> Optional[dict]:
        return self._spec_fields().get("resources")

    @property
    def price(self) -> Optional[dict]:
        return self._spec_fields().get("price")


@dataclass(frozen=True)
class PendingDeploy(_SpecFields):
    """A deploy under way (``EndpointRecord.pending``, typed): settled once, by ``id``."""

    id: str
    #: a new endpoint (a failure removes its application) or an update (the old replicas keep serving)
    fresh: bool
    #: the spec's public fields with its provider: what the record holds once the deploy runs
    public: dict
    digest: str
    started: float  # time.time()
    deadline: float  # time.time(): settled as failed past it

    def _spec_fields(self) -> dict:
        return self.public

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PendingDeploy":
        return cls(id=d["id"], fresh=d["fresh"], public=d["public"], digest=d["digest"], started=d["started"],
                   deadline=d["deadline"])

    def to_dict(self) -> dict:
        return {"id": self.id, "fresh": self.fresh, "public": self.public, "digest": self.digest,
                "started": self.started, "deadline": self.deadline}


#: the record's own fields, in the order a record made here shows them; every other key is ``spec``'s
_FIELDS = ("chat_name", "provider", "status", "timeout", "fallbacks", "health", "failure", "pending", "config_digest",
           "created_at", "updated_at", "last_update_failure")
#: fields a record made here always shows; the others only when they differ from their defaults
_ALWAYS = ("chat_name", "provider", "status")
#: fields a record leaves out once they are None (a settled deploy has no ``pending``, a running one no ``failure``)
_GONE_WHEN_NONE = ("failure", "pending", "last_update_failure")


@dataclass(frozen=True)
class EndpointRecord(_SpecFields):
    """The registry's record of one endpoint (never a key, never a secret)."""

    chat_name: str
    provider: str
    status: str = "RUNNING"  # "RUNNING" | "DEPLOYING" | "DEPLOY_FAILED"
    timeout: float = 60.0  # the endpoint's call timeout, seconds
    fallbacks: tuple[str, ...] = ()
    health: Health = Health()
    failure: Optional[dict] = None  # {"reason", "message"} of a failed deploy
    pending: Optional[dict] = None  # the deploy under way (``pending_deploy``: typed)
    config_digest: str = ""
    created_at: Optional[str] = None
    updated_at: Optional[str] = None
    last_update_failure: Optional[dict] = None  # {"reason", "message"} of an update that failed (the old replicas serve)
    #: every other public field of the deployed spec (model, workers, max_retries, resources, price, base_url_host,
    #: key_fingerprint, keys, ...), as the stored dict holds them
    spec: dict = field(default_factory=dict)
    #: the dict it was read from: its key order, and the values of fields still unchanged (see ``to_dict``)
    _source: Optional[Mapping[str, Any]] = field(default=None, compare=False, repr=False)

    # -- typed views of the spec's fields (``workers``, ``resources``, ``price``: ``_SpecFields``) ---------
    @property
    def pending_deploy(self) -> Optional[PendingDeploy]:
        return PendingDeploy.from_dict(self.pending) if self.pending else None

    def _spec_fields(self) -> dict:
        return self.spec

    # -- the stored form -----------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EndpointRecord":
        """Lossless: ``to_dict(from_dict(d)) == d`` for every record the registry stores (old ones too)."""
        return cls(chat_name=d.get("chat_name", ""), provider=d.get("provider", ""), status=d.get("status", "RUNNING"),
                   timeout=d.get("timeout", 60.0), fallbacks=_decoded("fallbacks", d.get("fallbacks")),
                   health=_decoded("health", d.get("health")), failure=d.get("failure"), pending=d.get("pending"),
                   config_digest=d.get("config_digest", ""), created_at=d.get("created_at"),
                   updated_at=d.get("updated_at"), last_update_failure=d.get("last_update_failure"),
                   spec={k: v for k, v in d.items() if k not in _FIELDS}, _source=dict(d))

    def to_dict(self) -> dict:
        """The stored form: the keys of the dict it was read from, in their order (a field set since, at
        the end; one of ``_GONE_WHEN_NONE`` set to None, left out), each field's value as read while it is
        unchanged. A record made here shows ``_ALWAYS``, then the fields that differ from their defaults."""
        source = self._source or {}
        out: dict = {}
        for key in [*source, *(k for k in (*_FIELDS, *self.spec) if k not in source)]:
            if key not in _FIELDS:
                if key in self.spec:  # (a spec key taken out since it was read: gone)
                    out[key] = self.spec[key]
                continue
            value = getattr(self, key)
            if key in source and _decoded(key, source[key]) == value:
                out[key] = source[key]  # as read (an int timeout, a health view's short form, a null)
            elif value is None and key in _GONE_WHEN_NONE:
                continue
            elif key in source or value != _DEFAULTS[key] or (self._source is None and key in _ALWAYS):
                out[key] = list(value) if key == "fallbacks" else value.to_dict() if key == "health" else value
        return out

    def with_health(self, health: Health) -> "EndpointRecord":
        return dataclasses.replace(self, health=health)

    # -- records a deploy writes (each in the key order the gateway has always stored) -----------
    @classmethod
    def failed(cls, chat_name: str, provider: str, public: dict, failure: dict, now: str) -> "EndpointRecord":
        """A deploy refused before anything started: ``GET /deployments/<name>`` still says why."""
        return cls.from_dict({"chat_name": chat_name, "provider": provider, **public, "status": "DEPLOY_FAILED",
                              "failure": failure, "created_at": now, "updated_at": now})

    @classmethod
    def deploying(cls, chat_name: str, public: dict, digest: str, pending: PendingDeploy, now: str) -> "EndpointRecord":
        """A new endpoint whose replicas are starting (``public``: the spec's public fields with its provider)."""
        return cls.from_dict({"chat_name": chat_name, **public, "config_digest": digest, "status": "DEPLOYING",
                              "created_at": now, "updated_at": now, "pending": pending.to_dict()})

    @classmethod
    def adopted(cls, chat_name: str, public: dict, now: str) -> "EndpointRecord":
        """An application Serve runs that the registry forgot (the registry restarted): updated in place."""
        return cls.from_dict({"chat_name": chat_name, **public, "config_digest": "", "status": "RUNNING",
                              "created_at": now, "updated_at": now})

    def updating(self, pending: PendingDeploy) -> "EndpointRecord":
        """This record with ``pending`` under way (its replicas serve until the new ones run)."""
        return dataclasses.replace(self, pending=pending.to_dict())


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EndpointRecord) if f.name in _FIELDS}
_DEFAULTS.update(chat_name="", provider="")


def _decoded(key: str, raw: Any) -> Any:
    """A stored field's value as the record holds it."""
    if key == "fallbacks":
        return tuple(raw or ())
    if key == "health":
        return Health.from_dict(raw)
    return raw
