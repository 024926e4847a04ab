"""A known mix of traffic through gunicorn (2 workers), then /metrics, the access log and Ray's views."""
from __future__ import annotations

import glob
import json
import re
import urllib.request
import uuid
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.upstreams import openai_error
from tests.procs import gunicorn_joined_to
from tests.test_secrets import ray_token

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "ultra-secret-prompt-7d1c"


def samples(text: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(all_samples: dict, name: str, **labels) -> float:
    """The sum of ``name``'s samples that carry ``labels`` (as PromQL selects: other labels may be there too)."""
    wanted = set(labels.items())
    return sum(v for (metric, have), v in all_samples.items() if metric == name and wanted <= set(have))


@pytest.fixture(scope="module")
def traffic(ray_head, tmp_path_factory, fake_openai, fake_zhipu):
    log_path = tmp_path_factory.mktemp("obs") / "gunicorn.log"
    runner = gunicorn_joined_to(ray_head.address, log_path, GATEWAY_COOLDOWN_S="0")
    base, _, _ = next(runner)
    uid = uuid.uuid4().hex[:6]
    a, b, f = f"obs_a_{uid}", f"obs_b_{uid}", f"obs_f_{uid}"
    ka, kb, kf = (f"{uuid.uuid4().hex[:8]}.{uuid.uuid4().hex}" for _ in range(3))
    unknown = [f"nobody_{uuid.uuid4().hex[:8]}" for _ in range(3)]
    statuses = []
    with httpx.Client(base_url=base, timeout=60) as http:
        def deploy(provider, name, key, fake, **extra):
            r = http.post(f"/{provider}/deploy", json={"api_key": key, "chat_name": name, "model_name": "m",
                                                       "base_url": fake.base_url, **extra})
            assert r.status_code == 200, r.text

        deploy("openai", a, ka, fake_openai, workers=2)
        deploy("zhipu", b, kb, fake_zhipu)
        deploy("openai", f, kf, fake_openai, max_retries=0, fallbacks=[b])

        def chat(name, path="/chat", **extra):
            r = http.post(path, json={"chat_name": name, "content": PROMPT, **extra})
            statuses.append(r.status_code)
            return r

        for _ in range(5):
            chat(a)
        for _ in range(2):
            chat(a, "/openai/chat")
        for reply in (openai_error(401, "bad key", "invalid_request_error", "invalid_api_key"),
                      openai_error(429, "quota", "insufficient_quota", "insufficient_quota"),
                      openai_error(400, "unsafe", "invalid_request_error", "content_policy_violation")):
            fake_openai.script(ka, reply)
            chat(a)
        fake_openai.script(ka, *[openai_error(500, "down", "server_error", None)] * 3)
        chat(a)  # upstream_error after 3 attempts
        fake_openai.script(ka, openai_error(500, "down", "server_error", None))
        ok_after_retry = chat(a)  # ok after 2 attempts
        for name in unknown:
            chat(name)
        statuses.append(http.post("/chat", json={"chat_name": a, "prompt": PROMPT}).status_code)  # a bad body: a caller error of a
        fake_openai.script(kf, openai_error(401, "bad key", "invalid_request_error", "invalid_api_key"))
        fell_back = chat(f)
        stream = chat(a, stream=True)
        assert stream.status_code == 200 and "[DONE]" in stream.text
        scrape = http.get("/metrics").text
    yield {"base": base, "a": a, "b": b, "f": f, "keys": (ka, kb, kf), "unknown": unknown, "statuses": statuses,
           "scrape": scrape, "log_path": log_path, "ok_after_retry": ok_after_retry, "fell_back": fell_back}
    with httpx.Client(base_url=base, timeout=60) as http:
        for provider, name in (("openai", f), ("openai", a), ("zhipu", b)):
            http.post(f"/{provider}/undeploy", json={"chat_name": name, "force": True})
    runner.close()


def test_request_counts_by_route_endpoint_and_outcome(traffic):
    s, a, f = samples(traffic["scrape"]), traffic["a"], traffic["f"]
    rt = "gateway_requests_total"
    assert value(s, rt, route="/chat", chat_name=a, provider="openai", outcome="ok") == 7  # 5 + retry + stream
    assert value(s, rt, route="/openai/chat", chat_name=a, provider="openai", outcome="ok") == 2
    for outcome, fault in (("upstream_auth", "endpoint"), ("upstream_quota", "endpoint"), ("content_filter", "caller"),
                           ("upstream_error", "endpoint"), ("invalid_request", "caller")):  # (a bad body names a)
        assert value(s, rt, route="/chat", chat_name=a, provider="openai", outcome=outcome, fault=fault) == 1, outcome
    assert value(s, rt, route="/chat", chat_name=a, fault="none") == 7
    assert value(s, rt, route="/chat", chat_name="_unknown", provider="_unknown", outcome="not_found", fault="caller") == 3
    assert value(s, rt, chat_name="_unknown", outcome="invalid_request") == 0
    assert value(s, rt, route="/chat", chat_name=f, provider="openai", outcome="ok") == 1
    assert traffic["ok_after_retry"].json()["attempts"] == 2


def test_unknown_names_and_user_input_never_become_labels(traffic):
    text = traffic["scrape"]
    for name in traffic["unknown"]:
        assert name not in text
    assert PROMPT not in text
    for key in traffic["keys"]:
        assert key not in text


def test_retries_fallbacks_tokens_latency_and_streams(traffic):
    s, a, b, f = samples(traffic["scrape"]), traffic["a"], traffic["b"], traffic["f"]
    assert value(s, "gateway_upstream_retries_total", chat_name=a, provider="openai") == 3
    assert value(s, "gateway_fallbacks_total", **{"from": f, "to": b, "reason": "upstream_auth"}) == 1
    assert traffic["fell_back"].json()["served_by"] == b
    assert value(s, "gateway_tokens_total", chat_name=a, provider="openai", kind="prompt") > 0
    assert value(s, "gateway_tokens_total", chat_name=a, provider="openai", kind="completion") > 0
    assert value(s, "gateway_tokens_total", chat_name=b, provider="zhipu", kind="completion") > 0
    assert value(s, "gateway_request_duration_seconds_count", chat_name=a, provider="openai") == 14
    assert value(s, "gateway_time_to_first_token_seconds_count", chat_name=a, provider="openai") == 1
    assert value(s, "gateway_upstream_duration_seconds_count", chat_name=a, provider="openai") >= 8
    assert value(s, "gateway_overhead_seconds_count", route="/chat") == 16
    assert value(s, "gateway_in_flight_requests", route="/chat") == 0
    assert value(s, "gateway_endpoints", provider="openai", state="RUNNING") >= 2
    assert value(s, "gateway_endpoints", provider="zhipu", state="RUNNING") >= 1


def test_access_log_has_one_json_line_per_request_and_no_secrets(traffic):
    text = traffic["log_path"].read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith('{"time"')]
    chat_lines = [entry for entry in lines if entry["route"] == "/chat"]
    assert len(chat_lines) == sum(1 for _ in traffic["statuses"]) - 2  # minus the two /openai/chat calls
    fell = next(entry for entry in lines if entry["request_id"] == traffic["fell_back"].headers["X-Request-Id"])
    assert fell["served_by"] == traffic["b"] and fell["chat_name"] == traffic["f"] and fell["status"] == 200
    assert fell["tokens"]["completion_tokens"] > 0 and fell["latency_ms"] > 0
    assert {"time", "request_id", "route", "chat_name", "served_by", "provider", "status", "error_type", "latency_ms",
            "upstream_ms", "attempts", "tokens"} <= set(fell)
    assert PROMPT not in text and "echo:" not in text
    for key in traffic["keys"]:
        assert key not in text


def test_request_ids_reach_the_replica_logs(traffic):
    rid = traffic["ok_after_retry"].headers["X-Request-Id"]
    found = [p for p in glob.glob("/tmp/ray/session_*/logs/serve/*.log") if rid in Path(p).read_text(errors="replace")]
    assert found, "the request id should appear in a replica's log lines"


def test_ray_dashboard_shows_each_endpoint_its_provider_and_replicas(traffic, ray_head):
    url = f"http://{ray_head.settings.dashboard_host}:{ray_head.settings.dashboard_port}/api/serve/applications/"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {ray_token()}"})
    apps = json.loads(urllib.request.urlopen(req, timeout=30).read())["applications"]
    for name, provider, replicas in ((traffic["a"], "openai", 2), (traffic["b"], "zhipu", 1), (traffic["f"], "openai", 1)):
        deployments = apps[name]["deployments"]
        assert list(deployments) == [provider]
        running = [r for r in deployments[provider]["replicas"] if r["state"] == "RUNNING"]
        assert len(running) == replicas and deployments[provider]["status"] == "HEALTHY"


def test_every_grafana_expression_names_an_exported_metric(traffic):
    exported = {f.name for f in text_string_to_metric_families(traffic["scrape"])}
    exported |= {n for f in text_string_to_metric_families(traffic["scrape"]) for n in (f.name + "_total",)}
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "gateway.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 12
    for expr in exprs:
        names = re.findall(r"\bgateway_[a-z_]+", expr)
        assert names, expr
        for name in names:
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            assert base in exported or name in exported, f"{name} in {expr!r} is not exported"


def test_the_callers_errors_are_counted_apart_from_the_endpoints_failures(client, deploy, name, fake_openai):
    """A bad body or a refused call is the caller's error, not the endpoint's: ``GET /deployments`` rows count it
    apart (``caller_errors``) from the endpoint's failures (``errors``), and so does ``gateway_requests_total``
    (its ``fault`` label: ``caller``, ``endpoint`` or ``none``)."""
    chat_name, key = name("fault"), f"sk-{uuid.uuid4().hex}"
    assert deploy(chat_name, key, max_retries=0).status_code == 200

    def row() -> dict:
        return client.get(f"/deployments/{chat_name}").get_json()["traffic"]

    assert row() == {"requests": 0, "errors": 0, "caller_errors": 0, "prompt_tokens": 0, "completion_tokens": 0}
    assert client.post("/chat", json={"chat_name": chat_name, "content": "one two"}).status_code == 200
    r = client.post("/chat", json={"chat_name": chat_name, "content": "three", "temperature": 7})  # (0 to 2)
    assert r.status_code == 400 and r.get_json()["error"]["type"] == "invalid_request"
    fake_openai.script(key, openai_error(500, "The server had an error", "server_error", None))
    r = client.post("/chat", json={"chat_name": chat_name, "content": "four"})
    assert r.status_code == 502 and r.get_json()["error"]["type"] == "upstream_error"
    counts = row()
    assert (counts["requests"], counts["errors"], counts["caller_errors"]) == (3, 1, 1), counts
    assert counts["prompt_tokens"] > 0 and counts["completion_tokens"] > 0
    rows = {r["chat_name"]: r for r in client.get("/deployments").get_json()["deployments"]}
    assert rows[chat_name]["traffic"] == counts

    s = samples(client.get("/metrics").get_data(as_text=True))
    mine = {labels: n for (metric, labels), n in s.items() if metric == "gateway_requests_total"
            and ("chat_name", chat_name) in labels}
    by_fault = {}
    for labels, n in mine.items():
        by_fault[dict(labels)["fault"], dict(labels)["outcome"]] = n
    assert by_fault == {("none", "ok"): 1, ("caller", "invalid_request"): 1, ("endpoint", "upstream_error"): 1}
