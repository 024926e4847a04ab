"""Helpers to run the gateway's real processes in tests."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from gateway.head import free_port

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
        {"RAY_ADDRESS": head_address, "GATEWAY_BIND": f"127.0.0.1:{port}", "GATEWAY_WORKERS": "2", **env},
        log_path,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, log_path)
        yield base, proc, log_path
    finally:  # SIGTERM first: gunicorn's on_exit removes its metrics directory
        if proc.poll() is None:
            try:
                stop(proc, 30)
            except subprocess.TimeoutExpired:
                pass




def worker_pids(master_pid: int) -> set[int]:
    """The gunicorn master's worker processes (its children)."""
    import ray  # noqa: F401 - Ray ships the psutil it imports
    import psutil

    return {p.pid for p in psutil.Process(master_pid).children()}


class TcpProxy:
    """A TCP forwarder to ``target`` that can be paused: while paused, connects are refused and
    the connections it carried are cut, as in a network blip; ``resume`` listens on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        import threading

        self.target = target
        self.port = 0
        self._listener = None
        self._conns: set = set()
        self._lock = threading.Lock()
        self.resume()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def resume(self) -> None:
        import socket
        import threading

        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("", self.port))  # all interfaces: what a driver dials is 127.0.0.1 or, if Ray rewrote it, the host's address
        sock.listen(128)
        self.port = sock.getsockname()[1]
        self._listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def pause(self) -> None:
        import socket
        import struct

        sock, self._listener = self._listener, None
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() below; close() alone would not
        except OSError:
            pass
        sock.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:  # cut with a reset, not a polite close
            try:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
            except OSError:
                pass

    close = pause

    def _accept(self, sock) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src, dst) -> None:
        import socket

        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve_front(app):
    """Serve ``app``'s ASGI front (``gateway.front``) over HTTP on a free port, in this process, on its
    dispatcher's event loop (where its chat calls run); yields the base URL. (uvicorn, as a worker runs it,
    without the worker's process management.)"""
    import uvicorn

    front = app.extensions["front"]
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(front, host="127.0.0.1", port=port, lifespan="off", access_log=False,
                                           log_level="warning"))
    running = front.loop.submit(server.serve())
    deadline = time.monotonic() + 30
    while not server.started:
        assert not running.done() and time.monotonic() < deadline, "the front did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        running.result(30)
