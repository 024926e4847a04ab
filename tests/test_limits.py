"""Client-key limits hold for the whole cluster, per upstream call; scope holds on fallbacks; bad keys stop the start.

Each ``create_app`` is one gateway "process" (its own leases) sharing the session's Ray
cluster, as gunicorn workers and pods do. Every test uses its own key: buckets live in
the cluster for the whole session.
"""
from __future__ import annotations

import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from types import SimpleNamespace

import pytest
import ray
import yaml

from gateway import Settings, create_app
from gateway.auth import load_keys
from gateway.keeper import KEEPER_NAME
from tests.fakes.upstreams import openai_error

ADMIN = "admin-token-" + "l" * 24
KEYS = {  # key -> (name, limits)
    "lim-two-processes-0001": ("two-procs", {"rate_per_minute": 3}),
    "lim-restarted-0002": ("restarted", {"rate_per_minute": 2}),
    "lim-broadcast-0003": ("broadcaster", {"rate_per_minute": 3}),
    "lim-retried-0004": ("retried", {"rate_per_minute": 3}),
    "lim-fallback-0005": ("fallen-back", {"rate_per_minute": 4}),
    "lim-half-a-minute-0006": ("half", {"rate_per_minute": 0.5}),
    "lim-tokens-0007": ("tokens", {"tokens_per_minute": 30}),
    "lim-stream-tokens-0008": ("stream-tokens", {"tokens_per_minute": 10}),
    "lim-keeper-restart-0009": ("keeper-restart", {"rate_per_minute": 1}),
    "lim-stopped-keeper-0012": ("stopped-keeper", {"rate_per_minute": 600}),
}
BARE = "lim-no-limits-0010"


def key_by_name(name: str) -> str:
    return next(k for k, (n, _) in KEYS.items() if n == name)


@pytest.fixture(scope="module")
def limited(ray_head, tmp_path_factory, fake_openai):
    """(settings, client, primary, fallback, primary's fake key, fallback's fake key).

    ``primary`` (one replica retry) falls back to ``fallback`` (no retries); the key ``scoped``
    may use only ``primary``.
    """
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    entries = [{"key": k, "name": n, **limits} for k, (n, limits) in KEYS.items()]
    suffix = uuid.uuid4().hex[:6]
    primary, fallback = f"lim_a_{suffix}", f"lim_b_{suffix}"
    entries += [{"key": BARE, "name": "bare"}, {"key": "lim-scoped-0011", "name": "scoped", "chat_names": [primary]}]
    path.write_text(yaml.safe_dump(entries))
    settings = Settings.from_env(ray_address=ray_head.address, admin_token=ADMIN, api_keys_file=str(path), cooldown_s=0)
    client = create_app(settings).test_client()
    admin = {"Authorization": f"Bearer {ADMIN}"}
    key_a, key_b = f"sk-lim-a-{suffix}", f"sk-lim-b-{suffix}"
    for name, key, extra in ((fallback, key_b, {"max_retries": 0}), (primary, key_a, {"max_retries": 1, "fallbacks": [fallback]})):
        r = client.post("/openai/deploy", headers=admin, json={"api_key": key, "chat_name": name, "model_name": "m",
                                                              "base_url": fake_openai.base_url, **extra})
        assert r.status_code == 200, r.get_json()
    yield settings, client, primary, fallback, key_a, key_b
    for name in (primary, fallback):
        client.post("/openai/undeploy", headers=admin, json={"chat_name": name, "force": True})


def chat(client, key: str, chat_name: str, **extra):
    return client.post("/chat", headers={"Authorization": f"Bearer {key}"}, json={"chat_name": chat_name, "content": "hi", **extra})


def assert_limited(r, key_name: str, key: str) -> None:
    assert r.status_code == 429, r.get_json()
    err = r.get_json()["error"]
    assert err["type"] == "rate_limited" and key_name in err["message"] and key not in r.get_data(as_text=True)
    assert int(r.headers["Retry-After"]) >= 1


def test_two_processes_together_admit_the_rate_once(limited):
    settings, _, _, fallback, _, _ = limited
    key = key_by_name("two-procs")
    apps = [create_app(settings).test_client(), create_app(settings).test_client()]
    started = time.monotonic()
    codes = [chat(apps[i % 2], key, fallback).status_code for i in range(8)]
    refill = int((time.monotonic() - started) * 3 / 60)  # what 3 a minute gave back meanwhile (0 unless the run stalled)
    assert set(codes) <= {200, 429}, codes
    assert 3 <= codes.count(200) <= 3 + refill, codes
    assert codes[:3] == [200, 200, 200], codes  # both processes got some; neither had a bucket of its own
    assert_limited(chat(apps[1], key, fallback), "two-procs", key)


def test_a_restarted_process_does_not_start_full(limited):
    settings, client, _, fallback, _, _ = limited
    key = key_by_name("restarted")
    assert [chat(client, key, fallback).status_code for _ in range(2)] == [200, 200]
    fresh = create_app(settings).test_client()  # a new gunicorn worker: no local state at all
    assert_limited(chat(fresh, key, fallback), "restarted", key)


def test_a_broadcast_costs_one_call_per_endpoint(limited):
    _, client, primary, fallback, _, _ = limited
    key = key_by_name("broadcaster")  # 3 a minute
    r = client.post("/chat/broadcast", headers={"Authorization": f"Bearer {key}"},
                    json={"chat_names": [primary, fallback], "content": "hi"})
    assert r.status_code == 200 and all("output" in v for v in r.get_json()["results"].values()), r.get_json()
    assert chat(client, key, fallback).status_code == 200  # the third
    assert_limited(chat(client, key, fallback), "broadcaster", key)
    # A route that calls no endpoint costs nothing and is not refused.
    models = client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert models.status_code == 200 and primary in [m["id"] for m in models.get_json()["data"]]


def test_a_replica_retry_is_charged_after_the_fact(limited, fake_openai):
    _, client, primary, _, key_a, _ = limited
    key = key_by_name("retried")  # 3 a minute
    fake_openai.script(key_a, openai_error(500, "boom", "server_error", None))
    r = chat(client, key, primary)
    assert r.status_code == 200 and r.get_json()["attempts"] == 2 and r.get_json()["served_by"] == primary
    assert chat(client, key, primary).status_code == 200  # 2 + 1 = 3
    assert_limited(chat(client, key, primary), "retried", key)


def test_a_fallback_tried_costs_one_more(limited, fake_openai):
    _, client, primary, fallback, key_a, _ = limited
    key = key_by_name("fallen-back")  # 4 a minute
    fake_openai.script(key_a, *[openai_error(500, "boom", "server_error", None)] * 2)
    r = chat(client, key, primary)
    assert r.status_code == 200 and r.get_json()["served_by"] == fallback, r.get_json()
    assert [t["chat_name"] for t in r.get_json()["tried"]] == [primary]
    # the primary (1, and its replica's retry: 1) and the fallback (1): one call is left
    assert chat(client, key, fallback).status_code == 200
    assert_limited(chat(client, key, fallback), "fallen-back", key)


def test_a_rate_under_one_a_minute_admits_one_call_then_waits(limited):
    _, client, _, fallback, _, _ = limited
    key = key_by_name("half")
    assert chat(client, key, fallback).status_code == 200
    r = chat(client, key, fallback)
    assert_limited(r, "half", key)
    assert 100 <= int(r.headers["Retry-After"]) <= 120


def test_tokens_per_minute_refuses_once_the_usage_reaches_it(limited):
    _, client, _, fallback, _, _ = limited
    key = key_by_name("tokens")  # 30 tokens a minute
    used: list[int] = []
    for _ in range(20):
        r = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                        json={"model": fallback, "messages": [{"role": "user", "content": "hi"}]})
        if r.status_code != 200:
            break
        used.append(r.get_json()["usage"]["total_tokens"])
    assert r.status_code == 429 and r.get_json()["error"]["type"] == "rate_limit_error"
    assert "tokens" in r.get_json()["error"]["message"] and int(r.headers["Retry-After"]) >= 1
    assert sum(used) >= 30 > sum(used[:-1]), used  # admitted while some of the 30 was left, not after


def test_a_stream_is_charged_its_tokens_when_it_ends(limited):
    _, client, _, fallback, _, _ = limited
    key = key_by_name("stream-tokens")  # 10 tokens a minute; a "hi" stream uses 7
    for expected in (200, 200, 429):
        r = chat(client, key, fallback, stream=True)
        assert r.status_code == expected, r.get_data(as_text=True)
        if expected == 200:
            assert '"usage"' in r.get_data(as_text=True)


def test_a_fallback_outside_the_keys_chat_names_is_never_called(limited, fake_openai):
    _, client, primary, fallback, key_a, key_b = limited
    fake_openai.script(key_a, *[openai_error(500, "boom", "server_error", None)] * 2)
    before = len(fake_openai.requests_for(key_b))
    r = chat(client, "lim-scoped-0011", primary)
    err = r.get_json()["error"]
    assert r.status_code == 502 and err["type"] == "upstream_error", err  # the primary's failure, not a 403
    assert [(t["chat_name"], t["type"]) for t in err["tried"]] == [(primary, "upstream_error"), (fallback, "forbidden")]
    assert "scoped" in err["tried"][1]["message"]
    assert len(fake_openai.requests_for(key_b)) == before
    # A key without limits is not charged anything, and reaches the fallback as before.
    fake_openai.script(key_a, *[openai_error(500, "boom", "server_error", None)] * 2)
    assert chat(client, BARE, primary).get_json()["served_by"] == fallback


def test_a_stopped_keeper_answers_the_keys_callers_at_once_and_spares_the_endpoint(limited, fake_openai):
    """The keeper's process stopped (SIGSTOP): 30 concurrent calls of a limited key are answered 503
    cluster_unavailable at once (one lease request in flight, no upstream called), while calls without
    limits to the same endpoint are served; once it resumes, the key is served again."""
    settings, client, _, fallback, _, key_b = limited
    key = key_by_name("stopped-keeper")  # 600 a minute: a lease is 10 calls
    assert chat(client, key, fallback).status_code == 200  # (the keeper is up: made if this test runs alone)
    app = create_app(settings)  # a fresh process: no lease of the key, and default seats (24)
    fresh = app.test_client()
    assert chat(fresh, BARE, fallback).status_code == 200  # (the endpoint's handle is made before the clock runs)
    keeper = ray.get_actor(KEEPER_NAME, namespace=settings.ray_namespace)
    pid = ray.get(keeper.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    leases: list[float] = []  # each lease request this process sends to the keeper

    def lease_remote(*args, **kwargs):
        leases.append(time.monotonic())
        return keeper.lease.remote(*args, **kwargs)

    app.extensions["gateway"].limits._keeper = SimpleNamespace(lease=SimpleNamespace(remote=lease_remote), charge=keeper.charge)

    def timed(k: str):
        started = time.monotonic()
        r = chat(fresh, k, fallback)
        return r, time.monotonic() - started

    upstream_before = len(fake_openai.requests_for(key_b))
    pool = ThreadPoolExecutor(34)
    os.kill(pid, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        limited_calls = [pool.submit(timed, key) for _ in range(30)]
        bare_calls = [pool.submit(timed, BARE) for _ in range(4)]
        _, unanswered = wait(limited_calls + bare_calls, timeout=20)
        answered = [f.result() for f in limited_calls if f.done()]
        print(f"\nkeeper stopped: {len(answered)}/30 limited calls answered within 20 s; lease requests sent: {len(leases)}; "
              f"latencies (s): {sorted(round(t, 2) for _, t in answered)}; statuses: "
              f"{sorted({(r.status_code, r.get_json()['error']['type'] if r.status_code != 200 else 'ok') for r, _ in answered})}")
        bare = [f.result() for f in bare_calls if f.done()]
        print(f"calls without limits: {[(r.status_code, round(t, 2)) for r, t in bare]}")
        assert not unanswered, f"{len(unanswered)} calls still unanswered after 20 s"
        assert len(leases) <= 2, f"{len(leases)} lease requests to the stopped keeper (one in flight per key expected)"
        for r, took in answered:
            assert r.status_code == 503, r.get_json()
            err = r.get_json()["error"]
            assert err["type"] == "cluster_unavailable" and "limits keeper" in err["message"], err
            assert "stopped-keeper" in err["message"] and "no upstream was called" in err["message"], err
            assert key not in r.get_data(as_text=True) and int(r.headers["Retry-After"]) >= 1
            assert took < 6, f"a call of the key waited {took:.1f}s for the stopped keeper"
        assert [r.status_code for r, _ in bare] == [200] * 4, [r.get_json() for r, _ in bare]
        assert len(fake_openai.requests_for(key_b)) == upstream_before + 4  # the limited calls reached no upstream
        # After the burst, the key's calls are answered at once (the request in flight is overdue): no new request.
        r, took = timed(key)
        print(f"a call {time.monotonic() - stopped:.1f}s after the stop: {r.status_code} in {took:.2f}s")
        assert r.status_code == 503 and r.get_json()["error"]["type"] == "cluster_unavailable"
        assert len(leases) <= 2
    finally:
        os.kill(pid, signal.SIGCONT)  # (always: a stopped keeper would break every later test of the session)
        pool.shutdown(wait=True)
    # The keeper answers the request it had pending: the key is served again, without a new wait.
    codes = []
    for _ in range(40):
        codes.append(chat(fresh, key, fallback).status_code)
        if codes[-1] == 200:
            break
        time.sleep(0.25)
    print(f"after SIGCONT: {codes}; lease requests in all: {len(leases)}")
    assert codes[-1] == 200 and set(codes) <= {200, 503}, codes
    assert len(leases) <= 3


def test_a_restarted_keeper_keeps_the_buckets(limited):
    settings, client, _, fallback, _, _ = limited
    key = key_by_name("keeper-restart")  # 1 a minute
    assert chat(client, key, fallback).status_code == 200
    ray.kill(ray.get_actor(KEEPER_NAME, namespace=settings.ray_namespace), no_restart=False)
    fresh = create_app(settings).test_client()  # (so nothing local answers for the keeper)
    assert_limited(chat(fresh, key, fallback), "keeper-restart", key)


def test_a_bad_client_key_stops_the_start_naming_the_entry_not_the_key(tmp_path):
    with pytest.raises(SystemExit) as exc:
        load_keys("good-key-12345678,s3cr3t", None)
    assert "GATEWAY_API_KEYS entry #2" in str(exc.value) and "8 characters" in str(exc.value)
    assert "s3cr3t" not in str(exc.value)
    good = {"key": "good-key-12345678"}
    path = tmp_path / "keys.yaml"
    for entries, said in (
        ([good, {"key": "short-1", "name": "x"}], "entry #2 (name 'x'): key: "),
        ([good, good, {"key": "another-key-000001", "name": "y", "rate_per_minute": -1}], "entry #3 (name 'y'): rate_per_minute: "),
        ([good, {"key": "another-key-000003", "rate_per_minute": float("inf")}], "entry #2: rate_per_minute: "),
        ([{"key": "another-key-000002", "sk-pasted-here-0001": 1}], "entry #1: a field the entry should not have"),
    ):
        path.write_text(yaml.safe_dump(entries))
        with pytest.raises(SystemExit) as exc:
            load_keys(None, str(path))
        message = str(exc.value)
        assert message.startswith(f"GATEWAY_API_KEYS_FILE {path} {said}"), message
        assert not any(secret in message for secret in ("short-1", "another-key", "sk-pasted-here")), message
