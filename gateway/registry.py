"""The endpoint registry: one small detached actor that every gateway process shares.

It holds what the gateway knows about each endpoint besides Serve's own state
(provider, model, base URL host, key fingerprint, times), never a key, and it
serialises deploy/undeploy of one ``chat_name`` across gunicorn workers.
It lives in the cluster, so restarting the gateway loses nothing.
"""
from __future__ import annotations

import platform
import time
from typing import Optional

import ray

REGISTRY_NAME = "endpoint_registry"


@ray.remote(num_cpus=0, max_restarts=-1)
class EndpointRegistry:
    def __init__(self) -> None:
        self._records: dict[str, dict] = {}
        self._busy: dict[str, float] = {}

    def versions(self) -> dict:
        return {"ray": ray.__version__, "python": platform.python_version()}

    def get(self, name: str) -> Optional[dict]:
        return self._records.get(name)

    def list(self) -> list[dict]:
        return list(self._records.values())

    def begin(self, name: str, provider: str, ttl_s: float) -> tuple[str, Optional[dict]]:
        """Claim ``name`` for a deploy/undeploy: ("ok", record) | ("conflict", record) | ("busy", None)."""
        record = self._records.get(name)
        if record is not None and record["provider"] != provider:
            return "conflict", record
        if self._busy.get(name, 0.0) > time.time():
            return "busy", None
        self._busy[name] = time.time() + ttl_s
        return "ok", record

    def finish(self, name: str, record: Optional[dict]) -> None:
        """Release ``name``; store ``record``, or forget the endpoint when it is None."""
        self._busy.pop(name, None)
        if record is None:
            self._records.pop(name, None)
        else:
            self._records[name] = record

    def release(self, name: str) -> None:
        self._busy.pop(name, None)
