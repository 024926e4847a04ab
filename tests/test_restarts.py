"""Coming back without an operator: a gateway started before its head, a head restart, a network
blip, and a pod whose own Ray node died. Real gunicorn, real Ray heads, real TCP."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import types
import uuid

import httpx
import pytest

from gateway import Settings
from gateway.head import EmbeddedHead, _host_port, free_port
from tests.procs import TcpProxy, start, stop, wait_ready, worker_pids
from tests.test_security import endpoints_file


def head_settings() -> Settings:
    return Settings.from_env(ray_port=free_port(), dashboard_port=free_port(), object_store_mb=100, ray_num_cpus=1)


class QuickDeathHead(EmbeddedHead):
    """An embedded head whose GCS looks at its raylet every second and declares it dead after three missed
    looks (~3 s; Ray's defaults take ~15 s), as the two-node cluster of tests/multinode.py does."""

    def env(self, source=None) -> dict[str, str]:
        env = super().env(source)
        env["RAY_health_check_period_ms"] = "1000"
        env["RAY_health_check_failure_threshold"] = "3"
        return env


def gunicorn(address: str, log_path, **env: str):
    port = free_port()
    proc = start([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"],
                 {"RAY_ADDRESS": address, "GATEWAY_BIND": f"127.0.0.1:{port}", "GATEWAY_WORKERS": "2",
                  "GATEWAY_THREADS": "8", "GATEWAY_SHIP_CODE": "0", **env}, log_path)
    return f"http://127.0.0.1:{port}", proc


def get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=10)
    except httpx.TransportError:  # gunicorn not listening yet
        return None


def chat_until_served(base: str, chat_name: str, content: str, log_path, limit: float = 150) -> httpx.Response:
    """A caller that waits as told (Retry-After on 503) until it is served."""
    deadline, r = time.monotonic() + limit, None
    while time.monotonic() < deadline:
        r = httpx.post(base + "/chat", json={"chat_name": chat_name, "content": content}, timeout=60)
        if r.status_code == 200:
            return r
        time.sleep(min(float(r.headers.get("Retry-After", "1")), 5))
    raise AssertionError(f"not served: {r.status_code} {r.text}\n{log_path.read_text()[-3000:]}")


def assert_alive(base: str) -> None:
    r = get(base + "/healthz")
    assert r is None or (r.status_code == 200 and r.json() == {"status": "ok"}), r.text


def test_the_gateway_comes_up_before_its_head_and_after_a_head_restart(tmp_path, fake_openai, fake_zhipu):
    """Started before its head, the gateway applies its endpoints file once the head is up; while the
    head is down it answers 503 at once; after a head restart its workers reconnect and apply the file
    again (the endpoints are back without an operator), under the same gunicorn master, keys never logged."""
    path, names = endpoints_file(tmp_path, fake_openai, fake_zhipu, uuid.uuid4().hex[:6])
    settings = head_settings()
    head = EmbeddedHead(settings)
    log_path = tmp_path / "gunicorn.log"
    # A short liveness grace: even so, neither a missing head nor a head restart fails /healthz.
    base, gw = gunicorn(head.address, log_path, GATEWAY_ENDPOINTS_FILE=str(path), GATEWAY_LIVENESS_GRACE_S="15",
                        TEST_OPENAI_KEY="sk-early-0001", TEST_ZHIPU_KEY="abc.early0001")
    try:
        # Nothing listens at the head's address yet: alive, not ready, and it says why; until the workers
        # have tried (and failed) to start twice and /readyz said so three times.
        not_ready, deadline = 0, time.monotonic() + 60
        while not_ready < 3 or log_path.read_text().count("startup attempt") < 2:
            assert gw.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            r = get(base + "/readyz")
            if r is not None:
                error = r.json()["error"]
                assert r.status_code == 503 and error["type"] == "cluster_unavailable", r.text
                assert "not applied yet" in error["message"] and r.headers["Retry-After"]
                not_ready += 1
            assert_alive(base)
            time.sleep(0.5)
        head.start()
        # No request but /readyz: the workers connect and apply the file by themselves.
        wait_ready(base, gw, log_path, limit=150)
        for i in range(6):  # both workers, both endpoints of the file
            for name in names[:2]:
                r = httpx.post(base + "/chat", json={"chat_name": name, "content": f"hi {i}"}, timeout=60)
                assert r.status_code == 200 and r.json()["output"] == f"echo: hi {i}", (r.text, log_path.read_text()[-3000:])
        assert "startup attempt" in log_path.read_text()  # the early failures were logged

        # The head restarts: the workers restart, connect and apply the file again; callers that
        # honour Retry-After are served again, and /healthz never failed.
        pids = worker_pids(gw.pid)
        seen = len(log_path.read_text())
        head.stop()
        # While it is down: 503 cluster_unavailable with Retry-After, at once (no call waits on a dead
        # cluster), and /readyz says not ready; /healthz stays alive (restarting would not help).
        deadline = time.monotonic() + 10
        # (each worker's watchdog decides on its own, within seconds: a call sent before it has may still wait
        # on the registry, up to its 10 s; the calls below are sent once both said so, or at the deadline)
        while log_path.read_text()[seen:].count("failed: lost; requests get 503") < 2 and time.monotonic() < deadline:
            assert_alive(base)
            time.sleep(0.2)
        while True:  # (a call may still find the old replica)
            assert_alive(base)
            r = httpx.post(base + "/chat", json={"chat_name": names[1], "content": "down"}, timeout=30)
            if r.status_code == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert_alive(base)
        waits = []
        for _ in range(4):  # (both workers)
            started = time.monotonic()
            r = httpx.post(base + "/chat", json={"chat_name": names[1], "content": "down"}, timeout=30)
            waits.append(time.monotonic() - started)
            assert r.status_code == 503 and r.json()["error"]["type"] == "cluster_unavailable", r.text
            assert r.headers["Retry-After"]
        print(f"503 while the head is down, answered in {max(waits):.2f}s at most")
        assert get(base + "/readyz").status_code == 503
        head = EmbeddedHead(settings)
        head.start()
        deadline = time.monotonic() + 150
        while not worker_pids(gw.pid) or worker_pids(gw.pid) & pids:
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            assert_alive(base)
            time.sleep(0.5)
        for name in names[:2]:
            r = chat_until_served(base, name, "again", log_path)
            assert r.json()["output"] == "echo: again"
        assert_alive(base)
        assert gw.poll() is None  # the same gunicorn master all along
        text = log_path.read_text()
        assert "sk-early-0001" not in text and "abc.early0001" not in text
    finally:
        stop(gw)
        head.stop()


@pytest.fixture(scope="module")
def through_a_proxy(tmp_path_factory):
    """For the blip test, then the liveness test (LAST: it kills the node's raylet): a head of its own, a TCP
    proxy in front of its GCS, and a gunicorn joined through the proxy, with a short liveness grace."""
    head = QuickDeathHead(head_settings())
    head.start()
    proxy = TcpProxy(_host_port(head.address))
    log_path = tmp_path_factory.mktemp("through_a_proxy") / "gunicorn.log"
    base, gw = gunicorn(proxy.address, log_path, GATEWAY_LIVENESS_GRACE_S="5")
    setup = types.SimpleNamespace(head=head, proxy=proxy, base=base, gw=gw, log_path=log_path, stopped=False)
    try:
        wait_ready(base, gw, log_path)
        yield setup
    finally:
        stop(gw)
        if setup.stopped:  # (the liveness test killed its raylet and stopped it)
            # Resumed, `ray start --block` finds its raylet dead and kills what is left by itself: a SIGTERM
            # (head.stop) arriving meanwhile deadlocks it (Ray's SIGTERM handler waits for the lock its own kill
            # holds) until head.stop's 10 s are out. So it is left to end, then what it left of its group goes.
            os.kill(head.proc.pid, signal.SIGCONT)
            try:
                head.proc.wait(15)
                os.killpg(head.proc.pid, signal.SIGKILL)  # (the dashboard's modules, which outlive it)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
        proxy.close()
        head.stop()


def test_a_short_network_blip_does_not_lose_the_cluster(through_a_proxy, fake_openai):
    """The gateway reaches the GCS through a TCP proxy that is cut twice: for about one second
    (fewer failed looks than a loss needs) and for three (enough looks; a call through the
    connection still works, so it carries on). Neither restarts a worker or fails a call."""
    proxy, base, gw, log_path = through_a_proxy.proxy, through_a_proxy.base, through_a_proxy.gw, through_a_proxy.log_path
    chat_name = f"blip_{uuid.uuid4().hex[:6]}"
    with httpx.Client(base_url=base, timeout=60) as http:
        r = http.post("/openai/deploy", json={"api_key": "sk-blip-0001", "chat_name": chat_name, "model_name": "m",
                                              "base_url": fake_openai.base_url})
        assert r.status_code == 200, r.text
        for i in range(4):
            assert http.post("/chat", json={"chat_name": chat_name, "content": "before"}).status_code == 200
        pids = worker_pids(gw.pid)
        assert len(pids) == 2
        for blip in (1.0, 3.0):
            proxy.pause()
            until = time.monotonic() + blip
            while time.monotonic() < until:
                r = http.post("/chat", json={"chat_name": chat_name, "content": "during"})
                assert r.status_code == 200, (blip, r.text)
                time.sleep(0.2)
            proxy.resume()
            time.sleep(2.5)  # a watchdog that had declared the cluster lost would restart its worker now
            for i in range(4):
                r = http.post("/chat", json={"chat_name": chat_name, "content": "after"})
                assert r.status_code == 200 and r.json()["output"] == "echo: after", (blip, r.text)
        assert worker_pids(gw.pid) == pids, log_path.read_text()[-3000:]
    text = log_path.read_text()
    assert "lost;" not in text and "reconnects by restarting" not in text, text[-3000:]
    assert "carrying on" in text, text[-3000:]  # the long blip was looked at, and the call decided


def test_liveness_fails_only_once_this_hosts_ray_node_is_gone(through_a_proxy):
    """What a gateway pod sees when its own raylet dies while the cluster lives on: /healthz
    turns 503 after the grace (so Kubernetes restarts the pod and its ``ray start``)."""
    import ray  # noqa: F401 - Ray ships the psutil it imports
    import psutil

    head, base, gw, log_path = through_a_proxy.head, through_a_proxy.base, through_a_proxy.gw, through_a_proxy.log_path
    if through_a_proxy.proxy._listener is None:  # (the blip test failed mid-blip)
        through_a_proxy.proxy.resume()
    wait_ready(base, gw, log_path)
    assert get(base + "/healthz").json() == {"status": "ok"}
    # Kill the head's raylet but keep its GCS: `ray start --block` would take the whole head
    # down with it, so it is stopped first.
    os.kill(head.proc.pid, signal.SIGSTOP)
    through_a_proxy.stopped = True
    raylets = [p for p in psutil.process_iter(["cmdline"])
               if p.info["cmdline"] and os.path.basename(p.info["cmdline"][0]) == "raylet"
               and os.getpgid(p.pid) == head.proc.pid]
    assert len(raylets) == 1
    raylets[0].kill()
    started, deadline, r = time.monotonic(), time.monotonic() + 120, None
    while time.monotonic() < deadline:
        r = get(base + "/healthz")
        if r is not None and r.status_code != 200:
            break
        time.sleep(0.5)
    print(f"/healthz failed {time.monotonic() - started:.1f}s after the node died")
    assert r is not None and r.status_code == 503, log_path.read_text()[-3000:]
    body = r.json()
    assert body["error"]["type"] == "cluster_unavailable" and "Ray node" in body["error"]["message"], body
    assert body["checks"]["node_gone_for_s"] >= 5 and r.headers["Retry-After"]


def test_a_process_that_left_the_cluster_is_not_joined_again_by_a_late_call(ray_head, tmp_path):
    """After ``Cluster.disconnect`` (a gunicorn worker's exit hook), a thread still running (a lease renewal, a
    deploy being followed) that calls an actor must fail, not make this process a driver again: Ray's
    ``.remote()`` connects by itself (``ray.init()``, its defaults: another namespace, the driver's log on)
    and the head stopping under that second connection ended the process with exit code 1, no line printed
    (a CI run's test session ended so, in its last teardown)."""
    script = (
        "import gateway, ray\n"  # (the gateway's package first, as app.py imports it)
        "from gateway.cluster import Cluster\n"
        "c = Cluster(gateway.Settings.from_env(ship_code=False))\n"
        "registry = c.registry()\n"
        "c.disconnect()\n"
        "try:\n"
        "    ray.get(registry.versions.remote(), timeout=10)\n"
        "    outcome = 'answered'\n"
        "except Exception as exc:\n"
        "    outcome = type(exc).__name__\n"
        "print('OUTCOME', outcome, ray.is_initialized())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "RAY_ADDRESS": ray_head.address},
                          capture_output=True, text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("OUTCOME")]
    assert line, done.stdout[-2000:] + done.stderr[-3000:]
    _, outcome, initialized = line[0].split()
    assert (outcome, initialized) != ("answered", "True"), "the late call joined the cluster again"
    assert initialized == "False" and outcome != "answered", line
