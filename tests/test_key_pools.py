"""Key pools on real Ray: one endpoint with several keys on the fake OpenAI, through the official SDK.

One pool for the whole file (a deploy costs seconds). Its keys: ``a`` (revoked mid-run, then made valid
again), ``b`` (its balance spent mid-run), ``c`` (good). Keys are checked in every answer, log line,
metric and Ray dashboard view the file makes.
"""
from __future__ import annotations

import glob
import itertools
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray

from gateway import Settings, create_app
from gateway.key_pools import KEEPER_NAME
from providers.keys import key_fingerprint
from tests.test_secrets import dashboard_get

RUN = uuid.uuid4().hex
STARTED = time.time()
#: keys whose fingerprints differ (their last four characters)
KEYS = {name: f"sk-pool-{RUN}-{name}{i:03d}" for i, name in enumerate("abcdef")}
FP = {name: key_fingerprint(key) for name, key in KEYS.items()}
ADMIN = "admin-token-" + "p" * 24
CLIENT = "pool-client-key-" + "q" * 20


class _Kept(logging.Handler):
    """Every log record of the gateway's process while this file runs (searched for keys at its end)."""

    def __init__(self, texts: list) -> None:
        super().__init__(logging.DEBUG)
        self.texts = texts

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(record.getMessage())


@pytest.fixture(scope="module")
def pool(client, fake_openai, ray_head):
    """(chat_name, texts): the pool of a, b and c (2 workers), and every answer and log line the file got."""
    chat_name = f"pool_{os.getpid()}_{RUN[:8]}"
    texts: list[str] = []
    kept, root = _Kept(texts), logging.getLogger()
    root.addHandler(kept)
    level, root.level = root.level, logging.DEBUG
    r = client.post("/openai/deploy", json={"chat_name": chat_name, "model_name": "gpt-4o-mini", "workers": 2,
                                            "base_url": fake_openai.base_url, "max_retries": 0,
                                            "api_keys": [KEYS["a"], KEYS["b"], {"key": KEYS["c"], "weight": 2}]})
    texts.append(r.get_data(as_text=True))
    assert r.status_code == 200, r.get_json()
    yield chat_name, texts
    root.removeHandler(kept)
    root.setLevel(level)
    client.post("/openai/undeploy", json={"chat_name": chat_name, "force": True})


@pytest.fixture(scope="module")
def client(app):
    return app.test_client()


def keys_of(client, chat_name: str, texts: list) -> dict[str, dict]:
    r = client.get(f"/deployments/{chat_name}/keys")
    texts.append(r.get_data(as_text=True))
    assert r.status_code == 200, r.get_json()
    return {k["fingerprint"]: k for k in r.get_json()["keys"]}


def wait_for(what, limit: float, step: float = 0.2):
    deadline = time.monotonic() + limit
    while True:
        found = what()
        if found or time.monotonic() > deadline:
            return found
        time.sleep(step)


def test_a_pool_with_a_key_the_provider_refuses_is_not_deployed(client, fake_openai, name):
    fake_openai.reject(KEYS["f"])
    chat_name = name("badpool")
    r = client.post("/openai/deploy", json={"chat_name": chat_name, "model_name": "m", "base_url": fake_openai.base_url,
                                            "api_keys": [KEYS["e"], KEYS["f"]]})
    assert r.status_code == 400, r.get_json()
    err = r.get_json()["error"]
    assert err["type"] == "invalid_key" and err["fields"] == ["api_keys"]
    assert err["message"].startswith(f"api_keys entry 2 ({FP['f']}): the provider rejected this key")
    assert KEYS["f"] not in r.get_data(as_text=True)
    assert client.get(f"/deployments/{chat_name}").status_code == 404


def test_200_calls_with_a_key_revoked_and_one_spent_mid_run_all_succeed(client, pool, fake_openai):
    chat_name, texts = pool
    done, statuses = itertools.count(1), []

    def one(i: int) -> None:
        stream = i % 4 == 3  # (streams rotate before their first event, as whole answers do)
        r = client.post("/chat", json={"chat_name": chat_name, "content": f"call {i}", "stream": stream})
        text = r.get_data(as_text=True)
        ok = r.status_code == 200 and (not stream or ("[DONE]" in text and "event: error" not in text))
        statuses.append(r.status_code if ok else f"{r.status_code} {text[:300]}")
        count = next(done)
        if count == 40:
            fake_openai.reject(KEYS["a"])
        elif count == 100:
            fake_openai.exhaust(KEYS["b"])
        if i % 20 == 0:
            texts.append(text)

    with ThreadPoolExecutor(8) as workers:
        list(workers.map(one, range(200)))
    assert statuses.count(200) == 200, [s for s in statuses if s != 200][:5]
    assert fake_openai.requests_for(KEYS["a"]) and fake_openai.requests_for(KEYS["b"])  # (each was in use)

    def both_disabled():
        keys = keys_of(client, chat_name, texts)
        return keys if keys[FP["a"]]["state"] == keys[FP["b"]]["state"] == "disabled" else None

    keys = wait_for(both_disabled, 5)
    assert keys, keys_of(client, chat_name, texts)
    assert keys[FP["a"]]["reason"] == "upstream_auth (invalid_api_key)"
    assert keys[FP["b"]]["reason"] == "upstream_quota (insufficient_quota)"
    assert keys[FP["c"]]["state"] == "ok" and keys[FP["c"]]["weight"] == 2
    assert keys[FP["a"]]["outcomes"].get("upstream_auth", 0) >= 1 and keys[FP["c"]]["outcomes"]["ok"] > 0
    # (each replica sends its counts with its next sync, within about a second)
    assert wait_for(lambda: sum(k["calls"] for k in keys_of(client, chat_name, texts).values()) >= 200, 5)
    row = client.get(f"/deployments/{chat_name}").get_json()
    texts.append(str(row))
    assert {k["fingerprint"] for k in row["keys"]} == {FP["a"], FP["b"], FP["c"]} and row["key_fingerprint"] == FP["a"]
    metrics = client.get("/metrics").get_data(as_text=True)
    texts.append(metrics)
    assert f'gateway_upstream_key_calls_total{{chat_name="{chat_name}",key="{FP["a"]}",outcome="upstream_auth"}}' in metrics

    # The revoked key, made valid again at the provider, is back by itself within its backoff.
    fake_openai.accept(KEYS["a"])
    due = keys[FP["a"]]["next_check"]
    checks = len([q for q in fake_openai.model_requests if q["headers"].get("Authorization") == f"Bearer {KEYS['a']}"])
    back = wait_for(lambda: keys_of(client, chat_name, texts)[FP["a"]]["state"] == "ok", max(0.0, due - time.time()) + 5)
    assert back, keys_of(client, chat_name, texts)[FP["a"]]
    assert len([q for q in fake_openai.model_requests
                if q["headers"].get("Authorization") == f"Bearer {KEYS['a']}"]) > checks  # (the free key check did it)


def test_keys_are_added_drained_re_enabled_and_removed_without_a_redeploy(client, pool, fake_openai):
    chat_name, texts = pool

    def call(path, method="post", **body):
        r = getattr(client, method)(path, **({} if method in ("get", "delete") else {"json": body}))
        texts.append(r.get_data(as_text=True))
        return r

    base = f"/deployments/{chat_name}/keys"
    # Added: checked with the provider first; a key it refuses, and one already there, are not.
    fake_openai.reject(KEYS["e"])
    r = call(base, key=KEYS["e"])
    assert r.status_code == 400 and r.get_json()["error"]["type"] == "invalid_key"
    assert r.get_json()["error"]["fields"] == ["key"]
    r = call(base, key=KEYS["c"])
    assert r.status_code == 409 and r.get_json()["error"]["type"] == "conflict"
    r = call(base, key=KEYS["d"], weight=3)
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["key"] == {**r.get_json()["key"], "fingerprint": FP["d"], "weight": 3, "state": "ok"}
    assert any(q["headers"].get("Authorization") == f"Bearer {KEYS['d']}" for q in fake_openai.model_requests)
    # Drained (weight 0): once the replicas have synced, its calls go to the others.
    r = call(f"{base}/{FP['c']}", method="patch", weight=0)
    assert r.status_code == 200 and r.get_json()["key"]["weight"] == 0

    def d_serves_and_c_rests():
        before_c, before_d = len(fake_openai.requests_for(KEYS["c"])), len(fake_openai.requests_for(KEYS["d"]))
        for _ in range(6):
            assert call("/chat", chat_name=chat_name, content="hi").status_code == 200
        return len(fake_openai.requests_for(KEYS["c"])) == before_c and len(fake_openai.requests_for(KEYS["d"])) > before_d

    assert wait_for(d_serves_and_c_rests, 5, step=0.5)
    # Re-enabled by hand; removed; the answers name keys by fingerprint only.
    r = call(f"{base}/{FP['b']}", method="patch", state="ok")
    assert r.status_code == 200 and r.get_json()["key"]["state"] == "ok" and r.get_json()["key"]["reason"] is None
    r = call(f"{base}/{FP['a']}", method="delete")
    assert r.status_code == 200 and FP["a"] not in {k["fingerprint"] for k in r.get_json()["keys"]}
    assert call(f"{base}/{FP['a']}", method="delete").status_code == 404
    assert call(f"{base}/{FP['d']}", method="patch").status_code == 400  # (nothing to change)
    assert call("/deployments/no_such_endpoint/keys", method="get").status_code == 404


def test_a_restarted_keeper_is_seeded_again_by_the_replicas(client, pool, app):
    chat_name, texts = pool
    time.sleep(2.5)  # (the last edits reached every replica: they seed what they hold)
    before = keys_of(client, chat_name, texts)
    keeper = ray.get_actor(KEEPER_NAME, namespace=app.extensions["gateway"].settings.ray_namespace)
    ray.kill(keeper, no_restart=False)  # (Ray restarts it, with nothing in memory)

    def seeded():
        r = client.get(f"/deployments/{chat_name}/keys")
        texts.append(r.get_data(as_text=True))
        return r.status_code == 200 and {k["fingerprint"]: (k["state"], k["weight"]) for k in r.get_json()["keys"]}

    after = wait_for(seeded, 15, step=0.5)
    assert after == {fp: (k["state"], k["weight"]) for fp, k in before.items()}


def test_the_pool_routes_are_the_admins(ray_head, pool, tmp_path):
    chat_name, texts = pool
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(f"- key: {CLIENT}\n  name: pool-client\n")
    guarded = create_app(Settings.from_env(ray_address=ray_head.address, admin_token=ADMIN,
                                           api_keys_file=str(keys_file))).test_client()
    path = f"/deployments/{chat_name}/keys"
    assert guarded.get(path, headers={"Authorization": f"Bearer {CLIENT}"}).status_code == 401
    assert guarded.get(path, headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
    r = guarded.post(path, data=f'{{"key": "{KEYS["e"]}"}}', headers={"Authorization": f"Bearer {ADMIN}",
                                                                      "Content-Type": "text/plain"})
    assert r.status_code == 415 and KEYS["e"] not in r.get_data(as_text=True)


def test_no_key_is_in_any_answer_log_or_dashboard_view(pool, ray_head, capfd):
    """Last in the file: every answer and log line the file got, the Ray dashboard's views, and everything Ray wrote."""
    chat_name, texts = pool
    views = [dashboard_get(ray_head, "/api/serve/applications/"),
             dashboard_get(ray_head, "/api/v0/actors?detail=1&limit=10000"),
             dashboard_get(ray_head, "/api/v0/tasks?detail=1&limit=10000")]
    assert chat_name in views[0]  # (the right cluster)
    logged = list(capfd.readouterr())
    for key in KEYS.values():
        for text in texts + views + logged:
            assert key not in text
    # Everything Ray wrote while this file ran: controller, replicas, the keeper, raylet, dashboard, workers'
    # stdout and stderr (files of other clusters on this machine may come and go meanwhile)
    read = 0
    for path in glob.glob("/tmp/ray/session_*/logs/**/*", recursive=True):
        try:
            if not os.path.isfile(path) or os.path.getmtime(path) < STARTED:
                continue
            with open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            continue
        read += 1
        for key in KEYS.values():
            assert key.encode() not in data, path
    assert read
