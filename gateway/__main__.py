"""``python -m gateway apply FILE [--url URL]``: apply an endpoints file to a running gateway.
``python -m gateway ray ARGS...``: run Ray's CLI (``ray start --address=...`` in a gateway pod) with
the allow-listed environment the embedded head gets, so the node's raylet and workers never see the
gateway's tokens and provider keys.
``python -m gateway status [--json] [--timeout S]``: is a gateway running here (or its cluster at
``RAY_ADDRESS``), and what runs on it: nodes; endpoints, their replicas and health. Exit 0; 3 when
nothing runs there; 4 when it cannot be read (see ``gateway/status.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .apply import apply_over_http


def default_url(env) -> str:
    """The gateway this machine runs (``GATEWAY_BIND``); a wildcard bind is reached on loopback.

    https:// when it serves TLS (``GATEWAY_CERTFILE``): keys never travel in plain text.
    """
    host, _, port = env.get("GATEWAY_BIND", "127.0.0.1:8099").rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    return f"{'https' if env.get('GATEWAY_CERTFILE') else 'http'}://{host}:{port}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["ray"]:  # everything after it is Ray's, options included
        return run_ray(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    p_apply = sub.add_parser("apply", help="deploy what an endpoints file lists (idempotent); keys come from env vars")
    p_apply.add_argument("file")
    p_apply.add_argument("--url", default=None, help="the gateway: https://..., or http:// to loopback only "
                                                      "(default: GATEWAY_BIND on this machine)")
    p_status = sub.add_parser("status", help="the cluster's nodes and the endpoints (replicas, health); "
                                             "exit 3 when no gateway runs there, 4 when it cannot be read")
    p_status.add_argument("--json", action="store_true", help="print the same as one JSON object")
    p_status.add_argument("--timeout", type=float, default=None, metavar="S",
                          help="give up after S seconds in all (default 15)")
    args = parser.parse_args(argv)
    if args.command == "status":
        from . import status

        return status.main(as_json=args.json, timeout=args.timeout or status.DEFAULT_TIMEOUT_S)
    url = args.url or default_url(os.environ)
    reports = apply_over_http(url, args.file, os.environ.get("GATEWAY_ADMIN_TOKEN"))
    for report in reports:
        print(json.dumps(report, ensure_ascii=False))
    return 1 if any(r["status"] == "error" for r in reports) else 0


def run_ray(ray_args: list[str]) -> int:
    """Replace this process with ``ray ARGS`` in the environment a Ray node may see (``GATEWAY_HEAD_ENV`` adds names)."""
    from pathlib import Path

    from .head import ray_environment

    env = ray_environment(os.environ, os.environ.get("GATEWAY_HEAD_ENV"), os.environ.get("GATEWAY_ENDPOINTS_FILE"))
    ray_exe = Path(sys.executable).with_name("ray")
    exe = str(ray_exe) if ray_exe.exists() else "ray"
    os.execvpe(exe, [exe, *ray_args], env)
    return 127  # (not reached)


if __name__ == "__main__":
    sys.exit(main())
