"""A two-node Ray cluster on one machine, and gateway hosts joined to it (for tests/test_multinode.py).

- **The nodes.** Two ``ray start --block`` processes, each in a session of its own (so a test can
  kill one node, with every process it started, by its process group): the head (resource
  ``node_a``) and a second node (resource ``node_b``), one CPU each, every port of each chosen
  here and none shared (the two would otherwise collide on the same machine).
- **Their addresses: 127.0.0.2 (head) and 127.0.0.3 (second node).** The gateway's own heads run
  ``--node-ip-address=127.0.0.1`` with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (``gateway.ray_switches.
  LOOPBACK_SWITCH``), but with that switch off Ray's CLI refuses to start any node that joins a head
  ("Multi-node Ray clusters are not supported on Windows and OSX"), and with it on Ray turns
  ``127.0.0.1`` (and ``localhost``) into the host's network address, where a head on loopback cannot
  be reached. Other loopback addresses are left as they are: with the switch on and two addresses
  of 127.0.0.0/8, both nodes stay on loopback, as a machine with two network addresses would have
  them, and a replica's node address (the listing's ``node_ip``) tells the nodes apart.
- **Their environment**: the embedded head's (``EmbeddedHead.env``: the allow-list, this checkout
  on ``PYTHONPATH`` so the replicas import our code, token auth), the switch on, and the GCS told to
  look at each raylet every second (a dead node is declared so after three missed looks, ~3 s,
  instead of Ray's ~15 s).
- **Gateway hosts**: real gunicorn masters (``GATEWAY_WORKERS=1``) joined with ``RAY_ADDRESS``,
  started with ``tests.procs.start``, each in a session of its own, so a test can kill one with
  its worker.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import httpx

from gateway import Settings
from gateway.head import EmbeddedHead, free_port, reachable
from gateway.ray_switches import LOOPBACK_SWITCH
from tests.procs import start, stop, wait_ready

HEAD_IP, NODE_IP = "127.0.0.2", "127.0.0.3"
RAY = str(Path(sys.executable).with_name("ray"))
#: the GCS looks at each raylet this often and declares a node dead after this many missed looks
HEALTH_CHECK_MS, HEALTH_CHECK_MISSES = 1000, 3


def _port_free(port: int) -> bool:
    for host in ("127.0.0.1", HEAD_IP, NODE_IP):
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


def worker_ports(count: int = 100, taken: tuple = ()) -> tuple[int, int]:
    """A free range of ``count`` ports for one node's workers, below the ephemeral range and outside
    Ray's default 10002-19999 (other heads of the session use it) and ``taken`` ranges."""
    for _ in range(200):
        low = random.randrange(20000, 32000 - count, 10)
        if any(low <= hi and lo <= low + count - 1 for lo, hi in taken):
            continue
        if all(_port_free(p) for p in range(low, low + count)):
            return low, low + count - 1
    raise RuntimeError("no free range of worker ports")


def node_env() -> dict[str, str]:
    env = EmbeddedHead(Settings.from_env()).env()
    env[LOOPBACK_SWITCH] = "1"  # (see the module's docstring: off, Ray's CLI starts no second node)
    env["RAY_health_check_period_ms"] = str(HEALTH_CHECK_MS)
    env["RAY_health_check_failure_threshold"] = str(HEALTH_CHECK_MISSES)
    return env


def _descendants(pid: int) -> list[int]:
    import ray  # noqa: F401 - Ray ships the psutil it imports
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL, extra: tuple[int, ...] = ()) -> None:
    """Signal ``proc``'s process group, and each of ``extra`` (descendants seen before) that left it."""
    for target in (lambda: os.killpg(proc.pid, sig), *[lambda p=p: os.kill(p, sig) for p in extra]):
        try:
            target()
        except (ProcessLookupError, PermissionError):
            pass


@dataclass
class RayNode:
    name: str
    ip: str
    proc: subprocess.Popen
    log_path: Path
    ports: dict = field(default_factory=dict)

    def kill(self) -> float:
        """SIGKILL the node: its ``ray start``, GCS/raylet/agents and every worker it started, at once.
        Answers when (monotonic) it was done."""
        pids = tuple(_descendants(self.proc.pid))
        kill_group(self.proc, signal.SIGKILL, pids)
        at = time.monotonic()
        self.proc.wait(10)
        return at

    def stop(self) -> None:
        if self.proc.poll() is not None:
            kill_group(self.proc, signal.SIGKILL)  # (what may be left of its group)
            return
        pids = tuple(_descendants(self.proc.pid))
        kill_group(self.proc, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
        kill_group(self.proc, signal.SIGKILL, pids)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


def start_ray_node(name: str, ip: str, args: list[str], resources: dict, log_path: Path, cwd: Path,
                   taken: tuple = ()) -> RayNode:
    low, high = worker_ports(taken=taken)
    ports = {"node-manager-port": free_port(), "object-manager-port": free_port(),
             "dashboard-agent-listen-port": free_port(), "dashboard-agent-grpc-port": free_port(),
             "runtime-env-agent-port": free_port(), "metrics-export-port": free_port(),
             "min-worker-port": low, "max-worker-port": high}
    cmd = [RAY, "start", "--block", f"--node-ip-address={ip}", *args, "--num-cpus=1",
           f"--resources={json.dumps(resources)}", *(f"--{k}={v}" for k, v in ports.items()),
           "--object-store-memory=100000000", "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, cwd=cwd, env=node_env(), stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    return RayNode(name, ip, proc, log_path, ports)


def nodes(address: str, timeout: float = 5) -> list[dict]:
    """Every node the GCS at ``address`` knows: {node_id, ip, alive, head, resources} (no driver needed:
    this process may already be a driver of another cluster)."""
    from ray._raylet import GcsClient
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    infos = GcsClient(address=address).get_all_node_info(timeout=timeout)
    return [{"node_id": node_id.hex(), "ip": info.node_manager_address, "head": info.is_head_node,
             "alive": info.state == GcsNodeInfo.GcsNodeState.ALIVE, "resources": dict(info.resources_total)}
            for node_id, info in infos.items()]


def wait_until(what: str, check, limit: float, logs: tuple[Path, ...] = (), period: float = 0.2):
    deadline = time.monotonic() + limit
    while True:
        try:
            value = check()
        except AssertionError:  # (the check's own verdict: no use waiting)
            raise
        except Exception:  # noqa: BLE001 - not yet
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p}:\n{p.read_text(errors='replace')[-2000:]}" for p in logs if p.exists())
            raise AssertionError(f"{what}: not within {limit:.0f}s\n{tails}")
        time.sleep(period)


@dataclass
class Host:
    """One gateway host: a gunicorn master and its worker."""
    name: str
    base: str
    proc: subprocess.Popen
    log_path: Path

    def http(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=kw.pop("timeout", 60), **kw)

    def kill(self) -> float:
        """SIGKILL the master and its worker (its process group); answers when (monotonic)."""
        pids = tuple(_descendants(self.proc.pid))
        kill_group(self.proc, signal.SIGKILL, pids)
        at = time.monotonic()
        self.proc.wait(10)
        self.forget_metrics_dir()
        return at

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                stop(self.proc, 30)
            except subprocess.TimeoutExpired:
                pass
        self.forget_metrics_dir()

    def forget_metrics_dir(self) -> None:
        """A killed master leaves its metrics directory behind (its on_exit never ran): remove it."""
        import re

        found = re.search(r"metrics directory (\S+)", self.log_path.read_text(errors="replace")) \
            if self.log_path.exists() else None
        if found and Path(found.group(1)).name.startswith("gateway-metrics-"):
            shutil.rmtree(found.group(1), ignore_errors=True)


def start_host(name: str, address: str, log_path: Path, **env: str) -> Host:
    port = free_port()
    proc = start([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"],
                 {"RAY_ADDRESS": address, "GATEWAY_BIND": f"127.0.0.1:{port}", "GATEWAY_WORKERS": "1",
                  "GATEWAY_THREADS": "8", "GATEWAY_SHIP_CODE": "0", **env}, log_path)
    return Host(name, f"http://127.0.0.1:{port}", proc, log_path)


#: a custom resource both nodes carry: an endpoint that asks for it may run on either
SHARED = "shared_pool"


class MultiNode:
    """The cluster: ``head`` (node_a) and ``node2`` (node_b); ``address`` is the head's GCS."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.dashboard_port = free_port()
        self.address = f"{HEAD_IP}:{self.port}"
        self.head: Optional[RayNode] = None
        self.node2: Optional[RayNode] = None
        self.node_ids: dict[str, str] = {}  # "node_a"/"node_b" -> node id (hex)

    def start_head(self) -> None:
        EmbeddedHead.ensure_token()
        self.head = start_ray_node(
            "head", HEAD_IP,
            ["--head", f"--port={self.port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
             f"--ray-client-server-port={free_port()}"],
            {"node_a": 100, SHARED: 100}, self.tmp / "ray-head.log", self.tmp)
        def listening():
            assert self.head.proc.poll() is None, f"the head exited: {self.head.proc.returncode}"
            return reachable(self.address, 0.2)

        wait_until("the head's GCS listens", listening, 60, (self.head.log_path,), 0.1)
        self.node_ids["node_a"] = wait_until(
            "the head node is alive", lambda: next(n["node_id"] for n in nodes(self.address) if n["alive"] and n["head"]),
            60, (self.head.log_path,))

    def start_node2(self) -> None:
        """node_b, which says it has a GPU (Ray takes ``--num-gpus`` at its word): the node SaaS workers keep off."""
        taken = ((self.head.ports["min-worker-port"], self.head.ports["max-worker-port"]),)
        self.node2 = start_ray_node("node2", NODE_IP, [f"--address={self.address}", "--num-gpus=1"], {"node_b": 100, SHARED: 100},
                                    self.tmp / "ray-node2.log", self.tmp, taken)

    def wait_node2(self) -> None:
        def alive():
            assert self.node2.proc.poll() is None, f"the second node exited: {self.node2.proc.returncode}"
            return next((n["node_id"] for n in nodes(self.address) if n["alive"] and not n["head"]), None)

        self.node_ids["node_b"] = wait_until("the second node joined", alive, 90, (self.node2.log_path,))

    def stop(self) -> None:
        for node in (self.node2, self.head):
            if node is not None:
                node.stop()


# -- callers -------------------------------------------------------------------------------------

@dataclass
class Answer:
    at: float  # monotonic, when the call was sent
    took: float
    status: Optional[int]  # None: no HTTP answer (refused, reset)
    error: str  # the gateway's error type, the transport error's name, or ""
    message: str = ""  # the gateway's error message
    retry_after: Optional[str] = None
    tries: int = 1  # (a caller that honours Retry-After: how many calls this request took)


def call(client: httpx.Client, chat_name: str, headers: Optional[dict] = None, content: str = "hi") -> Answer:
    started = time.monotonic()
    try:
        r = client.post("/chat", json={"chat_name": chat_name, "content": content}, headers=headers)
    except httpx.HTTPError as exc:
        return Answer(started, time.monotonic() - started, None, type(exc).__name__)
    error = message = ""
    if r.status_code != 200:
        try:
            error, message = r.json()["error"]["type"], r.json()["error"]["message"]
        except Exception:  # noqa: BLE001
            error = r.text[:80]
    elif r.json().get("output") != f"echo: {content}":
        error = f"wrong answer: {r.text[:80]}"
    return Answer(started, time.monotonic() - started, r.status_code, error, message, r.headers.get("Retry-After"))


class Load:
    """One caller that chats with ``chat_name`` through ``base`` again and again until ``stop``."""

    def __init__(self, label: str, base: str, chat_name: str, headers: dict, pause: float = 0.1,
                 timeout: float = 30, honour_retry_after: bool = False) -> None:
        self.label, self.base, self.chat_name, self.headers = label, base, chat_name, headers
        self.pause, self.timeout = pause, timeout
        #: a caller that honours ``Retry-After``: a 503 that carries it is tried again after that long (up to
        #: ``timeout`` in all); one answer is recorded per request, its last, with ``tries``
        self.honour_retry_after = honour_retry_after
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"load-{label}", daemon=True)

    def start(self) -> "Load":
        self._thread.start()
        return self

    def _run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=self.timeout) as client:
            while not self._stop.is_set():
                content = f"{self.label} {len(self.answers)}"
                answer = call(client, self.chat_name, self.headers, content)
                began, tries = answer.at, 1
                while self.honour_retry_after and answer.status == 503 and answer.retry_after \
                        and time.monotonic() - began + float(answer.retry_after) < self.timeout:
                    time.sleep(float(answer.retry_after))
                    answer, tries = call(client, self.chat_name, self.headers, content), tries + 1
                if tries > 1:
                    answer = Answer(began, time.monotonic() - began, answer.status, answer.error, answer.message,
                                    answer.retry_after, tries)
                self.answers.append(answer)
                self._stop.wait(self.pause)

    def stop(self) -> list[Answer]:
        self._stop.set()
        self._thread.join(self.timeout + 5)
        return self.answers

    def lost(self, after: float = 0.0) -> list[Answer]:
        return [a for a in self.answers if a.at >= after and (a.status != 200 or a.error)]


def outcomes(answers: list[Answer]) -> str:
    """``200 x41, 503 endpoint_not_ready x3`` (in order of first appearance)."""
    counts: dict[str, int] = {}
    for a in answers:
        key = str(a.status) if not a.error else f"{a.status or 'no answer'} {a.error}"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in counts.items()) or "none"


def print_table(title: str, rows: list[tuple[str, str, str]]) -> None:
    """(fault, what callers saw, requests lost)"""
    header = ("fault", "what callers saw", "requests lost")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(3)]
    print(f"\n{title}")
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(str(c).ljust(w) for c, w in zip(row, widths)))
