"""``python -m gateway status``, run as the real command: the answer when no gateway runs, and what it
shows of a running cluster (nodes, endpoints, replicas, health), never a key, without Ray's own noise."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

from gateway.head import free_port
from gateway.ray_switches import LOOPBACK_SWITCH
from gateway.status import EXIT_NO_ANSWER, EXIT_NOT_RUNNING
from tests.procs import ROOT


def run_status(*args: str, **env_extra: str) -> tuple[subprocess.CompletedProcess, float]:
    """The command as a user runs it: none of the test session's Ray switches or gateway settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", LOOPBACK_SWITCH):  # the command needs neither switch
        env.pop(name, None)
    env.update(env_extra)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "gateway", "status", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    print(f"$ {' '.join(f'{k}={v}' for k, v in env_extra.items())} python -m gateway status {' '.join(args)}"
          f"\n(exit {proc.returncode}, {elapsed:.2f} s)\n{proc.stdout}{proc.stderr}")
    return proc, elapsed


def test_nothing_listening_is_no_gateway_running():
    port = free_port()
    proc, _ = run_status(GATEWAY_RAY_PORT=str(port))
    assert proc.returncode == EXIT_NOT_RUNNING == 3
    assert proc.stdout.startswith(f"no gateway is running at 127.0.0.1:{port}")
    assert "make start" in proc.stdout and "RAY_ADDRESS" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr and proc.stderr == ""

    proc, _ = run_status("--json", RAY_ADDRESS=f"127.0.0.1:{port}")
    report = json.loads(proc.stdout)
    assert proc.returncode == EXIT_NOT_RUNNING
    assert report["running"] is False and report["address"] == f"127.0.0.1:{port}"
    assert report["problem"].startswith(f"no Ray cluster is running at 127.0.0.1:{port} (RAY_ADDRESS)")


def test_a_port_held_by_something_else_is_no_ray_head():
    """Redis on 6379, say: one line that says so, not a traceback after Ray's retries."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"-ERR unknown command 'PRI'\r\n")

    threading.Thread(target=serve, daemon=True).start()
    try:
        port = listener.getsockname()[1]
        proc, _ = run_status(GATEWAY_RAY_PORT=str(port))
    finally:
        listener.close()
    assert proc.returncode == EXIT_NO_ANSWER == 4
    assert proc.stdout.startswith(f"something listens at 127.0.0.1:{port}") and "not a Ray head" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_status_of_a_running_cluster(ray_head, app, deploy, name, fake_openai):
    chat_name, key = name("status"), f"sk-status-{os.urandom(8).hex()}"
    r = deploy(chat_name, key, workers=1)
    assert r.status_code == 200, r.get_json()

    # the embedded head's port, as `make status` looks at it: no RAY_AUTH_MODE, no loopback switch
    port = ray_head.address.rpartition(":")[2]
    proc, _ = run_status(GATEWAY_RAY_PORT=port)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert out.startswith(f"Ray cluster at {ray_head.address}")
    assert "127.0.0.1  head  alive" in out
    row = next(line for line in out.splitlines() if line.strip().startswith(chat_name))
    assert row.split()[1:5] == ["openai", "gpt-4o-mini", "RUNNING", "1/1"], row
    assert "1 running on 127.0.0.1" in row and row.rstrip().endswith("ok"), row
    # the answer only: none of Ray's log lines or warnings
    assert proc.stderr == "" and "INFO" not in out and "WARNING" not in out and "Traceback" not in out
    assert key not in out

    # a cluster joined with RAY_ADDRESS, as JSON; the endpoint in a cooldown, as the gateway records one
    # after a rejected key (cooldown_failures/window/s: 3, 60 s, 30 s)
    import ray

    registry = app.extensions["gateway"].cluster.registry()
    ray.get(registry.record_failure.remote(chat_name, "upstream_auth", True, 3, 60.0, 30.0))
    proc, _ = run_status("--json", RAY_ADDRESS=ray_head.address, RAY_AUTH_MODE="token")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["running"] is True and report["address"] == ray_head.address and report["registry"] is True
    head = next(n for n in report["nodes"] if n["head"])
    assert head["alive"] and head["ip"] == "127.0.0.1" and head["cpus"] > 0
    endpoint = next(e for e in report["endpoints"] if e["chat_name"] == chat_name)
    assert endpoint["provider"] == "openai" and endpoint["model"] == "gpt-4o-mini" and endpoint["status"] == "RUNNING"
    assert endpoint["workers_running"] == endpoint["workers"] == 1
    assert [(r["state"], r["node_ip"], r["node_id"]) for r in endpoint["replicas"]] == [("RUNNING", "127.0.0.1", head["node_id"])]
    assert endpoint["health_state"] == "cooling_down", endpoint
    assert endpoint["health"].startswith("cooling down for ") and endpoint["health"].endswith(" s after upstream_auth")
    assert 0 < int(endpoint["health"].split()[3]) <= 30
    assert key not in proc.stdout + proc.stderr
