"""What ``GET /deployments`` shows of an endpoint: its record, Serve's state of its application, a deploy's
progress, and why workers are missing. Pure: the caller reads the registry and Serve, and passes both in
(``python -m gateway status`` shows the same views).
"""
from __future__ import annotations

import time
from typing import Optional

from .records import EndpointRecord
from .serve_apps import deployment_view, message_of, status_of


def view(record: Optional[EndpointRecord], app, name: Optional[str] = None, replicas: Optional[list[dict]] = None) -> dict:
    """What ``GET /deployments`` shows of one endpoint: the record, Serve's state, progress.

    With ``replicas`` (``serve_state``): each worker's state and node (``replicas``), and when fewer
    run than wanted, how many and why (``workers_missing``: ``{"count", "why"}``).
    """
    shown = record.to_dict() if record is not None else {"chat_name": name}
    shown.pop("pending", None)
    pending = record.pending_deploy if record is not None else None
    if record is not None and record.status == "DEPLOY_FAILED":
        shown["workers_running"] = 0
        return shown
    if app is None:
        shown.update(status="MISSING", workers_running=0)
        return shown
    deployment, running = deployment_view(app)
    shown.setdefault("provider", deployment)
    shown["workers_running"] = running
    if replicas is not None:
        shown["replicas"] = [dict(r) for r in replicas]
        if pending:
            wanted, resources = pending.workers, pending.resources
        else:
            wanted, resources = (record.workers, record.resources) if record is not None else (None, None)
        missing = workers_missing(wanted, replicas, message_of(app), resources)
        if missing:
            shown["workers_missing"] = missing
    if pending:
        shown["status"] = "DEPLOYING" if pending.fresh else "UPDATING"
        shown["progress"] = {"workers_running": running, "workers": pending.workers,
                             "elapsed_s": round(time.time() - pending.started, 1),
                             "deadline_in_s": round(pending.deadline - time.time(), 1),
                             "message": message_of(app)[:500]}
        if not pending.fresh:
            shown["pending_digest"] = pending.digest
    else:
        shown["status"] = status_of(app.status)
    return shown


#: the states of a replica that is on its way to running
_COMING = ("STARTING", "UPDATING", "RECOVERING")


def workers_missing(wanted: Optional[int], replicas: list[dict], serve_said: str = "",
                    resources: Optional[dict] = None) -> Optional[dict]:
    """``{"count", "why"}`` when fewer of ``replicas`` run than ``wanted``, else None. Pure: no cluster.

    Why, in words: workers no node took yet (a replica Serve started but Ray has not placed: no live
    node has the free resources it needs; Serve's own words follow once it says more), workers starting
    on their nodes (loading), workers Serve has not started yet (or stopping ones).
    """
    running = sum(1 for r in replicas if r.get("state") == "RUNNING")
    if not wanted or running >= wanted:
        return None
    count = wanted - running
    unplaced = [r for r in replicas if r.get("state") in _COMING and not r.get("node_id")]
    starting = [r for r in replicas if r.get("state") in _COMING and r.get("node_id")]
    why = []
    if unplaced:
        needs = f" (custom resources: {', '.join(f'{k} {v:g}' for k, v in sorted(resources.items()))})" if resources else ""
        why.append(f"{len(unplaced)} pending: no live node has the free resources each worker needs{needs}; "
                   f"`ray status` shows what the nodes have")
        said = " ".join(serve_said.split())
        if "schedul" in said:  # (Serve's words on replicas it could not place: what each needs, what is free)
            why.append(f"Serve says: {said[:400]}")
    if starting:
        ips = sorted({r.get("node_ip") or "?" for r in starting})
        why.append(f"{len(starting)} starting on {', '.join(ips)}")
    rest = count - len(unplaced) - len(starting)
    if rest > 0:
        why.append(f"{rest} not started by Serve yet")
    return {"count": count, "why": "; ".join(why)}
