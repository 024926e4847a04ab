"""The key is checked at deploy (``verify_key``) with each provider's free call, on fake servers.

OpenAI and Zhipu: ``GET {base_url}/models``; DashScope: ``GET {base_url}/models?page_no=1&page_size=1``
(``dashscope.Models.list``). Each through the provider's official SDK over a real socket.
"""
from __future__ import annotations

import json
import uuid

import pytest
from ray import serve

from providers.base import indefinite
from providers.keys import shown_url
from tests.fakes.upstreams import Reply

PROVIDERS = ("openai", "zhipu", "qwen")
MODEL_PATHS = {"openai": "/v1/models", "zhipu": "/api/paas/v4/models", "qwen": "/api/v1/models"}


def key_for(provider: str) -> str:
    """A key of the provider's form (Zhipu's is id.secret), different every call."""
    return f"{uuid.uuid4().hex[:12]}.{uuid.uuid4().hex}" if provider == "zhipu" else f"sk-{uuid.uuid4().hex}"


@pytest.fixture
def fakes(fake_openai, fake_zhipu, fake_dashscope):
    return {"openai": fake_openai, "zhipu": fake_zhipu, "qwen": fake_dashscope}


def assert_nothing_deployed(client, chat_name):
    assert client.get(f"/deployments/{chat_name}").status_code == 404
    assert chat_name not in serve.status().applications


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_rejected_key_fails_the_deploy_and_deploys_nothing(client, deploy, fakes, name, provider):
    fake, key, chat_name = fakes[provider], key_for(provider), name(f"badkey_{provider}")
    fake.reject(key)
    r = deploy(chat_name, key, provider=provider, base_url=fake.base_url)
    assert r.status_code == 400, r.get_json()
    err = r.get_json()["error"]
    assert err["type"] == "invalid_key" and err["upstream_status"] == 401 and err["fields"] == ["api_key"]
    assert "check that it is the right key" in err["message"] and "verify_key" not in err["message"]
    assert key not in r.get_data(as_text=True)
    assert_nothing_deployed(client, chat_name)
    checks = [q for q in fake.model_requests if q["headers"].get("Authorization") == f"Bearer {key}"]
    assert len(checks) == 1 and checks[0]["path"] == MODEL_PATHS[provider]  # one call, no retries
    assert not fake.requests_for(key)  # no chat call was made to check it


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_good_key_is_checked_and_deploys(shared_endpoint, provider):
    chat_name, key, fake = shared_endpoint(provider)  # deployed with the check on (the default)
    assert any(q["headers"].get("Authorization") == f"Bearer {key}" for q in fake.model_requests)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_verify_key_false_deploys_a_wrong_key_and_the_chat_says_what_to_do(client, deploy, fakes, name, provider):
    fake, key, chat_name = fakes[provider], key_for(provider), name(f"nocheck_{provider}")
    fake.reject(key)
    r = deploy(chat_name, key, provider=provider, base_url=fake.base_url, verify_key=False, max_retries=0)
    assert r.status_code == 200, r.get_json()
    assert key not in r.get_data(as_text=True)
    assert not [q for q in fake.model_requests if q["headers"].get("Authorization") == f"Bearer {key}"]
    r = client.post("/chat", json={"chat_name": chat_name, "content": "hi"})
    assert r.status_code == 502
    err = r.get_json()["error"]
    assert err["type"] == "upstream_auth" and err["message"].endswith("deploy it again with a valid key")
    assert key not in r.get_data(as_text=True)


def test_a_relay_without_get_models_is_told_to_set_verify_key_false(client, deploy, fake_openai, name):
    key, chat_name = key_for("openai"), name("noroute")
    fake_openai.script_models(key, Reply(404, "404: Not Found"))
    r = deploy(chat_name, key, base_url=fake_openai.base_url)
    assert r.status_code == 400, r.get_json()
    err = r.get_json()["error"]
    assert err["type"] == "invalid_request" and "verify_key: false" in err["message"]
    assert err["fields"] == ["base_url", "verify_key"]
    assert_nothing_deployed(client, chat_name)


@pytest.mark.parametrize("reply", [Reply(403, {"error": {"message": "Missing scopes: api.model.read", "type": "invalid_request_error",
                                                          "code": None}}), Reply(503, {"error": {"message": "overloaded"}})])
def test_a_check_that_cannot_tell_deploys_and_warns(client, deploy, fake_openai, name, caplog, reply):
    """403 (a key without the models permission, a blocked region) and 5xx say nothing about the key."""
    caplog.set_level("WARNING")
    key, chat_name = key_for("openai"), name("cannot_tell")
    fake_openai.script_models(key, reply)
    r = deploy(chat_name, key, base_url=fake_openai.base_url)
    assert r.status_code == 200, r.get_json()
    warned = [rec.getMessage() for rec in caplog.records if "could not be checked" in rec.getMessage()]
    assert warned and all(key not in w for w in warned)


def test_messages_show_the_base_url_without_its_secrets():
    """A relay's token in the base URL's user part or query stays out of a check's message."""
    assert shown_url("https://user:tok3n@relay.example:8443/v1?token=tok3n#x") == "https://relay.example:8443/v1"


def test_articles():
    assert [indefinite(p) for p in ("openai", "hf", "zhipu", "qwen", "vllm")] == [
        "an openai", "an hf", "a zhipu", "a qwen", "a vllm"]
