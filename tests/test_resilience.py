"""Fault injection over real sockets: retries, fallbacks, cooldowns, streams, replica loss, fan-out."""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray

from gateway import Settings, create_app
from tests.conftest import key
from tests.fakes.upstreams import Reply, openai_error



def sse_events(text: str) -> list[tuple[str, object]]:
    """Parse an SSE body into (event, data) pairs."""
    out = []
    for block in text.strip().split("\n\n"):
        event, data = "message", None
        for line in block.splitlines():
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: "):
                raw = line[len("data: "):]
                data = raw if raw == "[DONE]" else json.loads(raw)
        out.append((event, data))
    return out




# -- retries inside the replica --------------------------------------------------------
def test_429_with_retry_after_then_success(client, ep, fake_openai):
    chat_name, k = ep()
    fake_openai.script(k, openai_error(429, "Rate limit reached", "requests", "rate_limit_exceeded", {"retry-after": "1"}))
    started = time.monotonic()
    r = client.post("/chat", json={"chat_name": chat_name, "content": "hi"})
    assert r.status_code == 200 and r.get_json()["attempts"] == 2
    hits = fake_openai.requests_for(k)
    assert len(hits) == 2 and hits[1]["at"] - hits[0]["at"] >= 1.0  # Retry-After was honoured
    assert time.monotonic() - started >= 1.0


def test_500_503_then_success(client, ep, fake_openai):
    chat_name, k = ep()
    fake_openai.script(k, openai_error(500, "The server had an error", "server_error", None),
                       openai_error(503, "The engine is currently overloaded", "server_error", None))
    r = client.post("/chat", json={"chat_name": chat_name, "content": "hi"})
    assert r.status_code == 200 and r.get_json()["attempts"] == 3 and r.get_json()["output"] == "echo: hi"


def test_reset_and_malformed_answers_are_retried(client, ep, fake_openai):
    chat_name, k = ep()
    fake_openai.script(k, Reply(reset=True), Reply(200, "{not json"))
    r = client.post("/chat", json={"chat_name": chat_name, "content": "hi"})
    assert r.status_code == 200 and r.get_json()["attempts"] == 3


def test_retries_stop_at_max_retries_and_say_how_many(client, ep, fake_openai):
    chat_name, k = ep(max_retries=1)
    fake_openai.script(k, *[openai_error(500, "boom", "server_error", None)] * 3)
    r = client.post("/chat", json={"chat_name": chat_name, "content": "hi"})
    assert r.status_code == 502 and r.get_json()["error"]["attempts"] == 2
    assert len(fake_openai.requests_for(k)) == 2


def test_auth_quota_and_bad_requests_are_never_retried(client, ep, fake_openai):
    chat_name, k = ep()
    for reply in (openai_error(401, "bad key", "invalid_request_error", "invalid_api_key"),
                  openai_error(429, "quota", "insufficient_quota", "insufficient_quota"),
                  openai_error(400, "bad", "invalid_request_error", "invalid_value")):
        before = len(fake_openai.requests_for(k))
        fake_openai.script(k, reply)
        r = client.post("/chat", json={"chat_name": chat_name, "content": "hi"})
        assert r.get_json()["error"]["attempts"] == 1
        assert len(fake_openai.requests_for(k)) == before + 1


def test_retry_after_beyond_the_cap_is_answered_as_429(client, ep, fake_openai):
    chat_name, k = ep()
    fake_openai.script(k, openai_error(429, "slow down", "requests", "rate_limit_exceeded", {"retry-after": "120"}))
    r = client.post("/chat", json={"chat_name": chat_name, "content": "hi"})
    assert r.status_code == 429 and r.headers["Retry-After"] == "120"
    assert r.get_json()["error"]["attempts"] == 1


def test_a_hang_ends_at_the_deadline(client, ep, fake_openai):
    chat_name, k = ep(timeout=1.5)
    fake_openai.script(k, Reply(delay=20), Reply(delay=20), Reply(delay=20))
    started = time.monotonic()
    r = client.post("/chat", json={"chat_name": chat_name, "content": "hi"})
    assert r.status_code == 504 and r.get_json()["error"]["type"] == "upstream_timeout"
    assert time.monotonic() - started < 15  # the deadline, not the 20 s hang (wide margin for a busy box)


# -- fallbacks --------------------------------------------------------------------------
def test_auth_and_quota_failures_fall_back_to_another_provider(client, ep, fake_openai, fake_zhipu):
    backup, backup_key = ep("zhipu", base_url=fake_zhipu.base_url)
    primary, k = ep(fallbacks=[backup])
    fake_openai.script(k, openai_error(401, "Incorrect API key provided", "invalid_request_error", "invalid_api_key"),
                       openai_error(429, "You exceeded your current quota", "insufficient_quota", "insufficient_quota"))
    for expected in ("upstream_auth", "upstream_quota"):
        r = client.post("/chat", json={"chat_name": primary, "content": "hi"})
        body = r.get_json()
        assert r.status_code == 200, body
        assert body["served_by"] == backup and body["provider"] == "zhipu" and body["output"] == "echo: hi"
        assert [t["chat_name"] for t in body["tried"]] == [primary] and body["tried"][0]["type"] == expected
    # The legacy route falls back too: old applications keep getting answers.
    fake_openai.script(k, openai_error(401, "Incorrect API key provided", "invalid_request_error", "invalid_api_key"))
    assert client.post("/openai/chat", json={"chat_name": primary, "content": "yo"}).get_json() == "echo: yo"


def test_request_fallbacks_override_and_caller_errors_never_fall_back(client, ep, fake_openai, fake_zhipu):
    backup, _ = ep("zhipu", base_url=fake_zhipu.base_url)
    primary, k = ep(max_retries=0)
    fake_openai.script(k, openai_error(500, "down", "server_error", None))
    r = client.post("/chat", json={"chat_name": primary, "content": "hi", "fallbacks": [backup]})
    assert r.status_code == 200 and r.get_json()["served_by"] == backup
    fake_openai.script(k, openai_error(400, "unsafe", "invalid_request_error", "content_policy_violation"))
    r = client.post("/chat", json={"chat_name": primary, "content": "hi", "fallbacks": [backup]})
    assert r.status_code == 400 and r.get_json()["error"]["type"] == "content_filter"


def test_when_every_fallback_fails_the_answer_lists_them(client, ep, fake_openai):
    backup, bk = ep(max_retries=0)
    primary, k = ep(max_retries=0, fallbacks=[backup])
    fake_openai.script(k, openai_error(500, "down", "server_error", None))
    fake_openai.script(bk, openai_error(429, "quota", "insufficient_quota", "insufficient_quota"))
    r = client.post("/chat", json={"chat_name": primary, "content": "hi"})
    err = r.get_json()["error"]
    assert r.status_code == 502 and err["type"] == "upstream_quota"
    assert [(t["chat_name"], t["type"]) for t in err["tried"]] == [(primary, "upstream_error"), (backup, "upstream_quota")]


def test_fallback_cycles_and_unknown_names_are_rejected_at_deploy(client, ep, deploy, name):
    a, ka = ep()
    b, kb = ep(fallbacks=[a])
    r = deploy(a, ka, fallbacks=[b])
    assert r.status_code == 400 and "cycle" in r.get_json()["error"]["message"]
    assert f"{a} -> {b} -> {a}" in r.get_json()["error"]["message"]
    r = deploy(a, ka, fallbacks=[a])
    assert r.status_code == 400 and "own fallback" in r.get_json()["error"]["message"]
    r = deploy(name(), ka, fallbacks=["no_such_endpoint"])
    assert r.status_code == 400 and "no_such_endpoint" in r.get_json()["error"]["message"]
    assert client.get(f"/deployments/{a}").get_json()["fallbacks"] == []  # nothing changed


# -- cooldowns --------------------------------------------------------------------------
def test_cooldown_is_entered_shared_and_left(ray_head, fake_openai, fake_zhipu, ep, name):
    settings = Settings.from_env(ray_address=ray_head.address, cooldown_failures=3, cooldown_window_s=60, cooldown_s=6)
    one, two = create_app(settings).test_client(), create_app(settings).test_client()  # two gateway processes' worth
    backup, _ = ep("zhipu", base_url=fake_zhipu.base_url)
    primary, k = ep(max_retries=0, fallbacks=[backup])
    lonely, lk = ep(max_retries=0)
    fake_openai.script(k, *[openai_error(500, "down", "server_error", None)] * 3)
    for _ in range(3):
        assert one.post("/chat", json={"chat_name": primary, "content": "x"}).get_json()["served_by"] == backup
    assert len(fake_openai.requests_for(k)) == 3
    health = one.get(f"/deployments/{primary}").get_json()["health"]
    assert health["state"] == "cooling_down" and health["consecutive_failures"] == 3
    # Skipped by every process: straight to the fallback, the primary's upstream sees nothing.
    r = two.post("/chat", json={"chat_name": primary, "content": "x"}).get_json()
    assert r["served_by"] == backup and r["tried"][0]["type"] == "endpoint_not_ready"
    assert len(fake_openai.requests_for(k)) == 3
    # An auth failure cools down at once; with no fallback the answer is a fast 503 with Retry-After.
    fake_openai.script(lk, openai_error(401, "bad key", "invalid_request_error", "invalid_api_key"))
    assert one.post("/chat", json={"chat_name": lonely, "content": "x"}).status_code == 502
    r = one.post("/chat", json={"chat_name": lonely, "content": "x"})
    assert r.status_code == 503 and r.get_json()["error"]["type"] == "endpoint_not_ready" and int(r.headers["Retry-After"]) >= 1
    # whole seconds, rounded up, the same in the body as in the header (not 29.97608...)
    assert r.get_json()["error"]["retry_after"] == int(r.headers["Retry-After"])
    # After the period one request probes; its success ends the cooldown.
    time.sleep(settings.cooldown_s + 0.5)
    r = one.post("/chat", json={"chat_name": primary, "content": "x"}).get_json()
    assert r["served_by"] == primary
    assert one.get(f"/deployments/{primary}").get_json()["health"]["state"] == "ok"


# -- streaming ----------------------------------------------------------------------------
@pytest.mark.parametrize("provider", ["openai", "zhipu", "qwen"])
def test_streaming_for_every_provider(client, ep, provider, fake_zhipu, fake_dashscope):
    base = {"openai": None, "zhipu": fake_zhipu.base_url, "qwen": fake_dashscope.base_url}[provider]
    chat_name, _ = ep(provider, base_url=base)
    r = client.post("/chat", json={"chat_name": chat_name, "content": "hello stream world", "stream": True})
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    events = sse_events(r.get_data(as_text=True))
    deltas = [d["delta"] for e, d in events if isinstance(d, dict) and "delta" in d]
    assert "".join(deltas) == "echo: hello stream world" and len(deltas) == 4
    last = events[-2][1]
    assert last["finish_reason"] == "stop" and last["served_by"] == chat_name and last["provider"] == provider
    assert last["usage"]["completion_tokens"] == 4 and last["usage"]["total_tokens"] > 4
    assert events[-1] == ("message", "[DONE]")


def test_stream_retries_and_falls_back_before_the_first_byte(client, ep, fake_openai, fake_zhipu):
    backup, _ = ep("zhipu", base_url=fake_zhipu.base_url)
    primary, k = ep(max_retries=1, fallbacks=[backup])
    fake_openai.script(k, openai_error(503, "overloaded", "server_error", None))
    events = sse_events(client.post("/chat", json={"chat_name": primary, "content": "a b", "stream": True}).get_data(as_text=True))
    assert events[-2][1]["served_by"] == primary and events[-2][1]["attempts"] == 2
    fake_openai.script(k, openai_error(401, "bad key", "invalid_request_error", "invalid_api_key"))
    events = sse_events(client.post("/chat", json={"chat_name": primary, "content": "a b", "stream": True}).get_data(as_text=True))
    assert events[-2][1]["served_by"] == backup and events[-2][1]["tried"][0]["type"] == "upstream_auth"


def test_stream_cut_half_way_ends_with_an_error_event(client, ep, fake_openai):
    chat_name, k = ep()
    fake_openai.script(k, Reply(pieces=["one ", "two ", "three ", "four"], cut_after=2, piece_delay=0.2))
    r = client.post("/chat", json={"chat_name": chat_name, "content": "x", "stream": True})
    events = sse_events(r.get_data(as_text=True))
    assert [d["delta"] for e, d in events if e == "message"] == ["one ", "two "]
    assert events[-1][0] == "error" and events[-1][1]["error"]["type"] == "upstream_error"
    assert len(fake_openai.requests_for(k)) == 1  # nothing is retried once bytes went out


def test_stream_errors_before_the_first_byte_are_plain_json(client, ep, fake_openai):
    chat_name, k = ep()
    fake_openai.script(k, openai_error(400, "unsafe", "invalid_request_error", "content_policy_violation"))
    r = client.post("/chat", json={"chat_name": chat_name, "content": "x", "stream": True})
    assert r.status_code == 400 and r.get_json()["error"]["type"] == "content_filter"


# -- replicas dying under load ----------------------------------------------------------------
def test_a_replica_killed_under_steady_load_loses_nothing_for_callers_that_honour_retry_after(client, ep, fake_openai):
    """The calls the killed replica had accepted fail with 503 ``endpoint_not_ready`` and are not sent again
    by the gateway (the provider may have billed them); a caller that honours ``Retry-After`` gets its answer."""
    chat_name, k = ep(workers=2)
    attempts, answers, stop = [], [], threading.Event()

    def load():
        while not stop.is_set():
            fake_openai.script(k, Reply(delay=0.1))
            for _ in range(3):  # a caller that honours Retry-After
                r = client.post("/chat", json={"chat_name": chat_name, "content": "x"})
                attempts.append((r.status_code, r.get_json()["error"]["type"] if r.status_code != 200 else ""))
                if r.status_code != 503:
                    break
                time.sleep(float(r.headers["Retry-After"]))
            answers.append(r.status_code)

    with ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            pool.submit(load)
        time.sleep(1.5)
        from ray.util.state import list_actors

        replicas = [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10000)
                    if (a.name or "").startswith(f"SERVE_REPLICA::{chat_name}#")]
        assert len(replicas) == 2
        ray.kill(ray.get_actor(replicas[0].name, namespace="serve"), no_restart=True)
        time.sleep(3)
        stop.set()
    failed = [a for a in attempts if a[0] != 200]
    print(f"{len(attempts)} attempts, {len(failed)} failed: {failed}")
    assert len(answers) > 20 and set(answers) == {200}, answers  # nothing lost for these callers
    assert len(failed) <= 4 and all(a == (503, "endpoint_not_ready") for a in failed), failed  # only those in flight
    assert len(fake_openai.requests_for(k)) == len(attempts)  # each attempt reached the provider once: none twice


# -- fan-out -----------------------------------------------------------------------------------
def test_broadcast_asks_everyone_at_once(client, ep, fake_openai, fake_zhipu):
    fast = ep("zhipu", base_url=fake_zhipu.base_url)[0]
    (slow_a, key_a), (slow_b, key_b) = ep(), ep()
    fake_openai.script(key_a, Reply(delay=1.5))
    fake_openai.script(key_b, Reply(delay=1.5))
    r = client.post("/chat/broadcast", json={"chat_names": [slow_a, slow_b, fast, "not_there"], "content": "hi"})
    results = r.get_json()["results"]
    assert r.status_code == 200
    assert {n: results[n]["output"] for n in (slow_a, slow_b, fast)} == {n: "echo: hi" for n in (slow_a, slow_b, fast)}
    assert results[fast]["provider"] == "zhipu"
    assert results["not_there"]["error"]["type"] == "not_found"
    # Concurrent, not in turn: each slow request was sent while the other was still being answered.
    sent_a, sent_b = fake_openai.requests_for(key_a)[-1]["at"], fake_openai.requests_for(key_b)[-1]["at"]
    assert abs(sent_a - sent_b) < 1.5

    # Streamed (the console's Compare view): every answer as it comes, named, each ending exactly
    # once, with its own latency and tokens; a failure ends only its own column.
    fake_openai.script(key_a, Reply(pieces=["one ", "two"]))
    fake_openai.script(key_b, openai_error(401, "Incorrect API key provided", "invalid_request_error", "invalid_api_key"))
    r = client.post("/chat/broadcast", json={"chat_names": [slow_a, slow_b, fast, "not_there"], "stream": True,
                                             "messages": [{"role": "system", "content": "brief"},
                                                          {"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    text = r.get_data(as_text=True)
    assert text.startswith(": open\n\n")  # (a comment first: the headers go out at once)
    events = [e for e in sse_events(text) if e[1] is not None]
    assert events[-1] == ("message", "[DONE]")
    columns: dict = {}
    for kind, data in events[:-1]:
        columns.setdefault(data["chat_name"], []).append((kind, data))
    assert set(columns) == {slow_a, slow_b, fast, "not_there"}
    for name, column in columns.items():  # one end per endpoint, and it is the last of its events
        ends = [d for k, d in column if k == "error" or "finish_reason" in d]
        assert len(ends) == 1 and ends[0] is column[-1][1], (name, column)
    assert "".join(d.get("delta", "") for _, d in columns[slow_a]) == "one two"
    end = columns[slow_a][-1][1]
    assert end["finish_reason"] == "stop" and end["served_by"] == slow_a and end["usage"]["total_tokens"] > 0
    assert 0 < end["first_token_ms"] <= end["latency_ms"]
    assert "".join(d.get("delta", "") for _, d in columns[fast]) == "echo: hi"
    assert columns[fast][-1][1]["provider"] == "zhipu"
    assert columns[slow_b] == [("error", columns[slow_b][0][1])]
    assert columns[slow_b][0][1]["error"]["type"] == "upstream_auth" and "Incorrect API key" in columns[slow_b][0][1]["error"]["message"]
    assert columns["not_there"][0][1]["error"]["type"] == "not_found"

    # Every call seat of this process taken (a broadcast's columns are calls like any other): the
    # columns wait their turn for GATEWAY_ENDPOINT_QUEUE_S, then answer busy, with Retry-After.
    bulkhead = client.application.extensions["gateway"].dispatcher._bulkhead
    bulkhead._in_all += bulkhead.total
    try:
        r = client.post("/chat/broadcast", json={"chat_names": [slow_a, fast], "content": "hi", "stream": True})
        busy = [d for k, d in sse_events(r.get_data(as_text=True)) if k == "error"]
        assert [(d["chat_name"], d["error"]["type"], d["error"]["retry_after"]) for d in busy] == [
            (slow_a, "endpoint_busy", 1.0), (fast, "endpoint_busy", 1.0)]
        assert "this gateway process already holds" in busy[0]["error"]["message"]
    finally:
        bulkhead._in_all -= bulkhead.total

    # A client that leaves mid-way: every stream is closed, the upstream one included.
    fake_openai.script(key_a, Reply(pieces=[f"w{i} " for i in range(40)], piece_delay=0.3))
    r = client.post("/chat/broadcast", json={"chat_names": [slow_a], "content": "long", "stream": True}, buffered=False)
    first = next(chunk for chunk in r.response if b"data:" in chunk)
    assert b'"delta"' in first
    r.close()
    sent = fake_openai.abandoned_after(key_a)
    assert sent is not None and sent < 40, fake_openai.abandoned
