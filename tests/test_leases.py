"""Leases of the registry: owner-tagged and renewed, so a dead holder frees them within a TTL, and
only their holder releases them.

Real faults: a gunicorn worker killed with SIGKILL while it applies the endpoints file (the other
workers and its replacement must be ready within a minute, not after the old 15-minute lease), and
an undeploy racing a fresh deploy of a failed name (no Serve application may be left running
without its registry record, holding its key).
"""
from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
import uuid

import httpx
import pytest
import yaml

from gateway.head import free_port
from gateway.leases import Leases, endpoint_lease
from tests.fakes.upstreams import Reply
from tests.procs import start, stop, worker_pids


# -- the bookkeeping, without Ray ------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_only_the_owner_renews_or_releases_a_lease_and_an_expired_one_is_free():
    clock = Clock()
    leases = Leases(clock)
    a, b = "host/101/aaaa", "host/202/bbbb"
    assert leases.claim("apply", a, 15) is None
    held = leases.claim("apply", b, 15)
    assert held["owner"] == a and held["pid"] == 101 and held["host"] == "host" and held["expires_in_s"] == 15
    assert not leases.release("apply", b) and not leases.renew("apply", b, 15)  # not b's to free or keep
    assert not leases.may_write("apply", b) and leases.may_write("apply", a)
    clock.now += 10
    assert leases.renew("apply", a, 15)  # the holder's heartbeat
    clock.now += 10
    assert leases.claim("apply", b, 15) is not None  # renewed: still a's
    clock.now += 6  # a died: no renewal for longer than the TTL
    assert leases.holder("apply") is None and leases.view() == {}
    assert leases.claim("apply", b, 15) is None  # free for the next one
    assert not leases.renew("apply", a, 15)  # a's late renewal does not take it back
    assert not leases.release("apply", a) and leases.release("apply", b)
    assert leases.renew("apply", a, 15)  # free (released, or forgotten by a restarted registry): taken again
    assert set(leases.view()) == {"apply"}


# -- kill -9 mid-apply -----------------------------------------------------------------
def _applier(master_pid: int, upstream_port: int) -> int | None:
    """The gunicorn worker applying the file now: the one whose key check is talking to the upstream."""
    import ray  # noqa: F401 - Ray ships the psutil it imports
    import psutil

    for pid in worker_pids(master_pid):
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            continue
        if any(c.raddr and c.raddr.port == upstream_port and c.status == psutil.CONN_ESTABLISHED for c in conns):
            return pid
    return None


def test_a_worker_killed_mid_apply_frees_the_apply_lease_within_a_minute(ray_head, app, fake_openai, tmp_path):
    """The worker applying ``GATEWAY_ENDPOINTS_FILE`` (its key check takes 4 s at the upstream) is killed
    with SIGKILL: the other worker and the worker gunicorn starts in its place apply the file and are
    ready within a minute (the apply lease it held, renewed every few seconds, expires in
    ``GATEWAY_LEASE_TTL_S``: 5 s here; the default, 15 s, only waits longer)."""
    from ray import serve

    key = f"sk-lease-{uuid.uuid4().hex}"
    chat_name = f"lease_apply_{uuid.uuid4().hex[:6]}"
    fake_openai.script_models(key, Reply(delay=4.0))  # only the first key check is slow: the killed apply's
    path = tmp_path / "endpoints.yaml"
    path.write_text(yaml.safe_dump({"endpoints": [
        {"chat_name": chat_name, "provider": "openai", "model_name": "m", "api_key_env": "TEST_LEASE_KEY",
         "base_url": fake_openai.base_url}]}))
    port, log_path = free_port(), tmp_path / "gunicorn.log"
    base = f"http://127.0.0.1:{port}"
    gw = start([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"],
               {"RAY_ADDRESS": ray_head.address, "GATEWAY_BIND": f"127.0.0.1:{port}", "GATEWAY_WORKERS": "2",
                "GATEWAY_THREADS": "8", "GATEWAY_ENDPOINTS_FILE": str(path), "TEST_LEASE_KEY": key,
                "GATEWAY_LEASE_TTL_S": "5"}, log_path)
    client = app.test_client()
    began = time.monotonic()
    try:
        deadline, victim = time.monotonic() + 120, None
        while victim is None:
            assert gw.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            victim = _applier(gw.pid, fake_openai.port)
            time.sleep(0.05)
        # the registry says who holds the apply lease: that worker
        import ray

        registry = app.extensions["gateway"].cluster.registry()
        holder = ray.get(registry.leases.remote()).get("apply")
        assert holder and holder["pid"] == victim, holder
        workers = worker_pids(gw.pid)
        assert victim in workers and len(workers) == 2
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        print(f"worker {victim} killed {killed - began:.1f}s after the start, while it applied the file")

        # every worker ready: each logged its start, and /readyz answers 200 again and again
        ready_after, last = None, None
        while time.monotonic() - killed < 90:
            assert gw.poll() is None, log_path.read_text()[-3000:]
            pids = worker_pids(gw.pid)
            started = {int(p) for p in re.findall(r"started \(pid (\d+)\)", log_path.read_text())}
            if len(pids) == 2 and victim not in pids and pids <= started:
                answers = []
                for _ in range(10):
                    r = httpx.get(base + "/readyz", timeout=10)
                    answers.append(r.status_code)
                    last = r.text
                if answers == [200] * 10:
                    ready_after = time.monotonic() - killed
                    break
            else:
                try:
                    last = httpx.get(base + "/readyz", timeout=10).text
                except httpx.TransportError as exc:
                    last = repr(exc)
            time.sleep(0.5)
        print(f"every worker ready {ready_after if ready_after is None else round(ready_after, 1)}s after the "
              f"applying worker was killed (lease TTL 5 s)")
        assert ready_after is not None and ready_after < 60, (last, log_path.read_text()[-3000:])
        text = log_path.read_text()
        assert "is applying" in text  # the others waited for it...
        assert f"pid {victim} holds the apply lease" in text  # ...and it was the one applying
        # the file was applied by the survivors: the endpoint is there, and serves
        assert chat_name in serve.status().applications
        r = httpx.post(base + "/chat", json={"chat_name": chat_name, "content": "after"}, timeout=60)
        assert r.status_code == 200 and r.json()["output"] == "echo: after", r.text
        assert "apply" not in ray.get(registry.leases.remote())  # released by the survivors
    finally:
        stopping = time.monotonic()
        stop(gw)
        client.post("/openai/undeploy", json={"chat_name": chat_name})
        print(f"stop and undeploy: {time.monotonic() - stopping:.1f}s")
    assert key not in log_path.read_text()


# -- an undeploy racing a fresh deploy of a failed name ----------------------------------
def _orphans(client, chat_name: str) -> list[str]:
    """What runs in Serve under ``chat_name`` without a registry record (it holds its key all the same)."""
    import ray
    from ray import serve

    registry = client.application.extensions["gateway"].cluster.registry()
    found = []
    app = serve.status().applications.get(chat_name)
    if app is not None and str(getattr(app.status, "value", app.status)) != "DELETING":
        if ray.get(registry.get.remote(chat_name)) is None:
            found.append(f"Serve runs {chat_name} ({app.status}) and the registry has no record of it")
        rows = {r["chat_name"]: r for r in client.get("/deployments").get_json()["deployments"]}
        if chat_name in rows and "created_at" not in rows[chat_name]:
            found.append(f"GET /deployments lists {chat_name} from Serve alone: {rows[chat_name]}")
    return found


def _fail(client, chat_name: str, fake_openai) -> None:
    """Deploy ``chat_name`` so that its replica fails to start: DEPLOY_FAILED, and its application gone."""
    from ray import serve

    r = client.post("/brittle/deploy", json={"api_key": f"sk-race-{uuid.uuid4().hex}", "chat_name": chat_name,
                                             "model_name": "unbuildable-1", "base_url": fake_openai.base_url})
    assert r.status_code == 422 and r.get_json()["error"]["type"] == "deploy_failed", r.get_json()
    assert client.get(f"/deployments/{chat_name}").get_json()["status"] == "DEPLOY_FAILED"
    deadline = time.monotonic() + 60
    while chat_name in serve.status().applications:
        assert time.monotonic() < deadline, "the failed application was not removed"
        time.sleep(0.1)


@pytest.fixture
def slow_serve_looks(monkeypatch):
    """Serve's controller answering late, once, for a request labelled here: ``slow[label] = (delay, when)``
    makes the next look of the request whose ``X-Test-Label`` header is ``label`` at Serve's applications (for which ``when()`` is true) come back
    ``delay`` seconds after it was taken, as from a loaded controller; ``looked`` is set when it was taken."""
    import gateway.serve_apps as endpoints

    real = endpoints._app_statuses
    slow: dict[str, tuple] = {}
    looked = threading.Event()

    def app_statuses():
        from flask import has_request_context, request

        apps = real()
        name = request.headers.get("X-Test-Label") if has_request_context() else None
        if name in slow and slow[name][1]():
            delay, _ = slow.pop(name)
            looked.set()
            time.sleep(delay)
        return apps

    monkeypatch.setattr(endpoints, "_app_statuses", app_statuses)
    return slow, looked


def test_an_undeploy_racing_a_fresh_deploy_of_a_failed_name_leaves_no_orphan(client, app, fake_openai, name,
                                                                              slow_serve_looks):
    """A name whose deploy failed is deployed again while it is undeployed, both ways round:

    1. the undeploy looks at Serve first (its answer comes 3 s late), the fresh deploy starts meanwhile;
    2. the fresh deploy holds the name (its look comes 3 s late), the undeploy comes meanwhile.

    Either may win, and each answers as before (a deploy refused with 409 while the name is busy, a
    deploy cancelled by the undeploy, an undeploy that waited for the deploy); never is an application
    left running in Serve without its registry record."""
    import ray

    slow, looked = slow_serve_looks
    chat_name = name("race")
    good = {"api_key": f"sk-race-{uuid.uuid4().hex}", "chat_name": chat_name, "model_name": "m",
            "base_url": fake_openai.base_url}
    registry = app.extensions["gateway"].cluster.registry()
    answers: dict[str, object] = {}

    def call(label: str, path: str, body: dict) -> threading.Thread:
        def run() -> None:
            r = app.test_client().post(path, json=body, headers={"X-Test-Label": label})
            answers[label] = (r.status_code, r.get_json())
        thread = threading.Thread(target=run, name=label)
        thread.start()
        return thread

    began = time.monotonic()
    try:
        # 1. the undeploy first, a fresh deploy while it waits for Serve's answer
        _fail(client, chat_name, fake_openai)
        print(f"failed deploy: {time.monotonic() - began:.1f}s")
        slow.clear(), looked.clear()
        slow["undeploy-1"] = (3.0, lambda: True)
        undeploying = call("undeploy-1", "/brittle/undeploy", {"chat_name": chat_name})
        assert looked.wait(30)
        deploying = call("deploy-1", "/brittle/deploy", good)
        deploying.join(120), undeploying.join(120)
        print(f"{time.monotonic() - began:.1f}s: undeploy first:", {k: (v[0], (v[1].get("error") or {}).get("type") or v[1].get("status"))
                                  for k, v in answers.items()})
        assert answers["undeploy-1"][0] == 200, answers
        assert answers["deploy-1"][0] in (200, 409), answers
        assert not _orphans(client, chat_name), _orphans(client, chat_name)

        # 2. the fresh deploy first (it holds the name while Serve's answer comes), the undeploy meanwhile
        client.post("/brittle/undeploy", json={"chat_name": chat_name})
        _fail(client, chat_name, fake_openai)
        answers.clear(), slow.clear(), looked.clear()
        slow["deploy-2"] = (3.0, lambda: endpoint_lease(chat_name) in ray.get(registry.leases.remote()))
        deploying = call("deploy-2", "/brittle/deploy", good)
        assert looked.wait(30)
        assert endpoint_lease(chat_name) in ray.get(registry.leases.remote())  # the deploy holds the name
        undeploying = call("undeploy-2", "/brittle/undeploy", {"chat_name": chat_name})
        deploying.join(120), undeploying.join(120)
        print(f"{time.monotonic() - began:.1f}s: deploy first:", {k: (v[0], (v[1].get("error") or {}).get("type") or v[1].get("status"))
                                for k, v in answers.items()})
        assert answers["undeploy-2"][0] == 200, answers  # it waited for the deploy, then cancelled it
        assert not _orphans(client, chat_name), _orphans(client, chat_name)
        assert endpoint_lease(chat_name) not in ray.get(registry.leases.remote())
    finally:
        slow.clear()
        client.post("/brittle/undeploy", json={"chat_name": chat_name})


def test_a_registry_an_older_gateway_started_is_replaced_and_keeps_its_records(app, shared_endpoint):
    """A detached registry outlives the gateway that made it and runs that gateway's code (a cluster that
    outlived an upgrade): the first process that finds it replaces it, and its records come back from the GCS.
    (In a name namespace of its own, so that the session's registry is left alone; the records it reads are the
    session's, kept in the GCS under the job's namespace.)"""
    import ray

    from gateway.registry import PROTOCOL, REGISTRY_NAME, registry_actor

    chat_name, _, _ = shared_endpoint("openai")  # (one record at least)
    session = app.extensions["gateway"].cluster.registry()
    namespace = f"upgrade_{uuid.uuid4().hex[:8]}"

    @ray.remote(num_cpus=0)
    class OlderRegistry:  # what an older gateway's registry answers: no protocol(), the old begin()
        def begin(self, name, provider, ttl_s):
            return "ok", None

    old = OlderRegistry.options(name=REGISTRY_NAME, namespace=namespace, lifetime="detached").remote()
    assert ray.get(old.begin.remote("x", "openai", 60), timeout=60) == ("ok", None)
    registry = registry_actor(namespace)
    try:
        assert ray.get(registry.protocol.remote(), timeout=60) == PROTOCOL
        assert ray.get(registry.get.remote(chat_name), timeout=60) == ray.get(session.get.remote(chat_name), timeout=60)
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(old.begin.remote("x", "openai", 60), timeout=60)  # the old one is gone
        assert ray.get(registry_actor(namespace).protocol.remote(), timeout=60) == PROTOCOL  # (found as it is now)
    finally:
        ray.kill(registry, no_restart=True)
