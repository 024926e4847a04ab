"""OpenAI-wire providers as configuration (``providers/openai_compatible.py``), on fake upstreams.

Spec rules go through the Flask test client without deploying; three endpoints are deployed once for
the module (a keyless Ollama on a fake that takes requests without a key, DeepSeek and Moonshot on
the session's fake OpenAI); Ark's codes go through its adapter in this process, over a real socket.
"""
from __future__ import annotations

import asyncio
import json
import uuid

import pytest

import providers
from contract.errors import GatewayError
from contract.calls import ChatCall, Message
from tests.fakes.upstreams import FakeOpenAI, Reply, openai_error

NEW = {  # name: (default base URL, key)
    "deepseek": ("https://api.deepseek.com/v1", "required"),
    "moonshot": ("https://api.moonshot.cn/v1", "required"),
    "ark": ("https://ark.cn-beijing.volces.com/api/v3", "required"),
    "ollama": (None, "optional"),
    "xinference": (None, "optional"),
    "fastchat": (None, "optional"),
    "vllm_openai": (None, "optional"),
}


def test_each_provider_is_registered_with_its_routes_base_url_key_and_model_type(app):
    rules = {r.rule for r in app.url_map.iter_rules()}
    for name, (base_url, key) in NEW.items():
        provider = providers.get(name)
        assert provider.name == name and provider.wire.default_base_url == base_url and provider.wire.key == key
        assert provider.spec_class.MODEL_TYPES[0] == f"saas/{name}"
        assert {f"/{name}/{action}" for action in ("deploy", "chat", "undeploy")} <= rules
    assert "saas/volcengine" in providers.get("ark").spec_class.MODEL_TYPES


def test_spec_rules_refuse_before_anything_deploys(client, name):
    r = client.post("/deepseek/deploy", json={"chat_name": name("ds_nokey"), "model_name": "deepseek-chat"})
    assert r.status_code == 400 and r.get_json()["error"]["fields"] == ["api_key"]
    assert "api_key is required" in r.get_json()["error"]["message"]
    # a local server: the key is optional, the base URL is not (localhost is each replica's own node)
    r = client.post("/ollama/deploy", json={"chat_name": name("ol_nobase"), "model_name": "llama3"})
    err = r.get_json()["error"]
    assert r.status_code == 400 and err["fields"] == ["base_url"] and ":11434/v1" in err["message"]
    r = client.post("/moonshot/deploy", json={"chat_name": name("ms_type"), "model_name": "kimi", "api_key": "sk-x",
                                               "model_type": "saas/openai"})
    assert r.status_code == 400 and r.get_json()["error"]["fields"] == ["model_type"]
    spec = providers.get("ollama").spec_class.model_validate({"chat_name": "o", "model_name": "m",
                                                               "base_url": "http://gpu-box:11434/v1"})
    assert spec.base() == "http://gpu-box:11434/v1" and spec.public()["key_fingerprint"] is None
    ark = providers.get("ark").spec_class.model_validate({"chat_name": "a", "model_name": "ep-1", "api_key": "k"})
    assert ark.base() == "https://ark.cn-beijing.volces.com/api/v3" and ark.verify_key is False  # no GET /models


@pytest.fixture(scope="module")
def keyless():
    fake = FakeOpenAI(allow_no_key=True).start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def endpoints(app, keyless, fake_openai):
    """One endpoint per provider for the module: name -> (chat_name, key)."""
    client, made = app.test_client(), {}
    for provider, key, base_url in (("ollama", None, keyless.base_url),
                                    ("deepseek", f"sk-{uuid.uuid4().hex}", fake_openai.base_url),
                                    ("moonshot", f"sk-{uuid.uuid4().hex}", fake_openai.base_url)):
        chat_name = f"wire_{provider}_{uuid.uuid4().hex[:8]}"
        body = {"chat_name": chat_name, "model_name": f"{provider}-model", "base_url": base_url, "max_retries": 0}
        r = client.post(f"/{provider}/deploy", json={**body, "api_key": key} if key else body)
        assert r.status_code == 200, r.get_json()
        made[provider] = (chat_name, key)
    yield made
    for provider, (chat_name, _) in made.items():
        client.post(f"/{provider}/undeploy", json={"chat_name": chat_name, "force": True})


def test_a_keyless_ollama_chats_and_streams_without_an_authorization_header(client, endpoints, keyless):
    chat_name, _ = endpoints["ollama"]
    # the deploy-time check asked GET /models, without a key either
    assert keyless.model_requests and all("Authorization" not in q["headers"] for q in keyless.model_requests)
    r = client.post("/chat", json={"chat_name": chat_name, "content": "hi"})
    assert r.status_code == 200 and r.get_json()["output"] == "echo: hi" and r.get_json()["provider"] == "ollama"
    keyless.script("", Reply(pieces=["Hel", "lo"]))
    r = client.post("/chat", json={"chat_name": chat_name, "content": "x", "stream": True}, buffered=False)
    try:
        text = r.get_data(as_text=True)
        assert r.status_code == 200 and "Hel" in text and "lo" in text
    finally:
        r.close()
    assert len(keyless.requests) == 2 and all("Authorization" not in q["headers"] for q in keyless.requests)
    assert [q["json"]["stream"] for q in keyless.requests if "stream" in q["json"]] == [True]


def test_deepseek_402_is_a_quota_error_named_deepseek_and_never_shows_the_key(client, endpoints, fake_openai):
    chat_name, key = endpoints["deepseek"]
    fake_openai.script(key, openai_error(402, f"Insufficient Balance ({key})", "unknown_error", "invalid_request_error"))
    r = client.post("/chat", json={"chat_name": chat_name, "content": "hi"})
    err = r.get_json()["error"]
    assert r.status_code == 502 and err["type"] == "upstream_quota" and err["provider"] == "deepseek"
    assert err["upstream_status"] == 402 and "Insufficient Balance" in err["message"]
    listing = client.get(f"/deployments/{chat_name}")
    for text in (r.get_data(as_text=True), json.dumps(dict(r.headers)), listing.get_data(as_text=True)):
        assert key not in text and key[5:20] not in text


def test_moonshot_tells_a_spent_quota_from_a_rate_limit_by_its_error_type(client, endpoints, fake_openai):
    chat_name, key = endpoints["moonshot"]
    fake_openai.script(key, openai_error(429, "Your account is suspended, please check your plan and billing details",
                                         "exceeded_current_quota_error", None),
                       openai_error(429, "rate limit reached", "rate_limit_reached_error", None, {"retry-after": "3"}))
    r = client.post("/chat", json={"chat_name": chat_name, "content": "hi"})
    err = r.get_json()["error"]
    assert r.status_code == 502 and err["type"] == "upstream_quota" and err["provider"] == "moonshot"
    assert err["provider_code"] == "exceeded_current_quota_error"
    r = client.post("/chat", json={"chat_name": chat_name, "content": "hi"})
    err = r.get_json()["error"]
    assert r.status_code == 429 and err["type"] == "upstream_rate_limited" and r.headers["Retry-After"] == "3"
    assert key not in r.get_data(as_text=True)


def test_ark_codes_decide_before_the_status(fake_openai):
    """Ark's adapter in this process: an overdue account is a 403 but a quota, not a wrong key."""
    provider, key = providers.get("ark"), f"ark-{uuid.uuid4().hex}"
    spec = provider.spec_class.model_validate({"chat_name": "ark", "model_name": "ep-20250101-x", "api_key": key,
                                               "base_url": fake_openai.base_url})

    def ark_error(status, code):
        return Reply(status, {"error": {"code": code, "message": code, "param": "", "type": "x"}})

    cases = [(403, "AccountOverdueError", "upstream_quota"), (429, "QuotaExceeded", "upstream_quota"),
             (400, "OutputTextSensitiveContentDetected", "content_filter"),
             (429, "RateLimitExceeded.EndpointRPMExceeded", "upstream_rate_limited"),
             (403, "AccessDenied", "upstream_auth")]
    fake_openai.script(key, *(ark_error(status, code) for status, code, _ in cases))

    async def calls():
        adapter, kinds = provider.create_adapter(spec), []
        try:
            for _ in cases:
                with pytest.raises(GatewayError) as exc:
                    await adapter.chat(ChatCall(request_id="r", messages=[Message(role="user", content="hi")]))
                kinds.append((exc.value.info.type, exc.value.info.provider))
        finally:
            await adapter.aclose()
        return kinds

    assert asyncio.run(calls()) == [(kind, "ark") for _, _, kind in cases]
