"""How ``python -m gateway status`` prints its report without ``--json``: a short human table.

The report is what ``gateway.status`` gathered (and ``--json`` prints as it is): the cluster's nodes,
then its endpoints with their replicas, health and problems, one line each.
"""
from __future__ import annotations


def render(report: dict) -> str:
    """The report as a short human table."""
    if not report.get("running"):
        return report.get("problem", f"no answer from {report.get('address')}")
    lines = [f"Ray cluster at {report['address']} ({report['address_from']}), namespace {report['namespace']}"
             + (f", dashboard {report['dashboard_url']}" if report.get("dashboard_url") else "")]
    nodes = report.get("nodes") or []
    alive = [n for n in nodes if n["alive"]]
    dead = [n for n in nodes if not n["alive"]]
    lines.append(f"nodes: {len(alive)} alive" + (f", {len(dead)} dead" if dead else ""))
    rows = [[n["ip"] or "?", "head" if n["head"] else "worker", "alive" if n["alive"] else "dead",
             f"{n['cpus']:g} CPU", f"{n['gpus']:g} GPU", (n["node_id"] or "")[:12]] for n in alive + dead[:5]]
    lines += _table(["IP", "ROLE", "STATE", "CPUS", "GPUS", "NODE ID"], rows)
    if len(dead) > 5:
        lines.append(f"  (and {len(dead) - 5} more dead nodes; --json lists them)")
    endpoints = report.get("endpoints") or []
    if not report.get("registry"):
        lines.append(f"endpoints: no gateway has connected to this cluster yet (no endpoint registry in namespace "
                     f"{report['namespace']})")
    else:
        lines.append(f"endpoints: {len(endpoints)}" if endpoints else "endpoints: none deployed")
    if endpoints:
        rows = [[e["chat_name"], e["provider"] or "?", e["model"] or "?", e["status"] or "?",
                 f"{e['workers_running']}/{e['workers'] if e['workers'] is not None else '?'}",
                 _replica_words(e["replicas"]), e["health"]] for e in endpoints]
        lines += _table(["CHAT_NAME", "PROVIDER", "MODEL", "STATUS", "WORKERS", "REPLICAS (NODE)", "HEALTH"], rows)
        for e in endpoints:
            if e.get("problem"):
                lines.append(f"  {e['chat_name']}: {e['problem']}")
            if e.get("deploying_for_s") is not None:
                lines.append(f"  {e['chat_name']}: deploying for {e['deploying_for_s']:.0f} s, "
                             f"its deadline in {e['deadline_in_s']:.0f} s")
    return "\n".join(lines)


def _replica_words(replicas: list[dict]) -> str:
    """``2 running on 127.0.0.1, 1 starting on 10.0.0.7`` (by state and node)."""
    if not replicas:
        return "-"
    counts: dict[tuple[str, str], int] = {}
    for r in replicas:
        key = (r["state"].lower(), r.get("node_ip") or "")
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} {state} " + (f"on {ip}" if ip else "(no node yet)")
                     for (state, ip), n in sorted(counts.items(), key=lambda kv: kv[0][0] != "running"))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    return ["  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]

