"""The Ray side of the gateway: the embedded head and each process's connection to it.

``EmbeddedHead`` runs ``ray start --head --block`` as a child process (so no Ray
state lives in the gunicorn master that forks the workers) and stops exactly that
head on exit. ``Cluster`` is one gateway process's connection: it connects lazily
(after fork), starts Serve without an HTTP proxy (the gateway calls handles), and
turns every way of failing to reach the cluster into ``cluster_unavailable``.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import platform
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Mapping, Optional

from .config import Settings
from contract.errors import GatewayError
from .secrecy import CREDENTIAL, without_ptrace

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
#: Ray on loopback: Ray rewrites ``--node-ip-address=127.0.0.1`` (and a driver's ``127.0.0.1:port``)
#: into the host's address, and then its gRPC servers (GCS, raylet, workers) listen on all interfaces,
#: unless this switch (Ray's "multi-node clusters off", ``ray._private.ray_constants.ENABLE_RAY_CLUSTER``)
#: is off: then 127.0.0.1 stays the node's address and every Ray server binds to loopback.
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
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


def is_loopback(host: str) -> bool:
    """Whether ``host`` (of a ``host:port``) names this machine's loopback interface."""
    return host.startswith("127.") or host in ("localhost", "::1", "[::1]")


def ray_on_loopback() -> None:
    """Let this process (and those it forks or starts) reach a head that listens on loopback only.

    A Ray driver rewrites ``127.0.0.1:port`` into the host's address unless LOOPBACK_SWITCH is off,
    and Ray reads that switch once, when it is imported: the gunicorn master (or ``python app.py``)
    has imported it already, so the value it read is set too.
    """
    os.environ[LOOPBACK_SWITCH] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


#: The most a gateway process takes in one gRPC message from a replica: gRPC's own maximum (2 GiB - 1).
#: Serve's router makes its channel to each replica with ``RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH``
#: as its receive limit, 4 MiB by default: an answer the provider billed that is larger (a long output,
#: images in base64) failed as 413. The replica is the gateway's own code and already holds the whole
#: answer, so a smaller limit here protects nothing. (The replicas' own limit, on what the gateway sends
#: them, is set per endpoint: ``providers.base``, 4 x GATEWAY_MAX_BODY_BYTES, at least 4 MiB.)
ANSWER_GRPC_LIMIT = (2 << 30) - 1


def take_answers_of_any_size() -> None:
    """Let this process's Serve routers receive answers up to ``ANSWER_GRPC_LIMIT`` from replicas over gRPC.

    Serve reads the setting once, at import (the gunicorn master imported it before forking), and its
    router reads its module's copy when it opens a channel to a replica: both are set. Not in this
    process's environment: that would reach the Ray head's (and so the replicas') too. Idempotent.
    """
    import ray.serve._private.constants as constants
    import ray.serve._private.request_router.replica_wrapper as replica_wrapper

    for module in (constants, replica_wrapper):
        module.RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH = ANSWER_GRPC_LIMIT


#: Ray's lines that tell a gateway process's operator of no fault, each dropped at its own logger by its
#: own first words (everything else those loggers say still shows):
#: - the driver connects from the startup thread, and gunicorn, not Ray, handles SIGTERM;
#: - every ``serve._run`` (each deploy) "connects to the existing Serve app" and applies no new options,
#:   which the gateway never passes;
#: - Serve's router asks each replica for its queue length within 100 ms and, when a busy replica answers
#:   later, backs off, asks again and routes the call (nothing fails); on two cores under a burst that
#:   is every few calls. A replica that really does not answer still ends in the gateway's own errors.
_RAY_NOISE = {
    "ray._private.worker": ("SIGTERM handler is not set because current thread is not the main thread",),
    "ray.serve": ("Connecting to existing Serve app in namespace", "Failed to get queue length from "),
}


class _DropLines(logging.Filter):
    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(self.starts))


def quiet_ray_noise() -> None:
    """Drop ``_RAY_NOISE`` in this process, and Ray's native stack trace on SIGTERM (a gateway
    process's normal stop; Python's faulthandler still reports a real crash). Idempotent."""
    import faulthandler

    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # (read once, at import: the gunicorn master imported Ray before the fork)
        constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = os.environ["RAY_DISABLE_FAILURE_SIGNAL_HANDLER"] not in ("0", "")
    if not faulthandler.is_enabled():
        faulthandler.enable()
    for name, starts in _RAY_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in logger.filters):
            logger.addFilter(_DropLines(starts))


class Cluster:
    """One gateway process's connection to Ray; connects lazily and thread-safely."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._registry = None
        #: the cluster went away after we connected; a Ray driver cannot reconnect in-process
        self.lost = False
        #: this process left the cluster at its end (``disconnect``): nothing of it connects again
        self.closed = False
        #: called once when the cluster answers again but this process's connection does not: it
        #: was restarted (gunicorn: restart this worker, whose successor connects afresh)
        self.on_recovered: Optional[Callable[[], None]] = None
        self._watching = False  # the watchdog runs (see ``_watch``)
        self._probing = threading.Lock()  # one liveness look at a time (see ``node_gone``)
        #: what ``readiness`` answers, shared by this process's callers
        self._ready = SharedAnswer(self._look_ready, "Serve's controller or the endpoint registry",
                                   fresh_s=_READY_FRESH_S, wait_s=_READY_WAIT_S)

    def ensure_up(self) -> None:
        """Connect if needed; fail at once, without touching Ray, when the cluster is gone (or this process left it)."""
        if self.closed:
            raise _stopping()
        if self.lost:
            raise GatewayError(
                "cluster_unavailable", f"the Ray cluster at {self.address} stopped answering; the gateway reconnects when it is back: "
                f"try again shortly",
                retry_after=2,
            )
        self.connect()

    def _watch(self, address: str) -> None:
        """Declare the cluster lost, or back; log each decision.

        Lost: ``_LOSS_LOOKS`` failed connects in a row over at least ``_LOSS_AFTER_S``, and a call
        through this process's connection that fails too (one refused connect is no outage; while
        calls work, requests are served). Back: the address accepts connections again after any
        failed look; if calls through the connection work and the cluster still knows this
        process's node, this process carries on, else the cluster was restarted (however briefly)
        and ``on_recovered`` runs: a fresh process connects.
        """
        import ray

        misses, last_ok, carried_on = 0, time.monotonic(), False
        while True:
            time.sleep(_WATCH_PERIOD_S)
            if not ray.is_initialized():  # this process left the cluster on purpose (ray.shutdown): nothing to watch
                self._watching = False
                return
            if reachable(address, _WATCH_PERIOD_S):
                if self.lost or (misses and self._registry is not None):
                    if self._answers() and not self._restarted(address):
                        if self.lost:
                            log.warning("the Ray cluster at %s answers again, and so does this process's connection; "
                                        "serving again", address)
                        self.lost = False
                    else:
                        self.lost = True
                        log.warning("the Ray cluster at %s answers again but this process's connection does not (a restarted "
                                    "cluster); this process reconnects by restarting", address)
                        if self.on_recovered is not None:
                            self.on_recovered()
                        return
                misses, last_ok, carried_on = 0, time.monotonic(), False
                continue
            if self.lost:
                continue
            misses += 1
            down_s = time.monotonic() - last_ok
            if misses < _LOSS_LOOKS or down_s < _LOSS_AFTER_S:
                continue
            if self._answers():
                if not carried_on:
                    log.warning("the Ray cluster at %s refused %d connects in %.1fs, but a call through this process's "
                                "connection works; carrying on", address, misses, down_s)
                carried_on = True
                continue
            self.lost = True
            log.error("the Ray cluster at %s refused %d connects in %.1fs and a call through this process's connection "
                      "failed: lost; requests get 503 cluster_unavailable", address, misses, down_s)

    def _restarted(self, address: str) -> bool:
        """Is the cluster that answers at ``address`` another one than this process joined?

        After a head restart the old head's actors can outlive its GCS for a moment, so a call
        through this process's connection may still work while the address already answers
        for a new cluster; then nothing would ever look again. The new cluster does not know
        this process's node: that tells them apart (a network blip keeps the node alive).
        """
        return _bounded(lambda: _no_live_node(address), _CALL_TIMEOUT_S + 1) is True

    def _answers(self) -> bool:
        """Does a call through this process's connection work? (the registry's ``versions``; a hung call is a no)"""
        import ray

        registry = self._registry
        if registry is None:  # not connected yet: nothing to serve, the failed connects decide
            return False
        return bool(_bounded(lambda: ray.get(registry.versions.remote(), timeout=_CALL_TIMEOUT_S), _CALL_TIMEOUT_S + 1))

    def node_gone(self) -> Optional[bool]:
        """Is this process's Ray node gone while the cluster answers? (None: cannot tell now)

        A Ray driver works only through a raylet on its own host. In a gateway pod that is the
        pod's own ``ray start``: once it is gone, nothing in the pod can work with the cluster
        again until the pod restarts. The node is the one this process connected through or,
        before it connected, any raylet running on this host. A cluster that does not answer is
        not a gone node (restarting would not bring it back), nor is a brief head restart once
        its raylet registers again.
        """
        address = self.address
        if not address or _host_port(address) is None or not reachable(address, 0.5):
            return False
        if not self._probing.acquire(blocking=False):
            return None  # the previous look still waits on the cluster

        def look() -> bool:
            try:
                return _no_live_node(address)
            finally:
                self._probing.release()

        return _bounded(look, _CALL_TIMEOUT_S + 1)

    @property
    def address(self) -> Optional[str]:
        return self.settings.ray_address or os.environ.get("RAY_ADDRESS") or None

    @property
    def connected(self) -> bool:
        return self._registry is not None

    def disconnect(self) -> None:
        """Leave the cluster at this process's end, its requests answered: ``ray.shutdown()``, which Ray's own exit
        hook would run anyway, but after pausing half a second for a driver's log lines to print (this one prints
        none: ``log_to_driver=False``), on every stop of every gateway process. The driver disconnects all the same;
        the watchdog ends; from here on ``ensure_up`` and ``connect`` fail at once (``cluster_unavailable``), so a
        startup still retrying (``Gateway.startup``) touches Ray no more, and cannot begin to apply the endpoints
        file while the process ends. Idempotent; Ray is not imported for it."""
        self.closed = True
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()  # (waits for a connect in progress: they share Ray's lock)

    def registry(self):
        """The endpoint registry actor (connecting first if needed)."""
        if self._registry is None:
            self.connect()
        return self._registry

    def connect(self) -> None:
        if self.closed:
            raise _stopping()
        if self._registry is not None:
            return
        with self._lock:
            if self._registry is not None:
                return
            import ray
            from ray import serve

            from .registry import registry_actor

            address = self.address
            if not address:
                raise GatewayError("cluster_unavailable", "no Ray cluster is configured (set RAY_ADDRESS or start the gateway with its embedded head)")
            if address.startswith("ray://"):
                raise GatewayError("cluster_unavailable", "Ray Client addresses (ray://) cannot call Serve handles; run the gateway on a cluster node and use host:port")
            if not reachable(address):
                raise GatewayError("cluster_unavailable", f"the Ray cluster at {address} is not reachable: start it (or set RAY_ADDRESS to "
                                   f"a running head), then try again", retry_after=2)
            quiet_ray_noise()
            take_answers_of_any_size()
            hp = _host_port(address)
            if hp is not None and is_loopback(hp[0]) and LOOPBACK_SWITCH not in os.environ:
                ray_on_loopback()  # (a head on loopback: else Ray rewrites the address to this host's and never connects)
            try:
                if not ray.is_initialized():
                    ship = self.settings.ship_code if self.settings.ship_code is not None else True
                    ray.init(
                        address=address,
                        namespace=self.settings.ray_namespace,
                        runtime_env={"py_modules": [str(PROJECT_ROOT / m) for m in ("contract", "gateway", "providers")]} if ship else None,
                        log_to_driver=False,
                        logging_level=logging.WARNING,
                        configure_logging=False,
                    )
                if not self._watching and _host_port(address) is not None:
                    # from here on this process is a driver of that cluster: watch it, even if
                    # the rest of the connect fails (a driver cannot reconnect in-process)
                    self._watching = True
                    threading.Thread(target=self._watch, args=(address,), name="ray-watchdog", daemon=True).start()
                serve.start(proxy_location="Disabled")
                self._registry = registry_actor(self.settings.ray_namespace)
            except GatewayError:
                raise
            except Exception as exc:  # noqa: BLE001 - report why, in words
                if self.closed:  # (left meanwhile: what failed is Ray, shut down under it)
                    raise _stopping() from None
                raise GatewayError("cluster_unavailable", describe_connect_error(exc, address), retry_after=2) from None

    def readiness(self) -> tuple[bool, dict]:
        """What ``/readyz`` reports: cluster reachable, Serve up, versions equal; when not ready,
        ``reason`` (``cluster_unavailable``, ``version_mismatch``) and ``problem`` (in words).

        One look a second at most for the whole process, shared by every caller (``SharedAnswer``):
        a burst of probes never piles threads up on a cluster that does not answer, and each
        caller is answered within ``_READY_WAIT_S`` (a look that takes longer: not ready). A process
        not connected yet connects first, in the caller's thread, as every other route does (served
        processes answer "starting" until they are connected, without asking this); a lost cluster
        is not ready at once, whatever was seen a moment ago.
        """
        try:
            if not self.connected or self.lost:
                self.ensure_up()
            ok, report = self._ready.get()
        except GatewayError as err:  # (no connection, or no answer in time)
            return False, {"ray_address": self.address, "gateway": _local_versions(),
                           "reason": "cluster_unavailable", "problem": err.info.message}
        return ok, copy.deepcopy(report)  # (callers change their copy: /readyz pops ``problem``)

    def _look_ready(self) -> tuple[bool, dict]:
        """One look for ``readiness``; each call to the cluster within ``_CALL_TIMEOUT_S``."""
        local = _local_versions()
        report: dict = {"ray_address": self.address, "gateway": local}
        try:
            import ray

            self.ensure_up()
            cluster = ray.get(self.registry().versions.remote(), timeout=_CALL_TIMEOUT_S)
            report["cluster"] = cluster
            serve_answers(_CALL_TIMEOUT_S)
            report["serve"] = "running"
        except GatewayError as err:
            report.update(reason="cluster_unavailable", problem=err.info.message)
            return False, report
        except Exception as exc:  # noqa: BLE001
            report.update(reason="cluster_unavailable", problem=f"the cluster did not answer ({type(exc).__name__})")
            return False, report
        problems = []
        if cluster["ray"] != local["ray"]:
            problems.append(f"Ray version mismatch: gateway has {local['ray']}, cluster runs {cluster['ray']}; install ray=={cluster['ray']} here or upgrade the cluster")
        if cluster["python"].split(".")[:2] != local["python"].split(".")[:2]:
            problems.append(f"Python version mismatch: gateway has {local['python']}, cluster runs {cluster['python']}; Ray needs the same major.minor on both")
        if problems:
            report.update(reason="version_mismatch", problem="; ".join(problems))
            return False, report
        return True, report


def _stopping() -> GatewayError:
    return GatewayError("cluster_unavailable", "this gateway process is stopping: it left the Ray cluster", retry_after=2)


#: the watchdog looks every _WATCH_PERIOD_S; see ``Cluster._watch``
_WATCH_PERIOD_S = 0.5
_LOSS_LOOKS = 3
_LOSS_AFTER_S = 1.5
#: one call that tells whether the cluster answers (the watchdog, liveness)
_CALL_TIMEOUT_S = 2.0


def _bounded(fn: Callable, timeout: float):
    """``fn()`` in a daemon thread: its result, or None when it raised or did not end in ``timeout``."""
    box: list = []

    def run() -> None:
        try:
            box.append(fn())
        except Exception:  # noqa: BLE001 - the caller reads None as "no answer"
            pass

    thread = threading.Thread(target=run, name="ray-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return box[0] if box else None


#: ``Cluster.readiness``: one look is reused this long, and a caller waits at most this long for one
_READY_FRESH_S = 1.0
_READY_WAIT_S = 1.5


class _Look:
    """One look of a ``SharedAnswer``: when it began, whether it ended, and its value or error."""

    __slots__ = ("started", "ended", "done", "value", "error")

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.ended = 0.0
        self.done = threading.Event()
        self.value = None
        self.error = None  # an ErrorInfo


class SharedAnswer:
    """One answer of the cluster shared by every thread of this process (readiness, the model list).

    A burst of callers costs the cluster one call per ``fresh_s`` and never piles threads up on
    it. ``get()`` answers the last look while it is younger than ``fresh_s``; after that the
    first caller starts one new look, in a thread of its own, and every caller waits for it, at
    most until ``wait_s`` after it began. A look that takes longer answers 503
    ``cluster_unavailable`` with Retry-After to the callers waiting (at once to those after them)
    and is kept when it ends. And once a look took longer than ``wait_s`` (the cluster is stuck or
    overloaded) and failed, callers do not wait for the next one: they get that failure at once
    (for ``stale_s`` after it ended) while the next one runs; a slow success is never served stale
    (a "ready" must be fresh). There is never more than one look at
    a time, however long one hangs (its own calls to the cluster have timeouts: it ends). A look
    that raises answers its error (as a ``GatewayError``), like a value. ``forget()``: the next
    caller looks again.
    """

    def __init__(self, look: Callable[[], object], what: str, fresh_s: float, wait_s: float,
                 stale_s: float = 10.0) -> None:
        self._look, self.what, self.fresh_s, self.wait_s, self.stale_s = look, what, fresh_s, wait_s, stale_s
        self._lock = threading.Lock()
        self._answer: Optional[_Look] = None
        self._pending: Optional[_Look] = None

    def get(self):
        with self._lock:
            last, now = self._answer, time.monotonic()
            if last is not None and now - last.ended < self.fresh_s:
                look = last
            else:
                look = self._pending
                if look is None:
                    look = self._pending = _Look()
                    threading.Thread(target=self._run, args=(look,), name="shared-answer", daemon=True).start()
                if last is not None and last.error is not None and last.ended - last.started >= self.wait_s \
                        and now - last.ended < self.stale_s:
                    look = last  # (the last look failed slowly: no caller waits on the next; a success is never stale)
        if not look.done.wait(max(0.0, look.started + self.wait_s - time.monotonic())):
            raise GatewayError("cluster_unavailable", f"the Ray cluster did not answer within {self.wait_s:g}s "
                               f"({self.what} is stuck or overloaded); try again shortly", retry_after=2)
        if look.error is not None:
            raise GatewayError.from_info(look.error)
        return look.value

    def forget(self) -> None:
        """What the cluster answered is out of date (this process changed it): the next ``get`` looks again."""
        with self._lock:
            self._answer = self._pending = None

    def _run(self, look: _Look) -> None:
        try:
            look.value = self._look()
        except GatewayError as err:
            look.error = err.info
        except Exception as exc:  # noqa: BLE001 - any failure of the cluster's is "did not answer"
            look.error = GatewayError("cluster_unavailable", f"the Ray cluster did not answer ({type(exc).__name__}); "
                                      f"try again shortly", retry_after=2).info
        look.ended = time.monotonic()
        with self._lock:
            if self._pending is look:  # (a look begun before a ``forget`` answers its own waiters only)
                self._answer, self._pending = look, None
        look.done.set()


def serve_answers(timeout: float) -> None:
    """Does Serve's controller answer within ``timeout``? (raises when not: ``GetTimeoutError``, ``RayActorError``)

    ``serve.status()`` would ask for every application's details and wait for them forever.
    """
    import ray
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        raise GatewayError("cluster_unavailable", "Serve's controller is not running in the Ray cluster", retry_after=2)
    ray.get(client._controller.check_alive.remote(), timeout=timeout)


def _local_versions() -> dict:
    return {"ray": _ray_version(), "python": platform.python_version()}


def _no_live_node(address: str) -> bool:
    """True when the cluster at ``address`` has no live node for this process (see ``Cluster.node_gone``)."""
    import ray
    from ray._private.services import find_node_ids
    from ray._raylet import GcsClient, NodeID
    from ray.core.generated.gcs_pb2 import GcsNodeInfo
    from ray.core.generated.gcs_service_pb2 import GetAllNodeInfoRequest

    ids = {ray.get_runtime_context().get_node_id()} if ray.is_initialized() else find_node_ids()
    if not ids:
        return True  # no raylet at all on this host
    selectors = [GetAllNodeInfoRequest.NodeSelector(node_id=NodeID.from_hex(i).binary()) for i in ids]
    alive = GcsClient(address=address).get_all_node_info(
        timeout=_CALL_TIMEOUT_S, node_selectors=selectors, state_filter=GcsNodeInfo.GcsNodeState.ALIVE)
    return not alive


def _ray_version() -> str:
    import ray

    return ray.__version__


def describe_connect_error(exc: Exception, address: str) -> str:
    text = str(exc)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    if "ersion mismatch" in text:
        return f"Ray/Python version mismatch with the cluster at {address}: {' '.join(text.split())[:400]}"
    if "uthentication" in text or "token" in text.lower():
        return f"the Ray cluster at {address} refused this process's authentication token ({first[:200]}); see docs/operations.md, 'What the Ray token gives'"
    return f"could not connect to the Ray cluster at {address}: {first[:300]}"
