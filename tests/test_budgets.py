"""Budgets per client key: reserved before each call, settled after, held for the whole cluster, kept on the head's disk.

One gateway for the module (``create_app`` served over HTTP by uvicorn, as a worker serves it) on the
session's Ray cluster, one endpoint on the fake OpenAI upstream (the replica talks to it with the
``openai`` SDK over a real socket). Every key is new per run (a budget is kept in the cluster's ledger
for its whole UTC day or month). Faults are real: ``kill -9`` of the limits keeper's process, and a
restart of a Ray head (its own head and gunicorn, with tests/test_restarts.py's machinery).
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from types import SimpleNamespace

import httpx
import openai
import pytest
import ray
import yaml

from gateway import Settings, create_app
from gateway.budgets import iso, resets_at
from gateway.head import EmbeddedHead
from gateway.keeper import KEEPER_NAME
from tests.fakes.upstreams import Reply
from tests.procs import ROOT, serve_front
from tests.test_restarts import head_settings

SFX = uuid.uuid4().hex[:6]
ADMIN = "budget-admin-" + uuid.uuid4().hex
ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}
KEYS = {  # role -> (key, limits); each key is named f"{role}-{SFX}"
    "day": (f"bud-day-{uuid.uuid4().hex}", {"tokens_per_day": 140}),
    "stream": (f"bud-stream-{uuid.uuid4().hex}", {"tokens_per_day": 100_000}),
    "tpm": (f"bud-tpm-{uuid.uuid4().hex}", {"tokens_per_minute": 100}),
    "spend": (f"bud-spend-{uuid.uuid4().hex}", {"spend_per_month": 20}),
    "restart": (f"bud-restart-{uuid.uuid4().hex}", {"tokens_per_day": 20}),
    "stopped": (f"bud-stopped-{uuid.uuid4().hex}", {"tokens_per_day": 100_000}),
}
#: the module's endpoint costs 1 a token in, 0.5 out (per million tokens: 1e6, 5e5)
PRICE = {"input_per_mtok": 1_000_000, "output_per_mtok": 500_000}
#: a "hi" call: it reserves 5 (the input estimate: 2 bytes / 2 + 4) + max_tokens; the fake answers "echo: hi",
#: 5 prompt tokens + 2 completion tokens
HI = {"content": "hi", "max_tokens": 8}


def name_of(role: str) -> str:
    return f"{role}-{SFX}"


def bearer(role: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[role][0]}"}


@pytest.fixture(scope="module")
def budgeted(ray_head, fake_openai, tmp_path_factory):
    path = tmp_path_factory.mktemp("budget_keys") / "keys.yaml"
    path.write_text(yaml.safe_dump([{"key": key, "name": name_of(role), **limits} for role, (key, limits) in KEYS.items()]))
    settings = Settings.from_env(ray_address=ray_head.address, admin_token=ADMIN, api_keys_file=str(path), cooldown_s=0,
                                 state_dir=str(tmp_path_factory.mktemp("budget_state")))
    app = create_app(settings)
    chat_name, provider_key = f"bud_{SFX}", f"sk-bud-{uuid.uuid4().hex}"
    spec = {"api_key": provider_key, "chat_name": chat_name, "model_name": "m", "base_url": fake_openai.base_url,
            "max_retries": 0}
    for base in serve_front(app):
        with httpx.Client(base_url=base, timeout=60) as http:
            r = http.post("/openai/deploy", headers=ADMIN_H, json={**spec, "price": PRICE})
            priced = r.status_code == 200
            if r.status_code == 400 and "price" in r.text:  # (a deploy spec without prices: the spend test says so)
                r = http.post("/openai/deploy", headers=ADMIN_H, json=spec)
            assert r.status_code == 200, r.text
            try:
                yield SimpleNamespace(settings=settings, app=app, base=base, http=http, chat_name=chat_name,
                                      provider_key=provider_key, priced=priced)
            finally:
                http.post("/openai/undeploy", headers=ADMIN_H, json={"chat_name": chat_name, "force": True})


async def _burst(base: str, role: str, n: int, body: dict) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as http:
        return await asyncio.gather(*(http.post("/chat", headers=bearer(role), json=body) for _ in range(n)))


def burst(g, role: str, n: int, **extra) -> list[httpx.Response]:
    """``n`` calls of ``role``'s key at once, each on its own connection."""
    return asyncio.run(_burst(g.base, role, n, {"chat_name": g.chat_name, **HI, **extra}))


def usage(http, role: str, base_headers=ADMIN_H) -> tuple[dict, dict]:
    """(today's row of ``role``'s key, its budgets) as ``GET /usage`` answers them."""
    r = http.get("/usage", headers=base_headers, params={"client_key": name_of(role)})
    assert r.status_code == 200, r.text
    body = r.json()
    rows = [row for row in body["usage"] if row["client_key"] == name_of(role)]
    assert len(rows) <= 1, rows
    budgets = [b for b in body["budgets"] if b["client_key"] == name_of(role)]
    return (rows[0] if rows else {}), (budgets[0] if budgets else {})


def sample(metrics: str, name: str, **labels: str) -> float | None:
    """The value of ``name``'s sample with exactly ``labels`` in the ``/metrics`` text (None: no such sample)."""
    for line in metrics.splitlines():
        head, _, value = line.rpartition(" ")
        if head.startswith(name + "{") and dict(re.findall(r'(\w+)="([^"]*)"', head[len(name):])) == labels:
            return float(value)
    return None


def assert_spent(r, role: str, budget: str) -> None:
    """429 ``budget_exceeded`` until ``budget``'s reset, which the message names (ISO 8601 UTC) and Retry-After counts to."""
    assert r.status_code == 429, r.text
    err = (r.json() if callable(r.json) else r.json)["error"]  # (httpx's, or the Flask test client's)
    assert err["type"] == "budget_exceeded" and name_of(role) in err["message"] and budget in err["message"], err
    reset = resets_at(budget, time.time())
    assert iso(reset) in err["message"] and abs(int(r.headers["Retry-After"]) - (reset - time.time())) <= 5, (err, r.headers)
    assert KEYS[role][0] not in r.text


def test_200_concurrent_calls_stay_within_the_day_budget_and_the_spend_survives_kill_9_of_the_keeper(budgeted, fake_openai):
    """tokens_per_day 140 (about 20 calls of 7 tokens, each reserving 13): 200 calls at once, then one at a
    time until the key is spent. Charged: at least the budget, at most the budget + one call's usage; every
    refusal is 429 budget_exceeded with Retry-After, and reached no upstream. Then the keeper's process is
    killed (SIGKILL): what ``GET /usage`` reads back is the same, and the key stays refused."""
    g = budgeted
    upstream_before = len(fake_openai.requests_for(g.provider_key))
    started = time.monotonic()
    answers = burst(g, "day", 200)
    took = time.monotonic() - started
    ok = [r for r in answers if r.status_code == 200]
    held = 0
    for r in answers:
        if r.status_code == 200:
            continue
        assert r.status_code == 429, r.text
        err = r.json()["error"]
        assert err["type"] == "budget_exceeded" and name_of("day") in err["message"], err
        assert int(r.headers["Retry-After"]) >= 1 and KEYS["day"][0] not in r.text
        held += "in flight" in err["message"]
    burst_tokens = sum(r.json()["usage"]["total_tokens"] for r in ok)
    assert ok and len(fake_openai.requests_for(g.provider_key)) - upstream_before == len(ok)  # no refusal went upstream
    more = []
    for _ in range(40):  # one at a time, until the key is spent
        r = g.http.post("/chat", headers=bearer("day"), json={"chat_name": g.chat_name, **HI})
        if r.status_code != 200:
            break
        more.append(r.json()["usage"]["total_tokens"])
    assert_spent(r, "day", "tokens_per_day")
    assert r.headers["x-should-retry"] == "false"  # (OpenAI's SDKs would retry it)
    charged = burst_tokens + sum(more)
    row, budgets = usage(g.http, "day")
    print(f"\n200 concurrent calls in {took:.1f}s: {len(ok)} served ({burst_tokens} tokens), {200 - len(ok)} refused "
          f"budget_exceeded ({held} while calls in flight held the rest); then {len(more)} more one at a time; "
          f"charged {charged} tokens against tokens_per_day 140 (one call uses 7): {charged - 140} over")
    assert 140 <= charged <= 140 + 7, (charged, burst_tokens, more)
    assert row["requests"] == len(ok) + len(more) and row["tokens_in"] + row["tokens_out"] == charged, row
    assert budgets["tokens_per_day"] == {"limit": 140, "used": charged, "reserved": 0,
                                         "resets_at": iso(resets_at("tokens_per_day", time.time()))}, budgets
    metrics = g.http.get("/metrics", headers=ADMIN_H).text
    refusals = sample(metrics, "gateway_budget_refusals_total", client_key=name_of("day"), budget="tokens_per_day")
    assert refusals == 200 - len(ok) + 1, metrics[-2000:]  # (this process's counters: the gateway of this module)
    assert sample(metrics, "gateway_client_tokens_total", client_key=name_of("day"), direction="in") == row["tokens_in"]
    assert sample(metrics, "gateway_client_tokens_total", client_key=name_of("day"), direction="out") == row["tokens_out"]
    assert not any(key in metrics for key, _ in KEYS.values())
    # an OpenAI client is told insufficient_quota, and does not retry (its SDK would, twice, by default)
    before = sample(metrics, "gateway_requests_total", route="/v1/chat/completions", chat_name=g.chat_name,
                    provider="openai", outcome="budget_exceeded", fault="caller") or 0
    client = openai.OpenAI(base_url=g.base + "/v1", api_key=KEYS["day"][0], max_retries=2)
    with pytest.raises(openai.RateLimitError) as exc:
        client.chat.completions.create(model=g.chat_name, messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    assert exc.value.code == "insufficient_quota" and KEYS["day"][0] not in str(exc.value)
    after = sample(g.http.get("/metrics", headers=ADMIN_H).text, "gateway_requests_total", route="/v1/chat/completions",
                   chat_name=g.chat_name, provider="openai", outcome="budget_exceeded", fault="caller")
    assert after == before + 1

    # kill -9 of the keeper: Ray restarts it, and it reads its books back from the ledger
    keeper = ray.get_actor(KEEPER_NAME, namespace=g.settings.ray_namespace)
    pid = ray.get(keeper.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    assert usage(g.http, "day") == (row, budgets)
    new_pid = ray.get(keeper.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    print(f"keeper {pid} killed with SIGKILL; its successor {new_pid} read back the same usage "
          f"({time.monotonic() - killed:.1f}s)")
    assert new_pid != pid
    fresh = create_app(g.settings).test_client()  # (a new process: nothing remembered locally)
    assert_spent(fresh.post("/chat", headers=bearer("day"), json={"chat_name": g.chat_name, **HI}), "day", "tokens_per_day")


def test_a_stream_is_settled_at_its_end_and_one_abandoned_after_its_first_token_is_charged(budgeted, fake_openai):
    g = budgeted
    body = {"chat_name": g.chat_name, "content": "hi", "stream": True}
    with g.http.stream("POST", "/chat", headers=bearer("stream"), json=body) as r:
        text = r.read().decode()
    assert r.status_code == 200 and '"usage"' in text and "[DONE]" in text, text
    row, _ = usage(g.http, "stream")
    assert (row["requests"], row["tokens_in"], row["tokens_out"]) == (1, 5, 2), row  # settled with the stream's usage

    fake_openai.script(g.provider_key, Reply(pieces=["one ", "two ", "three ", "four ", "five"], piece_delay=0.5))
    with g.http.stream("POST", "/chat", headers=bearer("stream"), json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:") and '"delta"' in line:
                break  # the first token: the caller leaves
    sent = fake_openai.abandoned_after(g.provider_key)
    assert sent is not None and sent < 5, sent  # the upstream stream was cut short
    deadline = time.monotonic() + 10
    while (row := usage(g.http, "stream")[0])["requests"] < 2:
        assert time.monotonic() < deadline, row
        time.sleep(0.1)
    print(f"\nabandoned after its first token ({sent} of 5 pieces sent upstream): charged {row['tokens_in'] - 5} in, "
          f"{row['tokens_out'] - 2} out")
    assert row["tokens_in"] == 5 + 5  # its input estimate ("hi")
    assert 1 <= row["tokens_out"] - 2 <= sent + 1  # what was streamed: counted


def test_tokens_per_minute_bounds_the_calls_in_flight(budgeted, fake_openai):
    """tokens_per_minute 100, calls reserving 5 + 40: of 10 calls at once (the upstream takes 1.5 s), 3 are in
    flight and reach the upstream; the other 7 are refused at once (rate_limited, try again in 1 s)."""
    g = budgeted
    fake_openai.script(g.provider_key, *[Reply(delay=1.5)] * 3)
    before = len(fake_openai.requests_for(g.provider_key))
    answers = burst(g, "tpm", 10, max_tokens=40)
    assert sorted(r.status_code for r in answers) == [200] * 3 + [429] * 7, [r.text for r in answers]
    for r in answers:
        if r.status_code == 429:
            err = r.json()["error"]
            assert err["type"] == "rate_limited" and "in flight" in err["message"] and "tokens a minute" in err["message"]
            assert r.headers["Retry-After"] == "1"
    assert len(fake_openai.requests_for(g.provider_key)) - before == 3
    r = g.http.post("/chat", headers=bearer("tpm"), json={"chat_name": g.chat_name, "content": "hi", "max_tokens": 40})
    assert r.status_code == 200, r.text  # 21 used, nothing in flight: the next is admitted
    _, budgets = usage(g.http, "tpm")
    assert budgets["tokens_per_minute"]["reserved"] == 0 and budgets["tokens_per_minute"]["used"] >= 21 - 1, budgets


def test_spend_is_counted_at_the_endpoints_price_and_spend_per_month_holds(budgeted):
    """At ``PRICE`` a "hi" call costs 5 + 2 x 0.5 = 6 and reserves 5 + 8 x 0.5 = 9; spend_per_month 20 admits 4
    calls (0, 6, 12, 18 spent before each): 24 charged, the last call's 6 past the budget at most."""
    g = budgeted
    if not g.priced:
        pytest.skip("this tree's deploy spec takes no price yet (it comes with the key pools' spec changes)")
    spent = []
    for _ in range(10):
        r = g.http.post("/chat", headers=bearer("spend"), json={"chat_name": g.chat_name, **HI})
        if r.status_code != 200:
            break
        u = r.json()["usage"]
        spent.append(u["prompt_tokens"] * 1 + u["completion_tokens"] * 0.5)
    assert_spent(r, "spend", "spend_per_month")
    assert spent == [6, 6, 6, 6], spent
    row, budgets = usage(g.http, "spend")
    assert row["spend"] == 24 and row["chat_name"] == g.chat_name, row
    assert budgets["spend_per_month"]["used"] == 24 and budgets["spend_per_month"]["limit"] == 20, budgets
    metrics = g.http.get("/metrics", headers=ADMIN_H).text
    assert sample(metrics, "gateway_client_spend_total", client_key=name_of("spend")) == 24


def test_a_stopped_keeper_is_503_within_its_wait_and_the_calls_that_gave_up_hold_nothing(budgeted, fake_openai):
    """The keeper's process stopped (SIGSTOP): 5 calls at once of a budgeted key are answered 503
    cluster_unavailable within the keeper's wait (3 s), and none reaches the upstream; once it resumes,
    the key is served again and the reservations of the calls that gave up were given back."""
    g = budgeted
    call = {"chat_name": g.chat_name, **HI}
    assert g.http.post("/chat", headers=bearer("stopped"), json=call).status_code == 200
    keeper = ray.get_actor(KEEPER_NAME, namespace=g.settings.ray_namespace)
    pid = ray.get(keeper.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    upstream = len(fake_openai.requests_for(g.provider_key))
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        answers = burst(g, "stopped", 5)
        took = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)  # (always: a stopped keeper would break every later test of the session)
    for r in answers:
        err = r.json()["error"]
        assert r.status_code == 503 and err["type"] == "cluster_unavailable" and "limits keeper" in err["message"], err
        assert "no upstream was called" in err["message"] and int(r.headers["Retry-After"]) >= 1
    assert took < 6 and len(fake_openai.requests_for(g.provider_key)) == upstream, took
    deadline = time.monotonic() + 15
    while (r := g.http.post("/chat", headers=bearer("stopped"), json=call)).status_code != 200:
        assert r.status_code == 503 and time.monotonic() < deadline, r.text
        time.sleep(0.25)
    while (budget := usage(g.http, "stopped")[1]["tokens_per_day"])["reserved"]:
        assert time.monotonic() < deadline, budget
        time.sleep(0.1)
    print(f"\nkeeper stopped: 5 calls answered 503 in {took:.1f}s; resumed: served again, {budget}")
    assert budget["used"] == 14  # the two calls served, nothing of the five that gave up


def test_usage_is_for_the_admin_and_checks_its_days(budgeted):
    g = budgeted
    assert g.http.get("/usage").status_code == 401
    r = g.http.get("/usage", headers=bearer("day"))  # a client key is no admin
    assert r.status_code == 401 and KEYS["day"][0] not in r.text
    r = g.http.get("/usage", headers=ADMIN_H, params={"since": "yesterday"})
    assert r.status_code == 400 and r.json()["error"]["fields"] == ["since"] and "YYYY-MM-DD" in r.text
    r = g.http.get("/usage", headers=ADMIN_H, params={"since": "2026-12-02", "until": "2026-12-01"})
    assert r.status_code == 400
    r = g.http.get("/usage", headers=ADMIN_H, params={"chat_name": "no_such_endpoint"})
    assert r.status_code == 200 and r.json()["usage"] == []


#: a driver joined to a (new) head that makes the limits keeper as a gateway process does (``Limits.keeper``:
#: ``keeper_actor(namespace, GATEWAY_STATE_DIR)``) and prints what ``GET /usage`` reads of it (``report``)
_READ_BACK = """
import json, sys
import ray
from gateway.ray_switches import ray_on_loopback
from gateway.keeper import keeper_actor
ray_on_loopback()
ray.init(address=sys.argv[1], namespace="llm_gateway", log_to_driver=False, logging_level="ERROR")
keeper = keeper_actor("llm_gateway", sys.argv[2])
day, name, budgeted = sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
print(json.dumps(ray.get(keeper.report.remote(day, day, name, None, budgeted), timeout=120)))
"""


def test_the_spend_survives_a_head_restart(budgeted, tmp_path):
    """A head restart leaves nothing of the cluster (its GCS, its actors) but the head's disk. The key's calls are
    made through the module's gateway (its keeper writes the ledger); then a new Ray head is started on this
    machine, and a driver joined to it makes the keeper as a gateway process does, with the same
    ``GATEWAY_STATE_DIR``: the new keeper, on the new head, reads back the same usage and budget. (A head
    stopped and started at the same address, its gunicorn reconnecting and applying its endpoints file,
    passed the same check in a minute and a half: the ledger is all that matters here, so this is cheaper.)"""
    g = budgeted
    for _ in range(2):  # 7 + 7 of tokens_per_day 20
        r = g.http.post("/chat", headers=bearer("restart"), json={"chat_name": g.chat_name, **HI})
        assert r.status_code == 200, r.text
    row, budgets = usage(g.http, "restart")
    keeper = ray.get_actor(KEEPER_NAME, namespace=g.settings.ray_namespace)
    ledger = ray.get(keeper.__ray_call__.remote(lambda self: self._books.path), timeout=30)
    key = next(k for k in g.app.extensions["gateway"].auth.keys if k.name == name_of("restart"))
    budgeted_keys = json.dumps([{"id": key.id, "name": key.name, "limits": key.limits()}])
    head = EmbeddedHead(head_settings())
    began = time.monotonic()
    head.start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_") and k != "RAY_ADDRESS"}
        out = subprocess.run([sys.executable, "-c", _READ_BACK, head.address, os.path.dirname(ledger), row["day"],
                              key.name, budgeted_keys], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr[-3000:]
        report = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"\na new head's keeper read the ledger back in {time.monotonic() - began:.1f}s: {report}")
        assert report["usage"] == [row] and report["budgets"] == [budgets], (row, budgets, report)
        assert budgets["tokens_per_day"]["used"] == 14
        assert not any(k in out.stdout + out.stderr for k, _ in KEYS.values())
    finally:
        head.stop()
