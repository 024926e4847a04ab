"""Gateway auth on every route, safe binding, endpoints.yaml, manifests; keys stay where they belong."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from gateway import Settings, create_app
from tests.procs import ROOT

ADMIN = "admin-token-" + "x" * 24
CLIENT = "client-key-full-access-0001"
SCOPED = "client-key-scoped-0002"
SLOW = "client-key-rate-limited-0003"


@pytest.fixture(scope="module")
def secured(ray_head, tmp_path_factory, fake_openai):
    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys.write_text(yaml.safe_dump([
        {"key": CLIENT, "name": "legacy-app"},
        {"key": SCOPED, "name": "scoped-app", "chat_names": ["nothing_else"]},
        {"key": SLOW, "name": "slow-app", "rate_per_minute": 2},
    ]))
    settings = Settings.from_env(ray_address=ray_head.address, admin_token=ADMIN, api_keys_file=str(keys), cooldown_s=0)
    client = create_app(settings).test_client()
    name = f"sec_{uuid.uuid4().hex[:6]}"
    r = client.post("/openai/deploy", headers={"Authorization": f"Bearer {ADMIN}"},
                    json={"api_key": "sk-sec-0001", "chat_name": name, "model_name": "m", "base_url": fake_openai.base_url})
    assert r.status_code == 200, r.get_json()
    yield client, name
    client.post("/openai/undeploy", headers={"Authorization": f"Bearer {ADMIN}"}, json={"chat_name": name})


ADMIN_ROUTES = [("post", "/openai/deploy", {}), ("post", "/zhipu/undeploy", {"chat_name": "x"}),
                ("get", "/deployments", None), ("get", "/deployments/x", None), ("get", "/metrics", None),
                ("get", "/providers", None)]
CLIENT_ROUTES = [("post", "/chat", "chat"), ("post", "/openai/chat", "chat"), ("post", "/chat/broadcast", "broadcast"),
                 ("post", "/v1/chat/completions", "v1"), ("get", "/v1/models", None)]


def body_for(kind, name):
    return {"chat": {"chat_name": name, "content": "hi"}, "broadcast": {"chat_names": [name], "content": "hi"},
            "v1": {"model": name, "messages": [{"role": "user", "content": "hi"}]}}.get(kind)


def call(client, method, path, body, token=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return getattr(client, method)(path, headers=headers, **({"json": body} if body is not None else {}))


@pytest.mark.parametrize("method, path, body", ADMIN_ROUTES)
def test_admin_routes_need_the_admin_token(secured, method, path, body):
    client, _ = secured
    for token in (None, "wrong-token", CLIENT):
        r = call(client, method, path, body, token)
        assert r.status_code == 401, (path, token, r.status_code)
        assert r.get_json()["error"]["type"] == "unauthorized"
    assert call(client, method, path, body, ADMIN).status_code != 401


@pytest.mark.parametrize("method, path, kind", CLIENT_ROUTES)
def test_chat_routes_need_a_client_key(secured, method, path, kind):
    client, name = secured
    body = body_for(kind, name)
    for token in (None, "wrong-key"):
        r = call(client, method, path, body, token)
        assert r.status_code == 401, (path, token)
        err = r.get_json()["error"]
        assert err.get("type") == "unauthorized" or err.get("gateway_type") == "unauthorized"
    for token in (CLIENT, ADMIN):
        assert call(client, method, path, body, token).status_code == 200, (path, token)


def test_open_routes(secured):
    client, _ = secured
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_a_scoped_key_reaches_only_its_chat_names(secured):
    client, name = secured
    r = call(client, "post", "/chat", body_for("chat", name), SCOPED)
    assert r.status_code == 403 and r.get_json()["error"]["type"] == "forbidden" and name in r.get_json()["error"]["message"]
    r = call(client, "post", "/v1/chat/completions", body_for("v1", name), SCOPED)
    assert r.status_code == 403 and r.get_json()["error"]["type"] == "permission_error"
    r = call(client, "post", "/chat", {**body_for("chat", "nothing_else"), "fallbacks": [name]}, SCOPED)
    assert r.status_code == 403  # no reaching an endpoint through request-level fallbacks
    assert call(client, "get", "/v1/models", None, SCOPED).get_json()["data"] == []
    assert name in [m["id"] for m in call(client, "get", "/v1/models", None, CLIENT).get_json()["data"]]


def test_a_key_past_its_rate_gets_429(secured):
    client, name = secured
    codes = [call(client, "post", "/chat", body_for("chat", name), SLOW).status_code for _ in range(3)]
    assert codes[:2] == [200, 200] and codes[2] == 429
    r = call(client, "post", "/chat", body_for("chat", name), SLOW)
    assert r.get_json()["error"]["type"] == "rate_limited" and int(r.headers["Retry-After"]) >= 1
    assert call(client, "post", "/chat", body_for("chat", name), CLIENT).status_code == 200  # others unaffected


def test_manifests_validate_against_the_kubernetes_schemas():
    """Every document of every file in deploy/kubernetes (tests/test_deploy_files.py checks the hardening)."""
    import kubernetes_validate

    files = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
    docs = {path.name: [d for d in yaml.safe_load_all(path.read_text()) if d] for path in files}
    assert {d["kind"] for d in docs["gateway.yaml"]} == {"Deployment", "Service"}
    assert {d["kind"] for d in docs["networkpolicy.yaml"]} == {"NetworkPolicy"}
    for doc in (d for file_docs in docs.values() for d in file_docs if d["kind"] != "RayCluster"):
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    (ray_cluster,) = docs["raycluster.yaml"]
    assert ray_cluster["apiVersion"] == "ray.io/v1" and ray_cluster["kind"] == "RayCluster"
    spec = ray_cluster["spec"]
    assert spec["rayVersion"] == __import__("ray").__version__  # the cluster runs the gateway's Ray
    groups = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"} <= set(group)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert any("nvidia.com/gpu" in c["resources"]["limits"] for g in spec["workerGroupSpecs"] for c in g["template"]["spec"]["containers"])
    for group in groups:  # every pod template is a valid Kubernetes PodTemplateSpec
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                      "template": group["template"]}, "1.30.0", strict=True)


# -- endpoints.yaml ---------------------------------------------------------------------------
def endpoints_file(tmp_path, fake_openai, fake_zhipu, suffix) -> tuple[Path, list[str]]:
    names = [f"file_zhipu_{suffix}", f"file_openai_{suffix}", f"file_missing_{suffix}"]
    path = tmp_path / "endpoints.yaml"
    path.write_text(yaml.safe_dump({"endpoints": [
        {"chat_name": names[1], "provider": "openai", "model_name": "gpt-4o-mini", "api_key_env": "TEST_OPENAI_KEY",
         "base_url": fake_openai.base_url, "workers": 1, "fallbacks": [names[0]]},
        {"chat_name": names[0], "provider": "zhipu", "model_name": "glm-4", "api_key_env": "TEST_ZHIPU_KEY",
         "base_url": fake_zhipu.base_url},
        {"chat_name": names[2], "provider": "openai", "model_name": "m", "api_key_env": "TEST_NOT_SET_ANYWHERE",
         "base_url": fake_openai.base_url},
    ]}))
    return path, names


def test_endpoints_file_applied_twice_and_with_a_missing_variable(ray_head, tmp_path, fake_openai, fake_zhipu):
    from tests.procs import gunicorn_joined_to

    path, names = endpoints_file(tmp_path, fake_openai, fake_zhipu, uuid.uuid4().hex[:6])
    env = {**os.environ, "TEST_OPENAI_KEY": "sk-from-env-0001", "TEST_ZHIPU_KEY": "abc.def0001"}
    env.pop("TEST_NOT_SET_ANYWHERE", None)
    runner = gunicorn_joined_to(ray_head.address, tmp_path / "gunicorn.log", GATEWAY_WORKERS="1")
    base, _, _ = next(runner)
    try:
        def apply():
            out = subprocess.run([sys.executable, "-m", "gateway", "apply", str(path), "--url", base], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=300)
            return out.returncode, [json.loads(line) for line in out.stdout.splitlines()], out.stdout + out.stderr

        code, reports, text = apply()
        assert code == 1  # one endpoint could not be deployed
        by_name = {r["chat_name"]: r for r in reports}
        assert by_name[names[0]]["status"] == "deployed" and by_name[names[1]]["status"] == "deployed"
        assert by_name[names[2]]["status"] == "error" and "TEST_NOT_SET_ANYWHERE" in by_name[names[2]]["message"]
        assert [r["chat_name"] for r in reports][:2] == [names[0], names[1]]  # fallback target first
        code, reports, text = apply()
        assert {r["chat_name"]: r["status"] for r in reports} == {names[0]: "unchanged", names[1]: "unchanged", names[2]: "error"}
        assert "sk-from-env-0001" not in text and "abc.def0001" not in text
        r = httpx.post(base + "/chat", json={"chat_name": names[1], "content": "hi"}, timeout=60)
        assert r.status_code == 200 and r.json()["output"] == "echo: hi"
        assert fake_openai.requests_for("sk-from-env-0001")  # the key came from the environment
    finally:
        with httpx.Client(base_url=base, timeout=60) as http:
            http.post("/openai/undeploy", json={"chat_name": names[1]})
            http.post("/zhipu/undeploy", json={"chat_name": names[0]})
        runner.close()


def test_redeploy_takes_the_old_key_away_with_the_old_replicas(client, deploy, name, ray_head):
    from tests.test_secrets import dashboard_get

    chat_name = name("rotate")
    assert deploy(chat_name, "sk-old-key-0001", workers=2).status_code == 200

    def replica_pids() -> set:
        apps = json.loads(dashboard_get(ray_head, "/api/serve/applications/"))["applications"]
        return {r["pid"] for r in apps[chat_name]["deployments"]["openai"]["replicas"] if r["state"] == "RUNNING"}

    old = replica_pids()
    assert len(old) == 2
    assert deploy(chat_name, "sk-new-key-0002", workers=2).status_code == 200
    assert not old & replica_pids()
    for pid in old:  # the processes that held the old key are gone (Ray may take a moment to reap them)
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"replica process {pid} with the old key is still alive")


def test_the_console_page_is_open_its_data_is_not(secured):
    """A browser loads /ui without any header; every piece of data behind it needs the admin token."""
    client, _ = secured
    for path in ("/ui", "/ui/", "/ui/app.js", "/ui/style.css"):
        r = client.get(path)
        assert r.status_code == 200, (path, r.get_data(as_text=True)[:200])
        assert "script-src 'self'" in r.headers["Content-Security-Policy"] and r.headers["X-Content-Type-Options"] == "nosniff"
    assert client.get("/ui/").mimetype == "text/html"
    assert client.get("/ui/secrets.txt").status_code == 404
    stranger = client.get("/ui/config").get_json()
    assert stranger == {"auth": True, "dashboard_url": None}  # (no cluster address for strangers)
    admin = client.get("/ui/config", headers={"Authorization": f"Bearer {ADMIN}"}).get_json()
    assert admin["auth"] is True and admin["dashboard_url"].startswith("http")
    assert call(client, "get", "/providers", None).status_code == 401
    assert call(client, "get", "/providers", None, CLIENT).status_code == 401  # a client key is no admin token
