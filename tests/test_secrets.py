"""A provider key reaches the provider and nothing else: no answer, log, or dashboard view."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr

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
    keep(client.get("/metrics"))  # no key in any label or sample
    keep(client.get("/readyz"))
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
    from providers.keys import key_fingerprint

    assert key_fingerprint("sk-proj-abcdefghijklmnopqrstuvwxyz1234") == "sk-...1234"
    assert key_fingerprint("9d3c9f00aa.AbCdEf") == "9d3...CdEf"
    assert key_fingerprint("short") == "***"


def ray_log_files() -> list[str]:
    """Everything Ray wrote: controller, replicas, raylet, dashboard, worker stdout/stderr."""
    return [p for p in glob.glob("/tmp/ray/session_*/logs/**/*", recursive=True) if os.path.isfile(p)]


def test_a_constructor_that_puts_the_key_in_its_error_is_scrubbed_everywhere(client, name, ray_head, fake_openai,
                                                                             caplog, capfd):
    """An SDK constructor that says the key fails the deploy with a message that says everything else."""
    caplog.set_level("DEBUG")
    key = f"sk-canary-{uuid.uuid4().hex}"
    chat_name = name("brittle")
    body = {"api_key": key, "chat_name": chat_name, "base_url": fake_openai.base_url}
    seen: dict[str, str] = {}

    def keep(label, r):
        seen[label] = r.get_data(as_text=True) + json.dumps(dict(r.headers))
        return r

    # A new endpoint whose replicas cannot start: 422, and the listing keeps why.
    fresh = keep("fresh deploy", client.post("/brittle/deploy", json={**body, "model_name": "unbuildable-1"}))
    failed_view = keep("failed endpoint", client.get(f"/deployments/{chat_name}"))
    # An update that fails the same way: Serve keeps the old replicas, and its report, on view.
    assert keep("good deploy", client.post("/brittle/deploy", json={**body, "model_name": "m"})).status_code == 200
    try:
        update = keep("failed update", client.post("/brittle/deploy", json={**body, "model_name": "unbuildable-2"}))
        keep("listing", client.get("/deployments"))
        keep("endpoint", client.get(f"/deployments/{chat_name}"))
        seen["serve applications"] = dashboard_get(ray_head, "/api/serve/applications/")
        seen["actors"] = dashboard_get(ray_head, "/api/v0/actors?detail=1&limit=10000")
        seen["tasks"] = dashboard_get(ray_head, "/api/v0/tasks?detail=1&limit=10000")
    finally:
        client.post("/brittle/undeploy", json={"chat_name": chat_name})
    # The same constructor run by the gateway's own check, before the cluster.
    eager = keep("eager check", client.post("/brittle_eager/deploy", json={**body, "chat_name": name("brittle_eager"),
                                                                           "model_name": "unbuildable-3"}))
    for path in ray_log_files():
        with open(path, "rb") as fh:
            seen[path] = fh.read().decode("utf-8", "replace")
    out, err = capfd.readouterr()
    seen["stdout/stderr"] = out + err
    seen["caplog"] = "\n".join(record.getMessage() for record in caplog.records)

    leaks = [label for label, text in seen.items() if key in text]
    assert not leaks, "the key is in: " + ", ".join(leaks)
    assert chat_name in seen["serve applications"]  # we are looking at the right cluster

    # ... and the failure still says what went wrong, with the key cut out.
    said = "could not build the client with api_key=[redacted]"
    for r in (fresh, update, eager):
        assert r.status_code == 422, r.get_json()
        error = r.get_json()["error"]
        assert error["type"] == "deploy_failed" and error["reason"] == "load_error", error
        assert said in error["message"] and "ValueError" in error["message"], error
    assert failed_view.get_json()["status"] == "DEPLOY_FAILED"
    assert failed_view.get_json()["failure"] == {"reason": "load_error", "message": fresh.get_json()["error"]["message"]}
    assert said in seen["serve applications"]  # Serve's own report of the failed update, scrubbed


def test_a_construction_failure_keeps_its_reason_and_loses_every_secret():
    import pickle

    from providers.deploy_failure import DeployFailure, construction_failure
    from providers.openai_provider import OpenAIDeploySpec

    key = f"sk-canary-{uuid.uuid4().hex}"
    spec = OpenAIDeploySpec(api_key=key, chat_name="c", model_name="m")
    failure = construction_failure(DeployFailure("model_not_found", f"no model\nfor {key[:20]}..."), spec, "openai")
    assert failure.reason == "model_not_found" and str(failure).startswith("model_not_found: no model for [redacted]")
    assert not any(key[i:i + 8] in str(failure) for i in range(len(key) - 7))  # not even a part of it
    failure = construction_failure(KeyError(key), spec, "openai")
    assert str(failure) == "load_error: the openai adapter could not be built: KeyError: '[redacted]'"
    again = pickle.loads(pickle.dumps(failure))  # (an exception with two arguments must still travel)
    assert (again.reason, str(again)) == (failure.reason, str(failure))

# -- config_digest ----------------------------------------------------------------------------------
def test_config_digest_is_keyed_with_the_cluster_secret(app, client, deploy, name, fake_openai):
    """A listed digest cannot confirm a guessed key offline; the same spec again changes nothing."""
    from gateway.registry import cluster_digest_secret
    from providers.openai_provider import OpenAIDeploySpec

    spec = OpenAIDeploySpec(api_key="sk-digest-0001", chat_name="d", model_name="m")
    one, two = os.urandom(32), os.urandom(32)
    assert spec.digest(one) == spec.digest(one) != spec.digest(two)
    assert spec.model_copy(update={"api_key": SecretStr("sk-digest-0002")}).digest(one) != spec.digest(one)

    key, chat_name = f"sk-digest-{uuid.uuid4().hex}", name("digest")
    assert deploy(chat_name, key).status_code == 200
    listed = client.get(f"/deployments/{chat_name}").get_json()["config_digest"]
    spec = OpenAIDeploySpec(api_key=key, chat_name=chat_name, model_name="gpt-4o-mini", base_url=fake_openai.base_url)
    plain = hashlib.sha256(json.dumps({**spec.model_dump(mode="json"), "api_key": key}, sort_keys=True).encode()).hexdigest()
    assert listed and not plain.startswith(listed)  # what it was: a guess of the key could be checked against it
    secret = cluster_digest_secret(app.extensions["gateway"].settings.ray_namespace)
    assert len(secret) == 32 and cluster_digest_secret(app.extensions["gateway"].settings.ray_namespace) == secret
    assert listed == spec.digest(secret)  # keyed with the secret the cluster keeps

    again = deploy(chat_name, key)  # the gateway, not the client, decides that nothing changed
    assert again.status_code == 200 and again.get_json()["unchanged"] is True and again.get_json()["status"] == "RUNNING"
    assert client.get(f"/deployments/{chat_name}").get_json()["config_digest"] == listed


# -- python -m gateway apply ------------------------------------------------------------------------
def test_apply_sends_keys_only_over_https_or_to_this_machine(tmp_path):
    from gateway.__main__ import default_url
    from gateway.apply import check_transport
    from tests.procs import ROOT

    for url in ("https://gw.example.com", "https://10.0.0.5:8443/", "http://127.0.0.1:8099", "http://127.9.9.9:1",
                "http://localhost:8099", "http://[::1]:8099"):
        check_transport(url)
    for url in ("http://gw.example.com:8099", "http://10.0.0.5:8099", "http://0.0.0.0:8099", "ftp://127.0.0.1/",
                "127.0.0.1:8099"):
        with pytest.raises(SystemExit):
            check_transport(url)
    assert default_url({"GATEWAY_BIND": "0.0.0.0:9000"}) == "http://127.0.0.1:9000"
    assert default_url({"GATEWAY_BIND": "10.0.0.5:9000", "GATEWAY_CERTFILE": "/c.pem"}) == "https://10.0.0.5:9000"

    # The command stops before it sends, or even resolves, anything (.invalid never resolves).
    key = f"sk-plain-{uuid.uuid4().hex}"
    path = tmp_path / "endpoints.yaml"
    path.write_text(yaml.safe_dump({"endpoints": [{"chat_name": "plain", "provider": "openai", "model_name": "m",
                                                   "api_key_env": "TEST_PLAIN_KEY"}]}))
    out = subprocess.run([sys.executable, "-m", "gateway", "apply", str(path), "--url", "http://gateway.invalid:8099"],
                         cwd=ROOT, env={**os.environ, "TEST_PLAIN_KEY": key}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stdout == ""
    assert "refusing to send provider keys over plain HTTP to gateway.invalid" in out.stderr, out.stderr
    assert "https://" in out.stderr and "GATEWAY_CERTFILE" in out.stderr and key not in out.stderr
