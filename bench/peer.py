"""LiteLLM's proxy as the peer gateway, in a virtual environment of its own (it cannot share ours).

Installed on first use into ``bench/.peer-venv`` (ignored by git) from PyPI, configured with the
same fake upstreams, started with 2 workers like the gateway, in a session of its own (like the
gateway's gunicorn) so that its process tree can be measured and stopped as a whole.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

LITELLM = "litellm[proxy]==1.106.0"  # the version the issue measured; newer ones need a certifi the registry lacks
VENV = Path(__file__).resolve().parent / ".peer-venv"


def ensure_venv() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    if subprocess.run([str(python), "-c", "import litellm"], capture_output=True).returncode != 0:
        subprocess.run([str(python), "-m", "pip", "install", "-q", LITELLM], check=True)
    return VENV / "bin" / "litellm"


def start_litellm(fast_url: str, slow_url: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    exe = ensure_venv()
    from .__main__ import free_port

    config = workdir / "litellm.tmp.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: bench\n    litellm_params: {{model: openai/gpt-4o-mini, api_base: {fast_url}, api_key: sk-bench}}\n"
        f"  - model_name: bench-slow\n    litellm_params: {{model: openai/gpt-4o-mini, api_base: {slow_url}, api_key: sk-bench, timeout: 60}}\n"
        "general_settings:\n  master_key: sk-bench-master\n"
        "litellm_settings:\n  num_retries: 0\n"
    )
    port = free_port()
    log = open(workdir / "litellm.log.tmp", "wb")
    proc = subprocess.Popen([str(exe), "--config", str(config), "--port", str(port), "--num_workers", "2"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health/liveliness", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_litellm(proc)
    raise SystemExit("LiteLLM did not start; see bench/results/litellm.log.tmp")


def stop_litellm(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM to LiteLLM's process group (the proxy and its workers), SIGKILL to it after ``grace``."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        # the leader is gone; its workers (same group) may still be exiting
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
