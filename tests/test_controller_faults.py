"""Faults of the cluster's shared services around a call, each injected for real, and answers the
provider billed: Serve's controller stopped (SIGSTOP) under a burst of probes and listings, the
endpoint registry stopped while a call succeeds, an answer larger than gRPC's default 4 MiB, and
a replica killed while the provider is answering (the call is not sent again)."""
from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import ray

from gateway import Settings, create_app
from tests.fakes.upstreams import Reply, openai_error
from tests.conftest import key
from tests.procs import gunicorn_joined_to





def _pid_of(actor) -> int:
    """The pid of an actor's process, asked while it still answers."""
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)


# -- one answer per process, bounded ------------------------------------------------------------------
def test_a_shared_answer_asks_once_for_a_burst_and_never_waits_past_its_bound():
    from gateway.cluster_answers import SharedAnswer
    from contract.errors import GatewayError

    looks, release = [], threading.Event()

    def look():
        looks.append(time.monotonic())
        if not release.wait(5):
            raise TimeoutError
        return len(looks)

    shared = SharedAnswer(look, "the test's look", fresh_s=1.0, wait_s=0.3)

    def get():
        t = time.monotonic()
        try:
            return shared.get(), time.monotonic() - t
        except GatewayError as err:
            return err.info, time.monotonic() - t

    with ThreadPoolExecutor(50) as pool:  # a look that hangs: every caller is answered within the bound
        answers = list(pool.map(lambda _: get(), range(50)))
    assert len(looks) == 1
    assert all(getattr(a, "type", None) == "cluster_unavailable" and a.retry_after == 2 for a, _ in answers), answers
    assert max(s for _, s in answers) < 1.0
    late = get()  # past the bound of the look under way: answered at once, and no second look
    assert late[1] < 0.05 and len(looks) == 1
    release.set()
    time.sleep(0.05)
    assert get()[0] == 1  # the look's answer, kept when it came
    with ThreadPoolExecutor(20) as pool:  # fresh: nobody asks again
        assert set(pool.map(lambda _: get()[0], range(20))) == {1} and len(looks) == 1
    shared.forget()
    assert get()[0] == 2
    # A slow success is never served stale ("ready" must be fresh): the callers wait for the next look, within
    # the bound.
    release.clear()
    shared.forget()
    threading.Timer(0.5, release.set).start()
    assert getattr(get()[0], "type", None) == "cluster_unavailable"  # (late: nothing within 0.3 s)
    time.sleep(1.3)  # (the slow look's answer, 3, came at 0.5 s; and is no longer fresh now)
    release.clear()
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: get(), range(20)))
    assert {getattr(a, "type", None) for a, _ in answers} == {"cluster_unavailable"} and len(looks) == 4, answers
    assert max(s for _, s in answers) < 1.0
    # A slow failure is: while the next look runs, callers get it at once, without a wait.
    threading.Timer(0.1, release.set).start()  # (the 4th look, hanging until now, answers 4)
    time.sleep(0.2)
    assert get()[0] == 4
    failing = SharedAnswer(lambda: (time.sleep(0.5), 1 / 0), "the test's failing look", fresh_s=0.2, wait_s=0.3)
    assert getattr(failing_get(failing), "type", None) == "cluster_unavailable"  # (waits 0.3 s: nothing yet)
    time.sleep(0.5)  # (it failed, slowly, at 0.5 s; no longer fresh after 0.2 s)
    started = time.monotonic()
    answer = failing_get(failing)
    assert getattr(answer, "type", None) == "cluster_unavailable" and time.monotonic() - started < 0.1


def failing_get(shared):
    from contract.errors import GatewayError

    try:
        return shared.get()
    except GatewayError as err:
        return err.info


# -- Serve's controller stops answering -------------------------------------------------------------
def test_a_stopped_serve_controller_bounds_readyz_and_model_lists_and_chats_still_answer(ray_head, tmp_path, client,
                                                                                          fake_openai):
    """``kill -STOP`` the ServeController, then 100 concurrent /readyz, 20 /v1/models and a chat to a
    deployed endpoint, through gunicorn (one worker, 8 threads: what a burst of probes starves)."""
    runner = gunicorn_joined_to(ray_head.address, tmp_path / "gunicorn.log", GATEWAY_WORKERS="1")
    base, _, _ = next(runner)
    chat_name = f"ctl_{uuid.uuid4().hex[:6]}"
    assert client.get("/readyz").status_code == 200  # (this process is connected to the cluster)
    controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    pid = _pid_of(controller)  # (a stopped controller could not say)
    try:
        with httpx.Client(base_url=base, timeout=60) as http:
            r = http.post("/openai/deploy", json={"api_key": key(), "chat_name": chat_name, "model_name": "m",
                                                  "base_url": fake_openai.base_url, "max_retries": 0})
            assert r.status_code == 200, r.text
            # the worker knows the endpoint (its handle and replicas) before the controller stops
            assert http.post("/chat", json={"chat_name": chat_name, "content": "warm"}).status_code == 200
            assert http.get("/readyz").status_code == 200

        def get(path: str) -> tuple[int, float, str]:
            t = time.perf_counter()
            try:
                with httpx.Client(base_url=base, timeout=20) as c:
                    r = c.get(path)
                status, after = r.status_code, r.headers.get("Retry-After", "")
            except httpx.HTTPError as exc:
                status, after = 0, type(exc).__name__
            return status, time.perf_counter() - t, after

        def chat() -> tuple[int, float, str]:
            t = time.perf_counter()
            try:
                with httpx.Client(base_url=base, timeout=20) as c:
                    r = c.post("/chat", json={"chat_name": chat_name, "content": "still there?"})
                status, text = r.status_code, r.text[:200]
            except httpx.HTTPError as exc:
                status, text = 0, type(exc).__name__
            return status, time.perf_counter() - t, text

        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.perf_counter()
            with ThreadPoolExecutor(121) as pool:
                probes = [pool.submit(get, "/readyz") for _ in range(100)]
                lists = [pool.submit(get, "/v1/models") for _ in range(20)]
                time.sleep(0.2)  # (the chat queues behind the burst)
                chatted = pool.submit(chat)
                readyz = [f.result() for f in probes]
                models = [f.result() for f in lists]
                chat_answer = chatted.result()
            burst_s = time.perf_counter() - started
        finally:
            os.kill(pid, signal.SIGCONT)
        slowest = max(s for _, s, _ in readyz + models)
        print(f"controller stopped: 100 /readyz + 20 /v1/models answered in {burst_s:.2f}s (slowest {slowest:.2f}s): "
              f"readyz {sorted({(st, a) for st, _, a in readyz})}, models {sorted({(st, a) for st, _, a in models})}; "
              f"the chat: {chat_answer[0]} in {chat_answer[1]:.2f}s")
        assert all(st in (200, 503) for st, _, _ in readyz + models), readyz + models
        assert all(a == "2" for st, _, a in readyz + models if st == 503), "a 503 says when to come back"
        assert slowest < 10, slowest
        assert chat_answer[0] == 200, chat_answer
        # the controller answers again: so does /readyz (within its one-second cache)
        deadline = time.monotonic() + 15
        while get("/readyz")[0] != 200:
            assert time.monotonic() < deadline, "not ready again after the controller was resumed"
            time.sleep(0.3)
    finally:
        os.kill(pid, signal.SIGCONT)
        runner.close()
        client.post("/openai/undeploy", json={"chat_name": chat_name, "force": True})


# -- the registry stops answering after a success ---------------------------------------------------------
def test_a_success_the_registry_cannot_record_in_time_still_reaches_the_caller(ray_head, ep, fake_openai, monkeypatch):
    """The endpoint has one failure on record, so a success must be recorded (``record_success``);
    the registry's process is stopped meanwhile: the caller gets the answer, and the registry
    records the success once it runs again."""
    import gateway.dispatch

    monkeypatch.setattr(gateway.dispatch, "_REGISTRY_WAIT_S", 2.0)  # (the registry's wait, short for the test)
    c = create_app(Settings.from_env(ray_address=ray_head.address, cooldown_s=30, endpoint_cache_s=60)).test_client()
    chat_name, k = ep(max_retries=0)
    fake_openai.script(k, openai_error(500, "boom", "server_error", None))
    r = c.post("/chat", json={"chat_name": chat_name, "content": "a"})
    assert r.status_code == 502, r.get_json()
    assert c.get(f"/deployments/{chat_name}").get_json()["health"]["consecutive_failures"] == 1
    registry = ray.get_actor("endpoint_registry", namespace="llm_gateway")
    pid = ray.get(registry.pid.remote(), timeout=30)
    os.kill(pid, signal.SIGSTOP)
    try:
        t = time.perf_counter()
        r = c.post("/chat", json={"chat_name": chat_name, "content": "billed"})
        took = time.perf_counter() - t
        time.sleep(2.5)  # (past the registry's wait: its timeout is logged, not answered)
    finally:
        os.kill(pid, signal.SIGCONT)
    print(f"registry stopped: the chat answered {r.status_code} in {took:.2f}s ({r.get_data(as_text=True)[:120]})")
    assert r.status_code == 200 and r.get_json()["output"] == "echo: billed", r.get_json()
    deadline = time.monotonic() + 10
    while c.get(f"/deployments/{chat_name}").get_json()["health"]["consecutive_failures"] != 0:
        assert time.monotonic() < deadline, "the success was never recorded"
        time.sleep(0.2)


# -- a large answer ----------------------------------------------------------------------------------------
def test_an_answer_of_5_mib_reaches_the_caller_over_grpc(client, app, ep, fake_openai):
    """Over gRPC (GATEWAY_SERVE_GRPC, the default) a message is 4 MiB at most unless raised on both ends."""
    assert app.extensions["gateway"].settings.serve_grpc
    chat_name, k = ep(max_retries=0)
    big = ("0123456789abcde\n" * (5 << 16))  # 5 MiB
    fake_openai.script(k, Reply(body=fake_openai.completion({"model": "m"}, big, 5, 1_310_720)))
    t = time.perf_counter()
    r = client.post("/chat", json={"chat_name": chat_name, "content": "a long one"})
    print(f"a 5 MiB answer: {r.status_code} in {time.perf_counter() - t:.2f}s, {len(r.get_data())} bytes")
    assert r.status_code == 200, r.get_data(as_text=True)[:300]
    assert r.get_json()["output"] == big


# -- a replica lost while the provider answers ---------------------------------------------------------------
def test_a_replica_killed_during_a_call_does_not_send_it_again(client, ep, fake_openai):
    """The provider has the call (and bills it) when the replica dies: the caller gets an error,
    not a second call to the provider."""
    chat_name, k = ep(max_retries=0, timeout=20)
    fake_openai.script(k, Reply(delay=3), Reply())
    box: list = []
    caller = threading.Thread(target=lambda: box.append(client.post("/chat", json={"chat_name": chat_name, "content": "x"})))
    caller.start()
    deadline = time.monotonic() + 10
    while not fake_openai.requests_for(k):
        assert time.monotonic() < deadline, "the call never reached the provider"
        time.sleep(0.05)
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
            and f"ServeReplica:{chat_name}:".encode() in _cmdline(p)]
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    caller.join(60)
    r = box[0]
    calls = len(fake_openai.requests_for(k))
    print(f"replica killed mid-call: {r.status_code} {r.get_json()['error']['type'] if r.status_code >= 400 else ''}; "
          f"the provider was called {calls} time(s)")
    assert calls == 1, "the call was sent to the provider again"
    assert r.status_code == 503 and r.get_json()["error"]["type"] == "endpoint_not_ready", r.get_json()
    assert "not sent again" in r.get_json()["error"]["message"]


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""
