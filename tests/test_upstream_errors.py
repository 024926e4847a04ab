"""Every upstream failure reaches the caller as the gateway's own error type, over real sockets.

The fake speaks OpenAI's error bodies and statuses; the official SDK inside a real replica
raises its own exceptions, which must come back as plain gateway errors.
"""
from __future__ import annotations

import pytest

from tests.fakes.upstreams import Reply, openai_error


@pytest.fixture
def endpoint(deploy, name):
    def _make(key, **fields):
        chat_name = name("err")
        r = deploy(chat_name, key, **fields)
        assert r.status_code == 200, r.get_json()
        return chat_name
    return _make


CASES = [
    pytest.param(
        openai_error(401, "Incorrect API key provided: sk-bad...0001.", "invalid_request_error", "invalid_api_key"),
        502, "upstream_auth", "invalid_api_key", id="401-bad-key"),
    pytest.param(
        openai_error(403, "Country, region, or territory not supported", "request_forbidden", "unsupported_country_region_territory"),
        502, "upstream_auth", "unsupported_country_region_territory", id="403-forbidden"),
    pytest.param(
        openai_error(429, "You exceeded your current quota, please check your plan and billing details.", "insufficient_quota", "insufficient_quota"),
        502, "upstream_quota", "insufficient_quota", id="429-quota"),
    pytest.param(
        openai_error(429, "Rate limit reached for gpt-4o-mini on requests per min (RPM)", "requests", "rate_limit_exceeded", {"retry-after": "7"}),
        429, "upstream_rate_limited", "rate_limit_exceeded", id="429-rate"),
    pytest.param(
        openai_error(400, "Your request was rejected as a result of our safety system.", "invalid_request_error", "content_policy_violation"),
        400, "content_filter", "content_policy_violation", id="400-content"),
    pytest.param(
        openai_error(400, "'messages' must contain the word 'json'", "invalid_request_error", "invalid_value"),
        400, "upstream_bad_request", "invalid_value", id="400-bad"),
    pytest.param(
        openai_error(404, "The model `gpt-9` does not exist or you do not have access to it.", "invalid_request_error", "model_not_found"),
        400, "upstream_bad_request", "model_not_found", id="404-model"),
    pytest.param(
        openai_error(500, "The server had an error while processing your request. Sorry about that!", "server_error", None),
        502, "upstream_error", "server_error", id="500"),
    pytest.param(
        openai_error(503, "The engine is currently overloaded, please try again later", "server_error", None),
        502, "upstream_error", "server_error", id="503"),
    pytest.param(Reply(200, "{this is not json"), 502, "upstream_error", None, id="200-malformed"),
    pytest.param(Reply(200, {"id": "x", "object": "chat.completion", "created": 1, "model": "m", "choices": []}),
                 502, "upstream_error", None, id="200-no-choices"),
    pytest.param(Reply(200, {"id": "x", "object": "chat.completion", "model": "m", "choices": [{"index": 0}]}),
                 502, "upstream_error", None, id="200-choice-without-message"),
    pytest.param(Reply(200, ["not", "an", "object"]), 502, "upstream_error", None, id="200-json-array"),
]


@pytest.mark.parametrize("reply, status, kind, code", CASES)
def test_upstream_failure_maps_to_gateway_error(client, shared_endpoint, reply, status, kind, code):
    chat_name, key, fake_openai = shared_endpoint("openai")
    before = len(fake_openai.requests_for(key))
    fake_openai.script(key, reply, reply)
    for path in ("/chat", "/openai/chat"):
        r = client.post(path, json={"chat_name": chat_name, "content": "hi"})
        assert r.status_code == status, (path, r.get_json())
        err = r.get_json()["error"]
        assert err["type"] == kind and err["provider"] == "openai"
        assert err.get("provider_code") == code
        assert err["request_id"] == r.headers["X-Request-Id"]
        if reply.status >= 400:
            assert err["upstream_status"] == reply.status
            assert err["provider_request_id"].startswith("req_")
            assert reply.body["error"]["message"][:20] in err["message"]
        if kind == "upstream_rate_limited":
            assert r.headers["Retry-After"] == "7" and err["retry_after"] == 7
    # One upstream call per request: the SDK's own retries are off.
    assert len(fake_openai.requests_for(key)) == before + 2


def test_upstream_that_hangs_past_the_timeout_is_504(client, endpoint, fake_openai):
    key = "sk-hang-0001"
    chat_name = endpoint(key, timeout=1)
    fake_openai.script(key, Reply(delay=4))
    r = client.post("/chat", json={"chat_name": chat_name, "content": "hi"})
    assert r.status_code == 504
    assert r.get_json()["error"]["type"] == "upstream_timeout"


def test_unreachable_upstream_is_upstream_error(client, deploy, name):
    from gateway.head import free_port

    chat_name = name()
    assert deploy(chat_name, "sk-nowhere-0001", base_url=f"http://127.0.0.1:{free_port()}/v1").status_code == 200
    r = client.post("/chat", json={"chat_name": chat_name, "content": "hi"})
    assert r.status_code == 502
    err = r.get_json()["error"]
    assert err["type"] == "upstream_error" and "connection" in err["message"]


def test_upstream_error_messages_never_carry_the_key(client, endpoint, fake_openai):
    key = "sk-echoed-in-error-0123456789abcdef"
    chat_name = endpoint(key)
    # A careless relay that echoes the whole key, and one that echoes most of it.
    fake_openai.script(key, openai_error(401, f"Incorrect API key provided: {key}", "invalid_request_error", "invalid_api_key"))
    fake_openai.script(key, openai_error(401, f"bad key {key[3:-2]}", "invalid_request_error", "invalid_api_key"))
    for _ in range(2):
        r = client.post("/chat", json={"chat_name": chat_name, "content": "hi"})
        assert r.status_code == 502
        text = r.get_data(as_text=True)
        assert key not in text and key[3:-2] not in text and key[5:20] not in text
        assert "[redacted]" in text
