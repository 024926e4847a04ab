"""The real start commands: gunicorn (joined to a cluster, and with its own embedded head) and ``python app.py``."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import ray

from gateway.head import free_port, reachable
from tests.fakes.upstreams import Reply
from tests.procs import gunicorn_joined_to, start, stop, wait_ready, worker_pids


@ray.remote(num_cpus=0)
def peek(pids: list[int]) -> dict:
    """What a task on the cluster reads of these processes: ``/proc/<pid>/environ`` and ``/proc/<pid>/mem``."""
    seen: dict = {}
    for pid in pids:
        for what in ("environ", "mem"):
            try:
                with open(f"/proc/{pid}/{what}", "rb") as f:
                    seen[f"{pid}/{what}"] = f.read(1 << 20) if what == "environ" else "opened"
            except OSError as exc:
                seen[f"{pid}/{what}"] = type(exc).__name__
    return seen


@pytest.fixture(scope="module")
def gunicorn_joined(ray_head, tmp_path_factory):
    """One gunicorn joined to the session's cluster for the module's tests that need one (a start costs seconds):
    the hang-up test first, then the user session's, which stops it (SIGTERM) as its last step."""
    yield from gunicorn_joined_to(ray_head.address, tmp_path_factory.mktemp("gunicorn_joined") / "gunicorn.log")


def test_a_client_hanging_up_mid_stream_cancels_the_upstream_call(gunicorn_joined, fake_openai):
    base, _, _ = gunicorn_joined
    chat_name, key = f"hangup_{uuid.uuid4().hex[:8]}", f"sk-hangup-{uuid.uuid4().hex}"
    with httpx.Client(base_url=base, timeout=60) as http:
        r = http.post("/openai/deploy", json={"api_key": key, "chat_name": chat_name, "model_name": "m",
                                              "base_url": fake_openai.base_url})
        assert r.status_code == 200, r.text
        fake_openai.script(key, Reply(pieces=[f"p{i} " for i in range(60)], piece_delay=0.2))
        with http.stream("POST", "/chat", json={"chat_name": chat_name, "content": "x", "stream": True}) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got = [line for line in (next(lines) for _ in range(4)) if line.startswith("data: ")]
            assert got and '"delta"' in got[0]
        # The caller is gone: the replica's upstream stream must be closed, long before its 12 s end.
        sent = fake_openai.abandoned_after(key)
        assert sent is not None and sent < 60, fake_openai.abandoned
        http.post("/openai/undeploy", json={"chat_name": chat_name})


def test_gunicorn_serves_the_user_session_and_stops_gracefully(gunicorn_joined, fake_openai, app):  # (app: Ray connected)
    base, proc, log_path = gunicorn_joined
    chat_name = f"gunicorn_{uuid.uuid4().hex[:8]}"
    key = f"sk-gunicorn-{uuid.uuid4().hex}"
    with httpx.Client(base_url=base, timeout=60) as http:
        r = http.post("/openai/deploy", json={
            "api_key": key, "chat_name": chat_name, "model_name": "gpt-4o-mini",
            "model_type": "saas/openai", "http_proxy": fake_openai.base_url, "workers": 2,
        })
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "RUNNING"
        for _ in range(10):  # spread over both workers and both replicas
            r = http.post("/openai/chat", json={"chat_name": chat_name, "content": "你好，你是谁"})
            assert r.status_code == 200 and r.json() == "echo: 你好，你是谁"
        r = http.post("/chat", json={"chat_name": chat_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
        assert r.status_code == 200 and r.json()["output"] == "echo: hi"
        assert any(d["chat_name"] == chat_name for d in http.get("/deployments").json()["deployments"])

        # Code running on the cluster (a replica, a model's own code) finds no secret of the gateway's: its
        # memory cannot be opened, its environment holds none (gateway.secrecy). The canaries are conftest's,
        # in the environment gunicorn was started with.
        gateway_pids = [proc.pid, *worker_pids(proc.pid)]
        canaries = [os.environ[name].encode() for name in ("OPENAI_API_KEY", "MY_LEGACY_APP_SECRET")]
        seen = ray.get(peek.remote(gateway_pids), timeout=60)
        for pid in gateway_pids:
            assert seen[f"{pid}/mem"] == "PermissionError", (pid, seen[f"{pid}/mem"])
            environ = seen[f"{pid}/environ"]
            assert environ == "PermissionError" or (b"OPENAI_API_KEY=*" in environ
                                                    and not any(c in environ for c in canaries)), (pid, environ)

        # SIGTERM while a slow call is in flight: the call finishes, then gunicorn exits 0.
        fake_openai.script(key, Reply(delay=2.0))
        result = {}

        def slow_call():
            with httpx.Client(base_url=base, timeout=60) as other:
                result["r"] = other.post("/chat", json={"chat_name": chat_name, "content": "slow"})

        caller = threading.Thread(target=slow_call)
        caller.start()
        time.sleep(0.7)
        proc.send_signal(signal.SIGTERM)
        caller.join(30)
        assert result["r"].status_code == 200 and result["r"].json()["output"] == "echo: slow"
        assert proc.wait(40) == 0
    text = log_path.read_text()
    # the stop says what it waits for: the one call in flight, then that the endpoints live on
    assert "stopping: waiting for 1 request in flight, up to 30 s" in text, text[-3000:]
    assert "stopped: the endpoints keep running in the Ray cluster at 127.0.0.1:" in text, text[-3000:]
    # The endpoint outlives the gateway process: it lives in the cluster.
    from ray import serve

    assert serve.status().applications[chat_name].status == "RUNNING"
    serve.delete(chat_name)
    assert key not in log_path.read_text()


#: what Ray printed into a gateway's log on a start, four deploys, a burst of calls and a stop: none a fault
RAY_NOISE = ("Failed to get queue length", "high network latency", "SIGTERM handler is not set",
             "New http_options/controller_options will not be applied", "SIGTERM received", "logging.cc")


def test_gunicorn_with_its_embedded_head_starts_and_stops_it(tmp_path, fake_openai):
    """...and says each step; its /metrics holds only the gateway's series; its metrics directory goes with it.

    With four endpoints and a burst of 100 calls in between: Ray's harmless noise stays out of the log,
    and the stop says what it waits for."""
    import re

    from prometheus_client.parser import text_string_to_metric_families

    from tests.test_secrets import ray_token

    port, ray_port, dash_port = free_port(), free_port(), free_port()
    log_path = tmp_path / "gunicorn-embedded.log"
    started = time.monotonic()
    proc = start(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"],
        {"GATEWAY_BIND": f"127.0.0.1:{port}", "GATEWAY_WORKERS": "1", "GATEWAY_RAY_PORT": str(ray_port),
         "GATEWAY_DASHBOARD_PORT": str(dash_port), "GATEWAY_OBJECT_STORE_MB": "100"},
        log_path,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        ready = wait_ready(base, proc, log_path)
        print(f"embedded start to ready: {time.monotonic() - started:.1f}s")
        assert ready["ray_address"] == f"127.0.0.1:{ray_port}"
        assert reachable(f"127.0.0.1:{dash_port}")  # the dashboard, on loopback
        with httpx.Client(base_url=base, timeout=60) as http:
            r = http.post("/openai/deploy", json={"api_key": "sk-embedded-0001", "chat_name": "openai_chat",
                                                  "model_name": "gpt-4o-mini", "http_proxy": fake_openai.base_url})
            assert r.status_code == 200, r.text
            assert http.post("/openai/chat", json={"chat_name": "openai_chat", "content": "hi"}).json() == "echo: hi"
            names = ["openai_chat", *(f"embedded_{i}" for i in range(3))]

            def deploy(i: int) -> httpx.Response:  # (the three at once: each waits for its worker)
                with httpx.Client(base_url=base, timeout=60) as one:
                    return one.post("/openai/deploy", json={"api_key": f"sk-embedded-{i:04d}-{uuid.uuid4().hex}",
                                                            "chat_name": names[1 + i], "model_name": "m",
                                                            "base_url": fake_openai.base_url})

            with ThreadPoolExecutor(3) as pool:
                for r in pool.map(deploy, range(3)):
                    assert r.status_code == 200, r.text
            answers: list[int] = []

            def call(i: int) -> None:
                with httpx.Client(base_url=base, timeout=60) as one:
                    answers.append(one.post("/chat", json={"chat_name": names[i % 4], "content": "hi"}).status_code)

            callers = [threading.Thread(target=call, args=(i,)) for i in range(100)]
            for caller in callers:
                caller.start()
            for caller in callers:
                caller.join(120)
            assert answers == [200] * 100, answers
            scrape = http.get("/metrics").text
        # each step said: the head starting, then (the master, once the worker is connected) where to go
        for _ in range(50):
            text = log_path.read_text()
            if "Ray dashboard:" in text:
                break
            time.sleep(0.2)
        assert "starting the embedded Ray head" in text
        assert f"ready: the gateway serves http://127.0.0.1:{port} (1 worker)" in text, text[-3000:]
        assert (f"Ray dashboard: http://127.0.0.1:{dash_port} (the page asks for the Ray token, in ~/.ray/auth_token; "
                f'its REST API takes it as a header: curl -H "Authorization: Bearer $(cat ~/.ray/auth_token)" '
                f"http://127.0.0.1:{dash_port}/api/serve/applications/)") in text
        assert ray_token() not in text
        # /metrics: the gateway's series only (no Ray process writes into its directory)
        names = {f.name for f in text_string_to_metric_families(scrape)}
        assert "gateway_requests" in names and "gateway_endpoints" in names, names
        assert not [n for n in names if not n.startswith("gateway_")], names
        metrics_dir = Path(re.search(r"metrics directory (\S+)", text).group(1))
        writers = {int(re.search(r"_(\d+)\.db$", f.name).group(1)) for f in metrics_dir.glob("*.db")}
        assert writers and writers <= worker_pids(proc.pid), (writers, sorted(metrics_dir.iterdir()))
    finally:
        stopping = time.monotonic()
        code = stop(proc)
        print(f"embedded stop, nothing in flight: {time.monotonic() - stopping:.1f}s")
    text = log_path.read_text()
    assert code == 0, text[-3000:]
    assert not metrics_dir.exists(), "the gateway left its metrics directory behind"
    # the stop says what it waits for, to the end
    assert f"stopping the embedded Ray head at 127.0.0.1:{ray_port}" in text, text[-3000:]
    assert "stopped: the gateway and its embedded Ray head" in text, text[-3000:]
    noise = [line for line in text.splitlines() if any(n in line for n in RAY_NOISE)]
    assert not noise, "\n".join(noise[:20])
    for _ in range(50):
        if not reachable(f"127.0.0.1:{ray_port}", 0.2):
            break
        time.sleep(0.2)
    assert not reachable(f"127.0.0.1:{ray_port}", 0.2), "the embedded head outlived the gateway"


def test_python_app_py_quick_try(ray_head, tmp_path):
    port = free_port()
    log_path = tmp_path / "app.log"
    proc = start([sys.executable, "app.py"], {"RAY_ADDRESS": ray_head.address, "GATEWAY_BIND": f"127.0.0.1:{port}"}, log_path)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, log_path)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").json() == {"status": "ok"}
    finally:
        stop(proc)


def test_joining_a_foreign_cluster_ships_the_gateway_code(tmp_path, fake_openai):
    """A cluster started elsewhere (no checkout on its PYTHONPATH) still runs our replicas."""
    import json
    import urllib.request

    from tests.test_secrets import ray_token

    ray_port, dash_port, port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env["RAY_AUTH_MODE"] = "token"
    # On SIGTERM ``ray start --block`` drains its node for up to 30 s (for a multi-node cluster to move
    # replicas away); this one-node cluster has nothing to move, and its stop is no part of the test.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={ray_port}", f"--dashboard-port={dash_port}", "--num-cpus=1", f"--ray-client-server-port={free_port()}",
         f"--dashboard-agent-listen-port={free_port()}", "--object-store-memory=100000000", "--disable-usage-stats"],
        cwd=tmp_path, env=env, stdout=open(tmp_path / "head.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    log_path = tmp_path / "gunicorn.log"
    gw = None
    try:
        for _ in range(300):
            if reachable(f"127.0.0.1:{ray_port}", 0.2):
                break
            time.sleep(0.1)
        gw = start([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"],
                   {"RAY_ADDRESS": f"127.0.0.1:{ray_port}", "GATEWAY_BIND": f"127.0.0.1:{port}", "GATEWAY_WORKERS": "1"},
                   log_path)
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, gw, log_path)
        with httpx.Client(base_url=base, timeout=60) as http:
            r = http.post("/openai/deploy", json={"api_key": "sk-foreign-0001", "chat_name": "foreign",
                                                  "model_name": "m", "base_url": fake_openai.base_url})
            assert r.status_code == 200, r.text
            # the head has no checkout on its path: the replica answers with the shipped code
            assert http.post("/openai/chat", json={"chat_name": "foreign", "content": "hi"}).json() == "echo: hi"
        req = urllib.request.Request(f"http://127.0.0.1:{dash_port}/api/serve/applications/",
                                     headers={"Authorization": f"Bearer {ray_token()}"})
        apps = json.loads(urllib.request.urlopen(req, timeout=30).read())["applications"]
        options = apps["foreign"]["deployments"]["openai"]["deployment_config"]["ray_actor_options"]
        # the replica's own runtime_env holds only its Serve settings; Serve merges the job's py_modules
        # (gateway/ and providers/) into it when it starts the replica
        assert set(options["runtime_env"]) == {"env_vars"}
        assert options["runtime_env"]["env_vars"]["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"
        assert "sk-foreign-0001" not in json.dumps(apps)
    finally:
        if gw is not None:
            stop(gw)
        head.send_signal(signal.SIGTERM)
        head.wait(60)


def test_a_gateway_joining_a_head_on_loopback_needs_no_ray_switch_set(ray_head, tmp_path):
    """``RAY_ADDRESS=127.0.0.1:port`` is all a user sets to run a second gateway host next to a head on
    loopback: without Ray's loopback switch (``gateway.ray_switches.LOOPBACK_SWITCH``) a Ray driver rewrote the
    address to the host's own and never connected, and /readyz said "starting" for ever (seen by the
    two-hosts bench of issue 27)."""
    from gateway.ray_switches import LOOPBACK_SWITCH
    from tests.procs import ROOT

    assert ray_head.address.startswith("127.0.0.1:")
    port = free_port()
    log_path = tmp_path / "gunicorn.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_") and k != LOOPBACK_SWITCH}
    env.update({"RAY_ADDRESS": ray_head.address, "GATEWAY_BIND": f"127.0.0.1:{port}", "GATEWAY_WORKERS": "1"})
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"], cwd=ROOT, env=env,
                            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_ready(f"http://127.0.0.1:{port}", proc, log_path, limit=90)["status"] == "ready"
    finally:
        stop(proc)
