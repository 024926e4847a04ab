"""The child of ``python -m gateway status``: read the cluster as a Ray driver, and answer in JSON.

``python -m gateway.status_probe ADDRESS NAMESPACE`` connects as a gateway process does (the parent,
``gateway.status``, gives it the environment), reads the nodes, the endpoint registry's records and
Serve's applications, and writes one JSON object on its stdout: the report, or ``{"problem"}`` and exit
``EXIT_NO_ANSWER``. Ray's own output goes to its stderr, which the parent keeps from the answer. Only the
fields chosen here (``endpoint_view``) leave it: nothing of a key, not even its fingerprint. It only
looks: its Ray calls are ``gateway.actors``' (``looking_at``, ``find_actor``: the registry is never made here).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

from .status import EXIT_NO_ANSWER, EXIT_OK


class _ReadFailed(Exception):
    """Connected, but a read failed (not a connect error)."""


def probe(address: str, namespace: str) -> dict:
    """What the cluster at ``address`` runs: nodes, endpoints (as ``GET /deployments`` shows them), replicas."""
    import warnings

    warnings.simplefilter("ignore")
    from . import actors  # (Ray, imported after the filter)

    with actors.looking_at(address, namespace) as context:
        try:
            return _read(namespace, context)
        except Exception as exc:  # noqa: BLE001 - connected: not a connect error
            text = str(exc).strip()
            first = text.splitlines()[0][:200] if text else ""
            raise _ReadFailed(f"connected to the Ray cluster at {address}, but reading it failed: "
                              f"{actors.reason(exc)}{': ' + first if first else ''}") from None


def _read(namespace: str, context) -> dict:
    from . import actors
    from .endpoint_views import view
    from .records import EndpointRecord
    from .serve_apps import serve_state
    from .registry import REGISTRY_NAME

    registry = actors.find_actor(REGISTRY_NAME, namespace)  # never created here
    records = actors.call(registry, "list", timeout=5) if registry is not None else []

    apps, replicas = serve_state(5)  # (read from a running Serve controller only: none running is no applications)
    by_name = {r["chat_name"]: r for r in records}
    report = {"dashboard_url": _dashboard_url(context), "nodes": _nodes(), "registry": registry is not None}
    report["endpoints"] = [
        endpoint_view(view(EndpointRecord.from_dict(by_name[name]) if name in by_name else None, apps.get(name), name),
                      by_name.get(name), replicas.get(name, []))
        for name in sorted(set(by_name) | set(apps))
    ]
    return report


def _dashboard_url(context) -> Optional[str]:
    url = getattr(context, "dashboard_url", None) or None
    return url if url is None or "://" in url else f"http://{url}"


def _nodes() -> list[dict]:
    from . import actors

    nodes = []
    for n in actors.nodes():
        res = n.get("Resources") or {}
        nodes.append({"node_id": n.get("NodeID"), "ip": n.get("NodeManagerAddress"), "alive": bool(n.get("Alive")),
                      "head": actors.HEAD_NODE_RESOURCE in res, "cpus": res.get("CPU", 0), "gpus": res.get("GPU", 0)})
    nodes.sort(key=lambda n: (not n["alive"], not n["head"], n["ip"] or ""))
    return nodes


def health_words(health: Optional[dict], now: Optional[float] = None) -> str:
    """The registry's health view of an endpoint, in words."""
    if not health:
        return "unknown"
    now = time.time() if now is None else now
    state, last = health.get("state"), health.get("last_error")
    if state == "ok":
        failures = health.get("consecutive_failures") or 0
        return "ok" if not failures else f"ok ({failures} recent failure{'s' * (failures != 1)}, the last {last})"
    if state == "cooling_down":
        left = max(0, round((health.get("cooldown_until") or now) - now))
        return f"cooling down for {left} s" + (f" after {last}" if last else "")
    if state == "probing":
        return "probing: one request tries it again" + (f" (cooled down after {last})" if last else "")
    if state == "probe_due":
        return "cooldown over: the next request tries it again" + (f" (cooled down after {last})" if last else "")
    return str(state)


def endpoint_view(view: dict, record: Optional[dict], replicas: list[dict]) -> dict:
    """What ``status`` shows of one endpoint (chosen fields only: nothing of a key, not even its fingerprint)."""
    progress = view.get("progress") or {}
    wanted = progress.get("workers", view.get("workers"))
    failure = view.get("failure") or view.get("last_update_failure")
    # the health of calls to it: of an endpoint that serves (or serves while it updates), else none
    serving = view.get("status") not in ("DEPLOY_FAILED", "MISSING", "DEPLOYING")
    health = ("unknown (not in the registry)" if record is None else health_words(view.get("health"))) if serving else "-"
    out = {
        "chat_name": view.get("chat_name"), "provider": view.get("provider"), "model": view.get("model"),
        "status": view.get("status"), "workers_running": view.get("workers_running", 0), "workers": wanted,
        "replicas": replicas, "health": health, "health_state": (view.get("health") or {}).get("state") if serving else None,
        "fallbacks": list(view.get("fallbacks") or []), "base_url_host": view.get("base_url_host"),
    }
    if failure:
        out["problem"] = str(failure.get("message") or failure.get("reason"))[:300]
    if progress:
        out["deploying_for_s"] = progress.get("elapsed_s")
        out["deadline_in_s"] = progress.get("deadline_in_s")
    return out


def _probe_main(argv: list[str]) -> int:
    """The child: the report (or why none) as JSON on the original stdout; Ray's output goes to stderr."""
    address, namespace = argv
    report_fd = os.dup(1)
    os.dup2(2, 1)  # whatever Ray prints goes where the parent does not read the answer
    try:
        report, code = probe(address, namespace), EXIT_OK
    except _ReadFailed as exc:
        report, code = {"problem": str(exc)}, EXIT_NO_ANSWER
    except Exception as exc:  # noqa: BLE001 - say why, in words
        from .cluster_answers import describe_connect_error

        report, code = {"problem": describe_connect_error(exc, address)}, EXIT_NO_ANSWER
    with os.fdopen(report_fd, "w") as out:
        out.write(json.dumps(report, default=str))
    sys.stdout.flush()
    os._exit(code)  # (Ray's exit handlers have nothing left to do)


if __name__ == "__main__":
    _probe_main(sys.argv[1:])
