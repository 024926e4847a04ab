"""A provider key reaches the provider and nothing else: no answer, log, or dashboard view."""
from __future__ import annotations

import glob
import json
import os
import urllib.request
import uuid
from pathlib import Path

from tests.fakes.upstreams import openai_error


def ray_token() -> str:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"]
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return Path(path).read_text().strip()


def dashboard_get(head, path: str) -> str:
    url = f"http://{head.settings.dashboard_host}:{head.settings.dashboard_port}{path}"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {ray_token()}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
        return resp.read().decode("utf-8", "replace")


def test_key_appears_nowhere_but_at_the_provider(client, deploy, fake_openai, fake_zhipu, fake_dashscope, name, ray_head,
                                                caplog, capfd):
    caplog.set_level("DEBUG")
    key = f"sk-canary-{uuid.uuid4().hex}"
    chat_name = name("secret")
    answers = []

    def keep(r):
        answers.append(r.get_data(as_text=True) + json.dumps(dict(r.headers)))
        return r

    keep(deploy(chat_name, key, workers=2))
    keep(client.post("/openai/chat", json={"chat_name": chat_name, "content": "hi"}))
    keep(client.post("/chat", json={"chat_name": chat_name, "content": "hi"}))
    fake_openai.script(key, openai_error(401, f"Incorrect API key provided: {key}", "invalid_request_error", "invalid_api_key"))
    keep(client.post("/chat", json={"chat_name": chat_name, "content": "hi"}))
    keep(client.get("/deployments"))
    keep(client.get(f"/deployments/{chat_name}"))
    keep(deploy(chat_name, key, workers=1))  # an update travels the same way
    keep(client.post("/openai/deploy", json={"api_key": key, "chat_name": chat_name, "model_name": "m", "workers": "x"}))
    # The other providers, and a deploy that fails: the key is in none of their traces either.
    zkey, qkey = f"{uuid.uuid4().hex[:10]}.{key}", f"sk-{key}"
    for provider, k, fake in (("zhipu", zkey, fake_zhipu), ("qwen", qkey, fake_dashscope)):
        other = name(f"secret_{provider}")
        keep(deploy(other, k, provider=provider, base_url=fake.base_url))
        keep(client.post("/chat", json={"chat_name": other, "content": "hi"}))
        assert fake.requests_for(k)
    from gateway import Settings, create_app

    impatient = create_app(Settings.from_env(ray_address=ray_head.address, deploy_wait_s=2)).test_client()
    failed = impatient.post("/stuck/deploy", json={"api_key": key, "chat_name": name("secret_f"), "model_name": "m",
                                                  "base_url": fake_openai.base_url, "timeout": 1})
    assert failed.status_code == 422
    keep(failed)

    # The key did reach the provider (otherwise the checks below prove nothing).
    assert fake_openai.requests_for(key)

    for text in answers:
        assert key not in text
    views = {
        "serve applications": dashboard_get(ray_head, "/api/serve/applications/"),
        "actors (ray list actors --detail)": dashboard_get(ray_head, "/api/v0/actors?detail=1&limit=10000"),
        "jobs": dashboard_get(ray_head, "/api/jobs/"),
    }
    assert chat_name in views["serve applications"]  # we are looking at the right cluster
    for label, text in views.items():
        assert key not in text, label

    # Everything Ray wrote (controller, replicas, raylet, dashboard, worker stdout/stderr).
    log_files = [p for p in glob.glob("/tmp/ray/session_*/logs/**/*", recursive=True) if os.path.isfile(p)]
    assert log_files
    for path in log_files:
        with open(path, "rb") as fh:
            assert key.encode() not in fh.read(), path

    out, err = capfd.readouterr()
    assert key not in out and key not in err
    assert all(key not in record.getMessage() for record in caplog.records)


def test_fingerprint_is_not_enough_to_use_the_key():
    from providers.base import key_fingerprint

    assert key_fingerprint("sk-proj-abcdefghijklmnopqrstuvwxyz1234") == "sk-...1234"
    assert key_fingerprint("9d3c9f00aa.AbCdEf") == "9d3...CdEf"
    assert key_fingerprint("short") == "***"
