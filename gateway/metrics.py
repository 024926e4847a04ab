"""Prometheus metrics of the gateway process(es) and the JSON access log.

Under gunicorn every worker writes its samples to ``PROMETHEUS_MULTIPROC_DIR`` (set by
``gunicorn.conf.py`` before any worker starts, cleaned of dead workers by its
``child_exit`` hook, removed on exit when the master made it) and ``/metrics`` merges them.
Only the gateway's processes write there: the variable never reaches the Ray head (its
environment is an allow-list, ``gateway/head.py``), so Ray's own metrics stay on Ray's
endpoint. A single process (``python app.py``,
tests) uses the default registry. Label values are bounded: ``chat_name`` and
``provider`` are only ever those of deployed endpoints (``_unknown`` otherwise), ``outcome``
is ``ok`` or a type of ``contract.errors.TYPES``, ``fault`` follows from ``outcome`` (so it
adds no series), and no label carries prompt text, a key or other user input.

Whose fault: an error the caller caused (``contract.errors.CALLER_ERRORS``: a bad body, a name
or model nobody deployed, a key that may not, its own rate limit ...) is not a failure of the
endpoint it asked for. ``gateway_requests_total`` says which with its ``fault`` label
(``none``, ``caller``, ``endpoint``), and an endpoint's ``traffic`` counts the two apart
(``errors``: the endpoint's failures; ``caller_errors``: its callers' mistakes).
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import time
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from contract.errors import fault

UNKNOWN = "_unknown"

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_OVERHEAD = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)

REQUESTS = Counter("gateway_requests_total", "Requests by route, endpoint and outcome (ok or the error type); "
                   "fault: none (ok), caller (the caller's error) or endpoint (the endpoint, its provider, "
                   "its cluster or the gateway failed)", ["route", "chat_name", "provider", "outcome", "fault"])
REQUEST_SECONDS = Histogram("gateway_request_duration_seconds", "Time from request to answer (to the last byte for streams)",
                            ["chat_name", "provider"], buckets=_LATENCY)
UPSTREAM_SECONDS = Histogram("gateway_upstream_duration_seconds", "Time spent in the replica on the upstream call, retries included",
                             ["chat_name", "provider"], buckets=_LATENCY)
OVERHEAD_SECONDS = Histogram("gateway_overhead_seconds", "The gateway's own time: request time minus upstream time",
                             ["route"], buckets=_OVERHEAD)
TTFT_SECONDS = Histogram("gateway_time_to_first_token_seconds", "Streams: time from request to the first event",
                         ["chat_name", "provider"], buckets=_LATENCY)
TOKENS = Counter("gateway_tokens_total", "Tokens by endpoint and kind (prompt, completion)", ["chat_name", "provider", "kind"])
RETRIES = Counter("gateway_upstream_retries_total", "Upstream calls beyond the first, by endpoint", ["chat_name", "provider"])
FALLBACKS = Counter("gateway_fallbacks_total", "Moves to a fallback endpoint, by where from, where to and why",
                    ["from", "to", "reason"])
IN_FLIGHT = Gauge("gateway_in_flight_requests", "Requests being served now", ["route"], multiprocess_mode="livesum")
# client keys with a token limit or a budget (``gateway.reservations``), labelled by the key's name (never the key):
CLIENT_TOKENS = Counter("gateway_client_tokens_total", "Tokens charged to client keys with a token limit or budget, by "
                        "key name and direction (in, out)", ["client_key", "direction"])
CLIENT_SPEND = Counter("gateway_client_spend_total", "Spend charged to client keys with a token limit or budget, at the "
                       "endpoints' prices (per million tokens), by key name", ["client_key"])
BUDGET_REFUSALS = Counter("gateway_budget_refusals_total", "Calls refused for a client key's budget (budget_exceeded), by "
                          "key name and budget (tokens_per_day, tokens_per_month, spend_per_month)", ["client_key", "budget"])


#: the files prometheus-client's multiprocess mode writes (``counter_123.db``, ``gauge_livesum_123.db`` ...)
_SAMPLE_FILE = re.compile(r"^(?:counter|histogram|summary|gauge_[a-z]+)_\d+\.db$")


def clear_samples(path: str) -> int:
    """Remove a previous run's sample files from an operator's ``PROMETHEUS_MULTIPROC_DIR`` (they are not
    this run's) and nothing else: the directory and any other file in it stay. How many were removed."""
    os.makedirs(path, exist_ok=True)
    removed = 0
    for entry in os.scandir(path):
        if entry.is_file(follow_symlinks=False) and _SAMPLE_FILE.match(entry.name):
            os.unlink(entry.path)
            removed += 1
    return removed


def _registry():
    """Every worker's samples (gunicorn: the multiprocess directory), or this process's."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    from prometheus_client import REGISTRY

    return REGISTRY


def no_traffic() -> dict[str, int]:
    """The traffic of an endpoint this gateway has not served yet."""
    return {"requests": 0, "errors": 0, "caller_errors": 0, "prompt_tokens": 0, "completion_tokens": 0}


def traffic() -> dict[str, dict[str, int]]:
    """Per endpoint, since this gateway started (all its workers): requests, errors, caller errors, prompt and
    completion tokens.

    ``errors`` are the endpoint's failures (the provider's, the endpoint's, its cluster's, the
    gateway's); ``caller_errors`` the calls refused for what the caller did (``errors.fault``);
    ``requests`` counts both and the answered ones. The same counters ``/metrics`` exports
    (``gateway_requests_total``, ``gateway_tokens_total``), summed over routes; what
    ``GET /deployments`` shows as each endpoint's ``traffic``.
    """
    out: dict[str, dict[str, int]] = {}

    def row(name: str) -> dict[str, int]:
        return out.setdefault(name, no_traffic())

    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    try:
        if directory:  # the counters' files only (histograms are most of the bytes): ~1 ms, not ~20
            from prometheus_client import multiprocess

            families = multiprocess.MultiProcessCollector.merge(glob.glob(os.path.join(directory, "counter_*.db")))
        else:
            families = list(_registry().collect())
    except Exception as exc:  # noqa: BLE001 - a listing never fails because of its counters
        logging.getLogger("gateway.metrics").warning("could not read the traffic counters: %s", type(exc).__name__)
        return {}
    for family in families:
        if family.name not in ("gateway_requests", "gateway_tokens"):
            continue
        for sample in family.samples:
            name = sample.labels.get("chat_name")
            if not sample.name.endswith("_total") or name in (None, UNKNOWN):
                continue
            counts = row(name)
            if family.name == "gateway_requests":
                counts["requests"] += int(sample.value)
                whose = fault(sample.labels.get("outcome"))  # (from the outcome: the fault label follows from it)
                if whose != "none":
                    counts["caller_errors" if whose == "caller" else "errors"] += int(sample.value)
            else:
                counts[f"{sample.labels.get('kind')}_tokens"] += int(sample.value)
    return out


def render(endpoints_snapshot) -> bytes:
    """The ``/metrics`` text: every worker's samples plus the endpoints gauge, read now."""
    registry = _registry()
    collector = _EndpointsCollector(endpoints_snapshot)
    registry.register(collector)
    try:
        return generate_latest(registry)
    finally:
        registry.unregister(collector)


class _EndpointsCollector:
    """``gateway_endpoints{provider,state}``: counted from the registry at scrape time."""

    def __init__(self, snapshot) -> None:
        self.snapshot = snapshot

    def collect(self):
        family = GaugeMetricFamily("gateway_endpoints", "Deployed endpoints by provider and state "
                                   "(RUNNING, DEPLOYING, ..., or COOLING_DOWN)", labels=["provider", "state"])
        counts: dict[tuple[str, str], int] = {}
        try:
            rows = self.snapshot()
        except Exception:  # noqa: BLE001 - a scrape never fails because Ray is down
            rows = []
        for row in rows:
            state = str(row.get("status") or "UNKNOWN")
            if (row.get("health") or {}).get("state") in ("cooling_down", "probing", "probe_due"):
                state = "COOLING_DOWN"
            key = (str(row.get("provider") or UNKNOWN), state)
            counts[key] = counts.get(key, 0) + 1
        for (provider, state), n in sorted(counts.items()):
            family.add_metric([provider, state], n)
        yield family
        yield key_calls(rows)


def key_calls(rows: list[dict]):
    """``gateway_upstream_key_calls_total{chat_name, key, outcome}``: each pool key's upstream calls by outcome
    (``ok`` or the error type), rotations included, as the key pools keeper counts them for the whole cluster
    (``gateway.pool_keeper``). ``key`` is the key's fingerprint (``sk-...a1b2``), never the key."""
    from prometheus_client.core import CounterMetricFamily

    family = CounterMetricFamily("gateway_upstream_key_calls", "Upstream calls by endpoint, key fingerprint and "
                                 "outcome (ok or the error type), for the whole cluster", labels=["chat_name", "key", "outcome"])
    for row in rows:
        for view in row.get("keys") if isinstance(row.get("keys"), list) else []:
            for outcome, n in sorted((view.get("outcomes") or {}).items()):
                family.add_metric([str(row.get("chat_name")), str(view.get("fingerprint")), outcome], n)
    return family


class RequestRecord:
    """What one request did, filled in as it goes; ``finish`` records metrics and the access log line."""

    def __init__(self, route: str, request_id: str) -> None:
        self.route = route
        self.request_id = request_id
        self.started = time.perf_counter()
        self.chat_name = UNKNOWN
        self.provider = UNKNOWN
        self.served_by: Optional[str] = None
        self.served_provider: Optional[str] = None
        self.upstream_ms: Optional[float] = None
        self.first_event_ms: Optional[float] = None
        self.attempts: Optional[int] = None
        self.usage: Optional[dict] = None
        self.tried: list[dict] = []
        self.done = False

    def endpoint(self, chat_name: str, provider: str) -> None:
        """The request's endpoint is known (deployed): only now may it become a label."""
        self.chat_name, self.provider = chat_name, provider

    def served(self, name: str, provider: str, attempts: Optional[int], usage: Optional[dict],
               upstream_ms: Optional[float], tried: list[dict]) -> None:
        self.served_by, self.served_provider = name, provider
        self.attempts, self.usage, self.upstream_ms, self.tried = attempts, usage, upstream_ms, tried

    def finish(self, status: int, error_type: Optional[str]) -> None:
        if self.done:
            return
        self.done = True
        total = time.perf_counter() - self.started
        outcome = error_type or "ok"
        name, provider = self.chat_name, self.provider
        REQUESTS.labels(self.route, name, provider, outcome, fault(error_type)).inc()
        if name != UNKNOWN:
            REQUEST_SECONDS.labels(name, provider).observe(total)
        served, served_provider = self.served_by or name, self.served_provider or provider
        if self.upstream_ms is not None and served != UNKNOWN:
            UPSTREAM_SECONDS.labels(served, served_provider).observe(self.upstream_ms / 1000)
        if self.first_event_ms is not None and served != UNKNOWN:
            TTFT_SECONDS.labels(served, served_provider).observe(self.first_event_ms / 1000)
        OVERHEAD_SECONDS.labels(self.route).observe(max(0.0, total - (self.upstream_ms or 0.0) / 1000))
        if self.usage and served != UNKNOWN:
            TOKENS.labels(served, served_provider, "prompt").inc(self.usage.get("prompt_tokens") or 0)
            TOKENS.labels(served, served_provider, "completion").inc(self.usage.get("completion_tokens") or 0)
        if self.attempts and self.attempts > 1 and served != UNKNOWN:
            RETRIES.labels(served, served_provider).inc(self.attempts - 1)
        # Moves along the fallback chain; names that never resolved (user input) are no labels.
        steps = [t for t in self.tried if t.get("type") != "not_found"]
        targets = [t["chat_name"] for t in steps[1:]] + ([self.served_by] if self.served_by else [])
        for step, target in zip(steps, targets):
            FALLBACKS.labels(step["chat_name"], target, step["type"]).inc()
        ACCESS.info(json.dumps({
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
            "request_id": self.request_id, "route": self.route, "chat_name": name, "served_by": self.served_by,
            "provider": self.served_provider or provider, "status": status, "error_type": error_type,
            "latency_ms": round(total * 1000, 2),
            "upstream_ms": None if self.upstream_ms is None else round(self.upstream_ms, 2),
            "attempts": self.attempts, "tokens": self.usage,
        }, ensure_ascii=False))


ACCESS = logging.getLogger("gateway.access")
