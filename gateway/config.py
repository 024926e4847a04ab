"""The gateway's one configuration object, read from the environment.

Every field ``foo`` is read from ``GATEWAY_FOO`` (``ray_address`` from ``RAY_ADDRESS``,
Ray's own variable). Values are validated once at start; a bad value stops the start
with a message naming the variable.
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

_ENV_OVERRIDES = {"ray_address": "RAY_ADDRESS"}


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: where gunicorn (or ``python app.py``) listens
    bind: str = "127.0.0.1:8099"
    #: an existing cluster to join; unset means: start an embedded local head
    ray_address: Optional[str] = None
    #: ship ``contract/``, ``gateway/`` and ``providers/`` to the cluster (Ray ``py_modules``) so replicas can
    #: import them on nodes that lack this checkout; default: yes when joining RAY_ADDRESS
    ship_code: Optional[bool] = None
    #: Ray namespace of the gateway's own actors (the endpoint registry)
    ray_namespace: str = "llm_gateway"
    #: embedded head only: GCS port, dashboard address, CPUs, object store size
    ray_port: int = Field(6379, ge=1, le=65535)
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = Field(8265, ge=1, le=65535)
    #: where operators open the Ray dashboard (the console links to it); default: the address the
    #: cluster reports, which is right on the head's own machine (behind a proxy or an ingress, set it)
    dashboard_url: Optional[str] = Field(None, pattern=r"^https?://[^\s]+$")
    ray_num_cpus: Optional[int] = Field(None, ge=1)
    #: embedded head only: custom Ray resources its node carries, JSON (``{"cpu_pool": 100}``), for
    #: deploys that ask for them (``resources``); whole numbers, never CPU or GPU
    ray_resources: Optional[dict[str, float]] = None
    object_store_mb: int = Field(256, ge=80)
    #: seconds the embedded head gets to come up
    ray_start_timeout_s: float = Field(60.0, gt=0)
    #: embedded head only: extra variable names (``A,B``) its environment, and so every Ray worker
    #: and replica, gets besides the allow-list in ``gateway/head.py`` (never GATEWAY_*, RAY_ADDRESS)
    head_env: Optional[str] = None
    #: /healthz fails once this host's Ray node has been gone this long while the cluster answers
    #: (a Ray driver cannot work without it; restarting the pod runs its ``ray start`` again)
    liveness_grace_s: float = Field(60.0, gt=0)
    #: HTTP: request body limit; gunicorn worker processes (each serves the chat routes on its event loop)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    workers: int = Field(2, ge=1, le=64)
    #: threads per worker for the routes that are not chat calls (deploy, undeploy, listings, console,
    #: /metrics): Flask, through a WSGI adapter; chat calls never take one
    threads: int = Field(32, ge=1, le=1024)
    #: chat calls (streams and broadcasts' calls included) one gateway process holds at once: each is a
    #: coroutine on the worker's event loop, not a thread
    max_calls: int = Field(4096, ge=1)
    #: the bulkhead: calls one endpoint may have in flight in one gateway process; past it a call
    #: waits (below), then goes to the next fallback or answers 503 endpoint_busy.
    #: Default: three quarters of ``max_calls`` (the rest stays free for other endpoints)
    endpoint_max_in_flight: Optional[int] = Field(None, ge=1)
    #: a call that finds its endpoint's seats (or the process's calls) all taken waits this long for one,
    #: in a queue of at most ``endpoint_queue`` calls per endpoint; a full queue refuses at once
    endpoint_queue: int = Field(512, ge=0)
    endpoint_queue_s: float = Field(2.0, ge=0)
    #: slow or idle clients: open connections per worker (past it only /healthz and /readyz are
    #: answered, the rest 503), the request head's deadline (request line and headers), the body's
    #: least rate once its head is in (bytes per second, averaged, after the head's deadline as grace),
    #: the TLS handshake's deadline, and how long an idle kept-alive connection stays open
    max_connections: int = Field(8192, ge=16)
    header_timeout_s: float = Field(10.0, gt=0)
    body_min_rate: int = Field(1024, ge=1)
    tls_handshake_s: float = Field(10.0, gt=0)
    keepalive_s: float = Field(5.0, gt=0)
    #: Serve options of SaaS replicas: I/O-bound, a sliver of a CPU, many calls each
    saas_replica_cpus: float = Field(0.05, gt=0)
    saas_max_ongoing_requests: int = Field(2048, ge=1)
    #: how long a deploy request waits for its replicas; later it answers 202 DEPLOYING and the
    #: deploy goes on (each endpoint's ``deploy_timeout`` decides when it has failed)
    deploy_wait_s: float = Field(60.0, gt=0)
    #: a deploy's, an undeploy's and the endpoints file's lease (one process at a time) lasts this long
    #: without a renewal (renewed every third of it): a holder killed with kill -9 frees it within it
    lease_ttl_s: float = Field(15.0, ge=3, le=300)
    #: gateway -> replica calls over the replica's gRPC server (Serve's fast path; every node's
    #: replicas must be reachable on it from the gateway's nodes), else as Ray actor calls
    serve_grpc: bool = True
    #: how long a worker caches what it learnt about an endpoint (provider, model, health)
    endpoint_cache_s: float = Field(2.0, ge=0)
    #: a provider's Retry-After is waited out up to this; longer, the 429 goes to the caller
    retry_after_cap_s: float = Field(10.0, ge=0)
    #: cooldown: this many upstream failures in a row within the window (or one auth/quota
    #: failure) and the endpoint is skipped for cooldown_s; then one request probes it
    cooldown_failures: int = Field(3, ge=1)
    cooldown_window_s: float = Field(60.0, gt=0)
    cooldown_s: float = Field(30.0, ge=0)

    #: where gunicorn listens with TLS: PEM certificate (chain) and its private key; both or neither
    certfile: Optional[str] = None
    keyfile: Optional[str] = None
    #: host names callers may use besides loopback names and IP addresses (``gw.example.com``,
    #: ``.example.com`` for its subdomains, ``*`` for any); see ``gateway/doors.py``
    allowed_hosts: Optional[str] = None
    #: web origins that may call the gateway from a browser (``https://tools.example.com``)
    allowed_origins: Optional[str] = None
    #: the URL people open the gateway at when a proxy in front of it terminates TLS
    #: (``https://gw.example.com``): its origin and host are the gateway's own, so the console works there
    public_url: Optional[str] = Field(None, pattern=r"^https?://[^\s/]+/?$")

    #: admin token for deploy/undeploy/listings/metrics; a network bind needs it
    admin_token: Optional[SecretStr] = None
    #: read-only token for ``/metrics`` (and the details of ``/readyz``), for Prometheus
    metrics_token: Optional[SecretStr] = None
    #: client keys for chat routes: ``key1,key2`` and/or a YAML/JSON file of scoped, rate-limited keys
    api_keys: Optional[SecretStr] = None
    api_keys_file: Optional[str] = None
    #: a network bind without client keys, on purpose: anyone who reaches it may chat
    allow_open_chat: bool = False
    #: endpoints to deploy on start (and again after a cluster restart); keys come from env vars
    endpoints_file: Optional[str] = None
    #: where the client-key limits keeper keeps its ledger of usage and budgets (``usage.sqlite3``), on the
    #: head node: resolved there, by the keeper's process (default ``~/.local/state/llm_gateway``; on
    #: Kubernetes, a persistent volume of the head pod). The first gateway process that makes the keeper decides
    state_dir: Optional[str] = None
    #: what a call to a budgeted client key reserves for its answer when it sets no ``max_tokens``
    budget_default_max_tokens: int = Field(1024, ge=1, le=1_000_000)

    @field_validator("ray_resources", mode="before")
    @classmethod
    def _ray_resources(cls, value):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise ValueError('must be a JSON object of resource names and amounts, e.g. {"cpu_pool": 100}') from None
        if value is not None and not isinstance(value, dict):
            raise ValueError('must be a JSON object of resource names and amounts, e.g. {"cpu_pool": 100}')
        if value is not None:
            from providers.specs import check_resources

            value = check_resources(value, whole=True)
        return value or None

    @model_validator(mode="after")
    def _tls_pair(self) -> "Settings":
        if bool(self.certfile) != bool(self.keyfile):
            raise ValueError("GATEWAY_CERTFILE and GATEWAY_KEYFILE go together: set both or neither")
        return self

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None, **overrides) -> "Settings":
        env = os.environ if env is None else env
        values: dict = {}
        for name in cls.model_fields:
            var = _ENV_OVERRIDES.get(name, "GATEWAY_" + name.upper())
            if env.get(var, "") != "":
                values[name] = env[var]
        values.update(overrides)
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = "; ".join(
                (f"{_ENV_OVERRIDES.get(str(e['loc'][0]), 'GATEWAY_' + str(e['loc'][0]).upper())}: " if e["loc"] else "")
                + e["msg"].removeprefix("Value error, ") for e in exc.errors(include_input=False)
            )
            raise SystemExit(f"gateway configuration is invalid: {problems}") from None

    @property
    def endpoint_seats(self) -> int:
        """Calls one endpoint may have in flight in one process (see ``endpoint_max_in_flight``)."""
        return self.endpoint_max_in_flight or max(1, self.max_calls * 3 // 4)

    @property
    def embedded(self) -> bool:
        return not self.ray_address

    def check_bind(self, addresses=None) -> None:
        """Refuse a network address without an admin token and client keys (``doors.check_listeners``).

        ``addresses``: where the server really listens; default ``GATEWAY_BIND``.
        """
        from .auth import load_keys
        from .doors import check_listeners

        # the keys as loaded (a bad entry stops the start here, once): an empty file is no keys
        keys = load_keys(self.api_keys.get_secret_value() if self.api_keys else None, self.api_keys_file)
        check_listeners([self.bind] if addresses is None else addresses, admin_token=self.admin_token is not None,
                        client_keys=bool(keys), open_chat=self.allow_open_chat)
