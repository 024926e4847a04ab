"""Helpers to run the gateway's real processes in tests."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from gateway.cluster import free_port

ROOT = Path(__file__).resolve().parent.parent


def start(cmd: list[str], env_extra: dict, log_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.pop("RAY_ADDRESS", None)
    env.update(env_extra)
    out = open(log_path, "wb")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(base: str, proc: subprocess.Popen, log_path: Path, limit: float = 120) -> dict:
    deadline = time.monotonic() + limit
    last = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            r = httpx.get(base + "/readyz", timeout=10)
            last = r.json()
            if r.status_code == 200:
                return last
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"not ready: {last}\n{log_path.read_text()[-3000:]}")


def stop(proc: subprocess.Popen, limit: float = 60) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def gunicorn_joined_to(head_address: str, log_path: Path, **env: str):
    """Start gunicorn joined to a cluster; yields (base URL, process, log path)."""
    port = free_port()
    proc = start(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"],
        {"RAY_ADDRESS": head_address, "GATEWAY_BIND": f"127.0.0.1:{port}", "GATEWAY_WORKERS": "2", "GATEWAY_THREADS": "8",
         **env},
        log_path,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, log_path)
        yield base, proc, log_path
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


