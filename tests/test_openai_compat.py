"""The official ``openai`` SDK as the client of the gateway (served by gunicorn), one endpoint per provider."""
from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import openai
import pytest

from tests.fakes.upstreams import Reply, openai_error
from tests.procs import gunicorn_joined_to

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}


@pytest.fixture(scope="module")
def gateway(ray_head, tmp_path_factory, fake_openai, fake_zhipu, fake_dashscope):
    """gunicorn joined to the session cluster, with one endpoint per provider."""
    log_path = tmp_path_factory.mktemp("compat") / "gunicorn.log"
    runner = gunicorn_joined_to(ray_head.address, log_path, GATEWAY_COOLDOWN_S="0")  # errors are provoked on purpose
    base, _, _ = next(runner)
    endpoints = {}
    with httpx.Client(base_url=base, timeout=60) as http:
        for provider, fake in (("openai", fake_openai), ("zhipu", fake_zhipu), ("qwen", fake_dashscope)):
            name, key = f"v1_{provider}_{uuid.uuid4().hex[:6]}", f"{uuid.uuid4().hex[:8]}.{uuid.uuid4().hex}"
            r = http.post(f"/{provider}/deploy", json={"api_key": key, "chat_name": name, "model_name": f"{provider}-model",
                                                       "base_url": fake.base_url, "max_retries": 0})
            assert r.status_code == 200, r.text
            endpoints[provider] = (name, key, fake)
    yield base, endpoints
    with httpx.Client(base_url=base, timeout=60) as http:
        for provider, (name, _, _) in endpoints.items():
            http.post(f"/{provider}/undeploy", json={"chat_name": name, "force": True})
    runner.close()


@pytest.fixture(scope="module")
def sdk(gateway):
    base, _ = gateway
    return openai.OpenAI(base_url=base + "/v1", api_key="any-client-key", max_retries=0)


PROVIDERS = ["openai", "zhipu", "qwen"]


def test_models_list_and_retrieve(sdk, gateway):
    _, endpoints = gateway
    models = {m.id: m for m in sdk.models.list()}
    for provider, (name, _, _) in endpoints.items():
        assert models[name].owned_by == provider and models[name].object == "model"
        assert sdk.models.retrieve(name).id == name
    with pytest.raises(openai.NotFoundError) as exc:
        sdk.models.retrieve("no_such_model")
    assert exc.value.code == "model_not_found"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_completion_for_every_provider(sdk, gateway, provider):
    name, key, fake = gateway[1][provider]
    completion = sdk.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert completion.object == "chat.completion" and completion.model == name and completion.id.startswith("chatcmpl-")
    assert completion.choices[0].message.content == "echo: hi" and completion.choices[0].finish_reason == "stop"
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert completion._request_id  # X-Request-Id, as OpenAI clients read it


@pytest.mark.parametrize("provider", PROVIDERS)
def test_streaming_sees_exactly_the_upstream_text(sdk, gateway, provider):
    name, key, fake = gateway[1][provider]
    pieces = ["Hel", "lo, ", "wor", "ld", "! 你好"]
    fake.script(key, Reply(pieces=pieces))
    stream = sdk.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}], stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(pieces)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(pieces)


def test_async_client_with_and_without_streaming(gateway):
    base, endpoints = gateway
    name, _, _ = endpoints["openai"]

    async def run():
        async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="k", max_retries=0) as client:
            completion = await client.chat.completions.create(model=name, messages=[{"role": "user", "content": "a"}])
            stream = await client.chat.completions.create(model=name, messages=[{"role": "user", "content": "b c"}], stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            return completion.choices[0].message.content, text

    assert asyncio.run(run()) == ("echo: a", "echo: b c")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_tool_calls_round_trip(sdk, gateway, provider):
    name, key, fake = gateway[1][provider]
    messages = [{"role": "user", "content": "Beijing"}]
    first = sdk.chat.completions.create(model=name, messages=messages, tools=[WEATHER], tool_choice="auto")
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"q": "Beijing"}
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny, 25C"}]
    second = sdk.chat.completions.create(model=name, messages=messages, tools=[WEATHER])
    assert second.choices[0].message.content == "tool said: sunny, 25C"
    sent = fake.requests_for(key)[-1]["json"]
    history = sent["messages"] if provider != "qwen" else sent["input"]["messages"]
    tools = sent.get("tools") if provider != "qwen" else sent["parameters"]["tools"]
    assert tools[0]["function"]["name"] == "get_weather"
    assert history[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert history[2] == {"role": "tool", "tool_call_id": call.id, "content": "sunny, 25C"}


def test_parameters_reach_the_provider(sdk, gateway):
    name, key, fake = gateway[1]["openai"]
    sdk.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}], temperature=0.3, top_p=0.9,
                                max_completion_tokens=11, stop=["END"], seed=7, user="legacy-app-7",
                                response_format={"type": "json_object"})
    sent = fake.requests_for(key)[-1]["json"]
    assert {k: sent[k] for k in ("temperature", "top_p", "max_completion_tokens", "stop", "seed", "user", "response_format")} == {
        "temperature": 0.3, "top_p": 0.9, "max_completion_tokens": 11, "stop": ["END"], "seed": 7,
        "user": "legacy-app-7", "response_format": {"type": "json_object"}}
    name, key, fake = gateway[1]["zhipu"]
    sdk.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}], user="u1", max_tokens=3)
    sent = fake.requests_for(key)[-1]["json"]
    assert sent["user_id"] == "u1" and sent["max_tokens"] == 3


def test_error_classes(sdk, gateway):
    name, key, fake = gateway[1]["openai"]
    with pytest.raises(openai.NotFoundError) as exc:
        sdk.chat.completions.create(model="no_such_endpoint", messages=[{"role": "user", "content": "x"}])
    assert exc.value.code == "model_not_found" and exc.value.status_code == 404
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}], n=2)
    assert exc.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as exc:  # what a provider cannot do is refused, not dropped
        sdk.chat.completions.create(model=gateway[1]["qwen"][0], messages=[{"role": "user", "content": "x"}], user="u")
    assert "user" in exc.value.message
    fake.script(key, openai_error(429, "Rate limit reached", "requests", "rate_limit_exceeded", {"retry-after": "30"}))
    with pytest.raises(openai.RateLimitError) as exc:
        sdk.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}])
    assert exc.value.response.headers["retry-after"] == "30" and exc.value.code == "rate_limit_exceeded"
    fake.script(key, openai_error(401, "Incorrect API key provided", "invalid_request_error", "invalid_api_key"))
    with pytest.raises(openai.InternalServerError) as exc:  # the deployed key, not the caller's, was refused
        sdk.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}])
    assert exc.value.status_code == 502 and exc.value.body["gateway_type"] == "upstream_auth"
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(model=name, messages=[])


def test_a_stream_that_fails_mid_way_raises_in_the_sdk(sdk, gateway):
    name, key, fake = gateway[1]["openai"]
    fake.script(key, Reply(pieces=["a ", "b ", "c"], cut_after=2, piece_delay=0.2))  # sent, then cut
    stream = sdk.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}], stream=True)
    seen = []
    with pytest.raises(openai.APIError) as exc:
        for chunk in stream:
            if chunk.choices:
                seen.append(chunk.choices[0].delta.content or "")
    assert "".join(seen) == "a b " and "upstream" in str(exc.value.body)


def test_errors_on_v1_paths_no_route_matches_keep_openais_shape(client):
    """A misspelt /v1 path or a wrong method: routing failed, no blueprint serves it, the shape is still OpenAI's."""
    r = client.post("/v1/chat/completion", json={"model": "m", "messages": []})
    err = r.get_json()["error"]
    assert r.status_code == 404 and err["gateway_type"] == "not_found" and err["type"] == "invalid_request_error"
    assert "/v1/chat/completions" in err["message"]  # (did you mean ...)
    r = client.get("/v1/chat/completions")
    err = r.get_json()["error"]
    assert r.status_code == 405 and err["gateway_type"] == "method_not_allowed" and "POST" in err["message"]
    r = client.get("/v1x/models")  # not under /v1/: the gateway's own shape
    assert r.status_code == 404 and r.get_json()["error"]["type"] == "not_found"
