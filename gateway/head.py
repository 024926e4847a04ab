"""The embedded Ray head, and what of this machine's environment a Ray node may see.

``EmbeddedHead`` runs ``ray start --head --block`` as a child process (so no Ray state lives in
the gunicorn master that forks the workers) and stops exactly that head on exit. Its environment is
an allow-list (``ray_environment``): what a Ray node sees, every replica on it can read, so the
gateway's settings and the provider keys stay out; ``python -m gateway ray`` gives a joining node
the same. Nothing here imports Ray: each process's connection to the cluster is ``gateway.cluster``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping, Optional

from .config import Settings
from .ray_switches import LOOPBACK_SWITCH, ray_on_loopback
from .secrecy import CREDENTIAL, without_ptrace

#: (the logger the head's lines have always had)
log = logging.getLogger("gateway.cluster")

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _host_port(address: str) -> Optional[tuple[str, int]]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host or "127.0.0.1", int(port)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def reachable(address: str, timeout: float = 1.0) -> bool:
    """Does something accept TCP connections at ``host:port``? (``auto`` is not checked.)"""
    hp = _host_port(address)
    if hp is None:
        return True
    try:
        with socket.create_connection(hp, timeout=timeout):
            return True
    except OSError:
        return False


#: The embedded head's environment is an allow-list. ``ray start`` hands its environment to the GCS,
#: the raylet and, through the raylet, to every Ray worker and Serve replica (local models running
#: ``trust_remote_code`` included), where any code in them can read it (``/proc/<pid>/environ``).
#: So the gateway's own settings and secrets (GATEWAY_*: admin token, client keys) and the provider
#: keys the endpoints file names (any variable name) stay in the gateway. What passes, and why:
_HEAD_ENV_NAMES = frozenset({
    # running programs: where executables and shared libraries (CUDA's too) are; the home directory
    # (Ray's token in ~/.ray/auth_token, default caches); the user
    "PATH", "LD_LIBRARY_PATH", "VIRTUAL_ENV", "HOME", "USER", "LOGNAME",
    # locale, timezone, temporary files
    "LANG", "LANGUAGE", "TZ", "TZDIR", "TMPDIR", "TEMP", "TMP",
    # TLS trust (a company CA for providers and model downloads)
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    # outbound proxies: model downloads, and SDKs that take no proxy per endpoint (dashscope)
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "no_proxy", "all_proxy",
    # accelerators other than CUDA; the tokenizers' thread pool
    "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "TOKENIZERS_PARALLELISM",
})
_HEAD_ENV_PREFIXES = (
    "RAY_",  # Ray's own settings, its token included (its processes authenticate with it)
    "PYTHON",  # the interpreter's settings (PYTHONPATH is rebuilt below)
    "LC_", "XDG_",  # locale; the XDG cache/config directories (Hugging Face and torch caches live there)
    "CUDA_", "NVIDIA_", "NCCL_",  # which GPUs, the driver's container settings, collective communication
    "TORCH", "PYTORCH_", "TRITON_",  # torch/inductor/triton caches and allocator settings
    "OMP_", "MKL_", "OPENBLAS_",  # CPU thread pools
    "HF_", "HUGGINGFACE_", "HUGGING_FACE_", "TRANSFORMERS_", "VLLM_",  # model caches, offline mode, engine settings
    "GRPC_",  # gRPC's own settings (Ray talks gRPC), its CA roots file included
)
#: ...but within those families no credential (HF_TOKEN, HUGGING_FACE_HUB_TOKEN, VLLM_API_KEY,
#: NVIDIA_API_KEY, ...) unless GATEWAY_HEAD_ENV names it; Ray's own (RAY_AUTH_TOKEN) passes.
_CREDENTIAL = CREDENTIAL
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _never_to_the_head(name: str) -> bool:
    # (PROMETHEUS_MULTIPROC_DIR too: Ray's processes would write their own metrics into the gateway's /metrics)
    return name.startswith("GATEWAY_") or name in ("RAY_ADDRESS", "PROMETHEUS_MULTIPROC_DIR")


def head_env_extras(value: Optional[str]) -> list[str]:
    """The variable names GATEWAY_HEAD_ENV adds; a malformed or forbidden one stops the start."""
    names = [n.strip() for n in (value or "").split(",") if n.strip()]
    for n in names:
        if not _ENV_NAME.fullmatch(n):
            raise SystemExit(f"gateway configuration is invalid: GATEWAY_HEAD_ENV: {n!r} is not a variable name")
        if _never_to_the_head(n):
            raise SystemExit(f"gateway configuration is invalid: GATEWAY_HEAD_ENV: {n} never goes to the Ray head "
                             "(the gateway's settings and secrets stay in the gateway; RAY_ADDRESS and "
                             "PROMETHEUS_MULTIPROC_DIR are the gateway's)")
    return names


def head_env_passes(name: str) -> bool:
    """Does the allow-list (without GATEWAY_HEAD_ENV) let this variable through to the head?"""
    if _never_to_the_head(name):
        return False
    if name.startswith("RAY_"):
        return True
    if name in _HEAD_ENV_NAMES:
        return True
    return name.startswith(_HEAD_ENV_PREFIXES) and not _CREDENTIAL.search(name)


def ray_environment(source: Mapping[str, str], head_env: Optional[str], endpoints_file: Optional[str] = None) -> dict[str, str]:
    """What of ``source`` a Ray node may see: the allow-list, plus the names ``head_env`` lists,
    never the provider-key variables ``endpoints_file`` names (whatever family their names fit)."""
    from .apply import key_variables

    keys = key_variables(endpoints_file)
    extras = set(head_env_extras(head_env))
    named = sorted(keys & extras)
    if named:
        raise SystemExit(f"gateway configuration is invalid: GATEWAY_HEAD_ENV names {', '.join(named)}, which the "
                         f"endpoints file names as a provider key: provider keys never go to the Ray head")
    return {k: v for k, v in source.items() if k not in keys and (k in extras or head_env_passes(k))}


class EmbeddedHead:
    """A local single-node Ray cluster owned by the gateway."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.address = f"127.0.0.1:{settings.ray_port}"
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = Path(tempfile.gettempdir()) / "llm_gateway" / f"ray-head-{settings.ray_port}.log"

    def env(self, source: Optional[Mapping[str, str]] = None) -> dict[str, str]:
        """Environment of the head and so of every Ray worker: the allow-list above and GATEWAY_HEAD_ENV
        from ``source`` (default: this process's environment), our code on the path, token auth on, loopback."""
        env = ray_environment(os.environ if source is None else source, self.settings.head_env, self.settings.endpoints_file)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
        env.setdefault("RAY_AUTH_MODE", "token")
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        env[LOOPBACK_SWITCH] = "0"  # a single-node head on 127.0.0.1 (see LOOPBACK_SWITCH)
        # Replicas: run our (all-async) code on the replica's own event loop instead of a second
        # thread, and write Serve's logs once (to their files), not also to stderr.
        env.setdefault("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "0")
        env.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
        # Ray starts workers at nice 15; replicas are on every request's path, next to gunicorn.
        env.setdefault("RAY_worker_niceness", "0")
        # On SIGTERM ``ray start --block`` drains its node for up to 30 s, so that a multi-node cluster can
        # move replicas away; this head is the whole cluster, and the gateway's workers have stopped already.
        env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
        return env

    @staticmethod
    def ensure_token() -> None:
        """Token auth needs a token before ``ray start``: make one (0600) unless one is given."""
        if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
            return
        if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
            return
        path = Path.home() / ".ray" / "auth_token"
        if path.exists() and path.read_text().strip():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32))
        log.info("generated a Ray authentication token in %s", path)

    def start(self) -> str:
        s = self.settings
        self.ensure_token()
        if reachable(self.address, 0.5):
            raise SystemExit(
                f"port {s.ray_port} is already in use: another Ray head runs there. "
                f"Join it with RAY_ADDRESS={self.address}, or pick another port with GATEWAY_RAY_PORT."
            )
        ray_exe = Path(sys.executable).with_name("ray")
        cmd = [
            str(ray_exe) if ray_exe.exists() else "ray", "start", "--head", "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={s.ray_port}",
            f"--dashboard-host={s.dashboard_host}",
            f"--dashboard-port={s.dashboard_port}",
            f"--num-cpus={s.ray_num_cpus or os.cpu_count() or 1}",
            f"--object-store-memory={s.object_store_mb * 1024 * 1024}",
            # custom resources of this node (GATEWAY_RAY_RESOURCES), for deploys that ask for them (``resources``)
            *([f"--resources={json.dumps({k: int(v) for k, v in s.ray_resources.items()})}"] if s.ray_resources else []),
            # ports nobody calls directly: take free ones so two heads never collide. (The Ray Client
            # server, which the gateway never uses, cannot be turned off while ray[client] is
            # installed: Ray refuses port 0 and defaults to 10001. It listens on loopback too.)
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            "--disable-usage-stats",
        ]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                # (without CAP_SYS_PTRACE: no Ray process may read a gateway process, see gateway.secrecy)
                without_ptrace(cmd), env=self.env(), stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        deadline = time.monotonic() + s.ray_start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the embedded Ray head exited at start (code {self.proc.returncode}); see {self.log_path}")
            if reachable(self.address, 0.2):
                log.info("embedded Ray head up at %s (dashboard http://%s:%d)", self.address, s.dashboard_host, s.dashboard_port)
                return self.address
            time.sleep(0.1)
        self.stop()
        raise SystemExit(f"the embedded Ray head did not come up in {s.ray_start_timeout_s:.0f}s; see {self.log_path}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the head; what it runs dies with it, so a short grace period is enough."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # ``ray start --block`` stops the processes it started
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        # ``ray start`` can exit a moment before its GCS lets go of the port: a head started again at
        # once on that port (a restart) would take it for another head's
        deadline = time.monotonic() + 5
        while reachable(self.address, 0.2) and time.monotonic() < deadline:
            time.sleep(0.1)


def export_embedded_env(address: str) -> None:
    """Let the processes we fork (gunicorn workers) find the embedded head, on loopback.

    Its workers already import our code from PYTHONPATH, so nothing is shipped.
    """
    os.environ["RAY_ADDRESS"] = address
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ["GATEWAY_SHIP_CODE"] = "0"
    ray_on_loopback()
