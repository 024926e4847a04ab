"""The error model and input validation: every bad input gets a typed JSON answer."""
from __future__ import annotations

import pytest

from gateway import Settings, create_app
from contract.errors import STATUS


def error_of(r):
    body = r.get_json()
    assert set(body) >= {"error"}, body
    err = body["error"]
    assert err["type"] in STATUS and STATUS[err["type"]] == r.status_code
    assert err["message"]
    return err


def test_every_error_type_has_a_status_and_the_issue_statuses_hold():
    expected = {
        "invalid_request": 400, "not_found": 404, "conflict": 409, "payload_too_large": 413,
        "upstream_auth": 502, "upstream_quota": 502, "upstream_rate_limited": 429, "content_filter": 400,
        "upstream_bad_request": 400, "upstream_error": 502, "upstream_timeout": 504,
        "cluster_unavailable": 503, "endpoint_not_ready": 503,
    }
    for kind, status in expected.items():
        assert STATUS[kind] == status


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b"", "JSON object"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'"just a string"', "JSON object"),
    ],
)
def test_malformed_bodies_are_invalid_request(client, raw, fragment):
    for path in ("/chat", "/openai/chat", "/openai/deploy", "/openai/undeploy"):
        r = client.post(path, data=raw, content_type="application/json")
        assert r.status_code == 400, path
        err = error_of(r)
        assert err["type"] == "invalid_request" and fragment in err["message"]


def test_body_without_content_type_is_still_read(client):
    # Legacy callers often send no Content-Type; the gateway reads JSON anyway.
    r = client.post("/chat", data=b'{"chat_name": "nope_missing", "content": "hi"}')
    assert r.status_code == 404 and error_of(r)["type"] == "not_found"


def test_deploy_rejects_unknown_fields_by_name(client):
    r = client.post("/openai/deploy", json={
        "api_key": "sk-x", "chat_name": "a", "model_name": "m", "wokers": 2, "temprature": 1,
    })
    err = error_of(r)
    assert r.status_code == 400 and err["type"] == "invalid_request"
    assert "wokers" in err["message"] and "temprature" in err["message"]
    assert set(err["fields"]) >= {"wokers", "temprature"}


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"chat_name": ""}, "chat_name"),
        ({"chat_name": "_starts_badly"}, "chat_name"),
        ({"chat_name": "has space"}, "chat_name"),
        ({"chat_name": "x" * 65}, "chat_name"),
        ({"chat_name": 7}, "chat_name"),
        ({"api_key": ""}, "api_key"),
        ({"api_key": None}, "api_key"),
        ({"model_name": ""}, "model_name"),
        ({"workers": 0}, "workers"),
        ({"workers": "four"}, "workers"),
        ({"timeout": -1}, "timeout"),
        ({"base_url": "ftp://relay.example/v1"}, "base_url"),
        ({"http_proxy": "not a url"}, "base_url"),
        ({"proxy": "socks://x"}, "proxy"),
        ({"model_type": "saas/zhipu"}, "model_type"),
    ],
)
def test_deploy_field_errors_name_the_field(client, patch, field):
    body = {"api_key": "sk-abc", "chat_name": "ok_name", "model_name": "gpt-4o-mini", **patch}
    r = client.post("/openai/deploy", json=body)
    err = error_of(r)
    assert r.status_code == 400 and err["type"] == "invalid_request"
    assert field in err["message"], err


def test_deploy_requires_the_required_fields(client):
    err = error_of(client.post("/openai/deploy", json={}))
    for field in ("chat_name", "model_name", "api_key"):
        assert field in err["fields"]


def test_base_url_and_its_alias_together_are_refused(client):
    r = client.post("/openai/deploy", json={
        "api_key": "sk-abc", "chat_name": "a1", "model_name": "m",
        "base_url": "http://a.example/v1", "http_proxy": "http://b.example/v1",
    })
    assert r.status_code == 400 and "http_proxy" in error_of(r)["message"]


def test_validation_messages_never_echo_input(client):
    secret = "sk-LEAKY-0123456789abcdef"
    r = client.post("/openai/deploy", json={"api_key": {"nested": secret}, "chat_name": "a", "model_name": "m"})
    assert r.status_code == 400
    assert secret not in r.get_data(as_text=True)


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"chat_name": "x"}, "either 'content'"),
        ({"chat_name": "x", "content": "a", "messages": [{"role": "user", "content": "b"}]}, "either 'content'"),
        ({"chat_name": "x", "messages": []}, "empty"),
        ({"chat_name": "x", "messages": [{"role": "wizard", "content": "b"}]}, "messages.0.role"),
        ({"chat_name": "x", "messages": [{"role": "user"}]}, "content"),
        ({"chat_name": "x", "content": ""}, "content"),
        ({"chat_name": "x", "content": "a", "temperature": 3}, "temperature"),
        ({"chat_name": "x", "content": "a", "top_p": 0}, "top_p"),
        ({"chat_name": "x", "content": "a", "max_tokens": 0}, "max_tokens"),
        ({"chat_name": "x", "content": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"chat_name": "x", "content": "a", "temprature": 0.1}, "temprature"),
        ({"content": "a"}, "chat_name"),
        ({"chat_name": "bad name", "content": "a"}, "chat_name"),
    ],
)
def test_chat_validation(client, body, fragment):
    for path in ("/chat", "/openai/chat"):
        r = client.post(path, json=body)
        err = error_of(r)
        assert r.status_code == 400 and err["type"] == "invalid_request", (path, err)
        assert fragment in err["message"], err


def test_unknown_chat_name_is_not_found(client):
    for path in ("/chat", "/openai/chat"):
        r = client.post(path, json={"chat_name": "never_deployed", "content": "hi"})
        assert r.status_code == 404 and error_of(r)["type"] == "not_found"
    r = client.post("/openai/undeploy", json={"chat_name": "never_deployed"})
    assert r.status_code == 404 and error_of(r)["type"] == "not_found"
    r = client.get("/deployments/never_deployed")
    assert r.status_code == 404 and error_of(r)["type"] == "not_found"


def test_unknown_route_and_method(client):
    r = client.post("/nosuchprovider/deploy", json={})
    assert r.status_code == 404 and error_of(r)["type"] == "not_found"
    r = client.get("/chat")
    assert r.status_code == 405 and error_of(r)["type"] == "method_not_allowed"


def test_body_over_the_limit_is_413(ray_head):
    small = create_app(Settings.from_env(ray_address=ray_head.address, max_body_bytes=2048)).test_client()
    r = small.post("/chat", json={"chat_name": "x", "content": "a" * 5000})
    assert r.status_code == 413 and error_of(r)["type"] == "payload_too_large"
    assert "2048" in error_of(r)["message"]


def test_request_id_is_kept_when_sane_and_replaced_otherwise(client):
    r = client.post("/chat", json={"chat_name": "x y"}, headers={"X-Request-Id": "legacy-app.42"})
    assert r.headers["X-Request-Id"] == "legacy-app.42"
    assert r.get_json()["error"]["request_id"] == "legacy-app.42"
    r = client.post("/chat", json={"chat_name": "x y"}, headers={"X-Request-Id": "bad id\twith spaces"})
    assert r.headers["X-Request-Id"] != "bad id\twith spaces" and len(r.headers["X-Request-Id"]) == 32


def test_unreachable_cluster_is_503(ray_head):
    from gateway.head import free_port

    down = create_app(Settings.from_env(ray_address=f"127.0.0.1:{free_port()}")).test_client()
    r = down.post("/chat", json={"chat_name": "anything", "content": "hi"})
    assert r.status_code == 503 and error_of(r)["type"] == "cluster_unavailable"
    assert r.headers["Retry-After"] == "2"
    r = down.get("/readyz")
    assert r.status_code == 503 and error_of(r)["type"] == "cluster_unavailable"
    assert "not reachable" in r.get_json()["error"]["message"]


def test_healthz(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}


def test_undeploy_body_is_validated(client):
    r = client.post("/openai/undeploy", json={"chat_name": "a", "forced": True})
    assert r.status_code == 400 and "forced" in error_of(r)["message"]
    r = client.post("/openai/undeploy", json={"chat_name": "bad name"})
    assert r.status_code == 400 and error_of(r)["fields"] == ["chat_name"]
