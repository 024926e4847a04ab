"""Zhipu and Qwen endpoints through their official SDKs, inside real replicas, on fake servers."""
from __future__ import annotations

import uuid

import pytest

from tests.fakes.upstreams import FakeDashScope, Reply, dashscope_error, zhipu_error


def zkey() -> str:
    return f"{uuid.uuid4().hex[:12]}.{uuid.uuid4().hex}"


def qkey() -> str:
    return f"sk-{uuid.uuid4().hex}"


@pytest.fixture
def zhipu_endpoint(deploy, fake_zhipu, name):
    def _make(key=None, **fields):
        key = key or zkey()
        chat_name = name("zhipu")
        r = deploy(chat_name, key, provider="zhipu", base_url=fake_zhipu.base_url, model_name="glm-4", **fields)
        assert r.status_code == 200, r.get_json()
        return chat_name, key
    return _make


@pytest.fixture
def qwen_endpoint(deploy, fake_dashscope, name):
    def _make(key=None, base_url=None, **fields):
        key = key or qkey()
        chat_name = name("qwen")
        r = deploy(chat_name, key, provider="qwen", base_url=base_url or fake_dashscope.base_url,
                   model_name="qwen-turbo", **fields)
        assert r.status_code == 200, r.get_json()
        return chat_name, key
    return _make


def test_zhipu_session_from_the_issue(client, zhipu_endpoint, fake_zhipu):
    chat_name, key = zhipu_endpoint(model_type="saas/zhipu", workers=2)
    r = client.post("/zhipu/chat", json={"chat_name": chat_name, "content": "你好，你是谁"})
    assert r.status_code == 200 and r.get_json() == "echo: 你好，你是谁"
    body = client.post("/chat", json={"chat_name": chat_name, "content": "hi"}).get_json()
    assert body["provider"] == "zhipu" and body["model"] == "glm-4"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    sent = fake_zhipu.requests_for(key)[-1]
    assert sent["path"] == "/api/paas/v4/chat/completions"
    assert sent["headers"]["Authorization"] == f"Bearer {key}"  # the raw id.secret key, no JWT
    assert sent["json"]["model"] == "glm-4" and sent["json"]["request_id"] == body["request_id"]


def test_zhipu_parameters_at_the_edges(client, zhipu_endpoint, fake_zhipu):
    chat_name, key = zhipu_endpoint()
    client.post("/chat", json={"chat_name": chat_name, "content": "a", "temperature": 0, "top_p": 1,
                               "max_tokens": 7, "stop": "END"})
    sent = fake_zhipu.requests_for(key)[-1]["json"]
    assert sent["temperature"] == 0.01 and sent["do_sample"] is False  # greedy
    assert sent["top_p"] == 0.99 and sent["max_tokens"] == 7 and sent["stop"] == ["END"]
    client.post("/chat", json={"chat_name": chat_name, "content": "a", "temperature": 1.7})
    assert fake_zhipu.requests_for(key)[-1]["json"]["temperature"] == 0.99  # capped at 1, sent as 0.99


def test_zhipu_key_must_look_like_id_dot_secret(client, fake_zhipu):
    r = client.post("/zhipu/deploy", json={"api_key": "sk-not-zhipu", "chat_name": "z_bad", "model_name": "glm-4"})
    assert r.status_code == 400 and "id.secret" in r.get_json()["error"]["message"]
    assert "sk-not-zhipu" not in r.get_data(as_text=True)


ZHIPU_CASES = [
    *[pytest.param(zhipu_error(401, str(c), "Authorization Token非法，请确认Authorization Token正确传递。"), 502,
                   "upstream_auth", id=f"zhipu-{c}") for c in range(1000, 1005)],
    pytest.param(zhipu_error(429, "1113", "余额不足或无可用资源包，请充值后重试。"), 502, "upstream_quota", id="zhipu-1113"),
    pytest.param(zhipu_error(429, "1302", "您当前使用该API的并发数过高，请降低并发，或联系客服增加限额。"), 429,
                 "upstream_rate_limited", id="zhipu-1302"),
    pytest.param(zhipu_error(429, "1303", "您当前使用该API的频率过高，请降低频率，或联系客服增加限额。"), 429,
                 "upstream_rate_limited", id="zhipu-1303"),
    pytest.param(zhipu_error(429, "1305", "当前API请求过多，请稍后重试。"), 429, "upstream_rate_limited", id="zhipu-1305"),
    pytest.param(zhipu_error(400, "1301", "系统检测到输入或生成内容可能包含不安全或敏感内容",
                             content_filter=[{"level": 1, "role": "assistant"}]), 400, "content_filter", id="zhipu-1301"),
    pytest.param(zhipu_error(400, "1211", "模型不存在，请检查模型代码。"), 400, "upstream_bad_request", id="zhipu-1211"),
    pytest.param(zhipu_error(500, "9999", "something new"), 502, "upstream_error", id="zhipu-unknown"),
]


@pytest.mark.parametrize("reply, status, kind", ZHIPU_CASES)
def test_zhipu_error_codes(client, shared_endpoint, reply, status, kind):
    chat_name, key, fake_zhipu = shared_endpoint("zhipu")
    before = len(fake_zhipu.requests_for(key))
    fake_zhipu.script(key, reply)
    r = client.post("/chat", json={"chat_name": chat_name, "content": "hi"})
    assert r.status_code == status, r.get_json()
    err = r.get_json()["error"]
    assert err["type"] == kind and err["provider"] == "zhipu"
    assert err["provider_code"] == reply.body["error"]["code"] and err["upstream_status"] == reply.status
    assert reply.body["error"]["message"] in err["message"]
    if kind == "content_filter":
        assert "content filter" in err["message"]
    assert len(fake_zhipu.requests_for(key)) == before + 1  # the SDK's own retries are off (it retries 429s 3 times)


def test_qwen_session_and_its_byzer_model_type(client, qwen_endpoint, fake_dashscope):
    chat_name, key = qwen_endpoint(model_type="saas/qianwen", workers=2)
    r = client.post("/qwen/chat", json={"chat_name": chat_name, "content": "你好，你是谁"})
    assert r.status_code == 200 and r.get_json() == "echo: 你好，你是谁"
    body = client.post("/chat", json={"chat_name": chat_name, "content": "hi", "temperature": 2, "top_p": 0.8,
                                      "max_tokens": 9, "stop": ["。"]}).get_json()
    assert body["provider"] == "qwen"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}  # from input/output_tokens
    sent = fake_dashscope.requests_for(key)[-1]
    assert sent["path"] == "/api/v1/services/aigc/text-generation/generation"
    assert sent["json"]["model"] == "qwen-turbo"
    assert sent["json"]["input"]["messages"] == [{"role": "user", "content": "hi"}]
    assert sent["json"]["parameters"] == {"temperature": 1.99, "top_p": 0.8, "max_tokens": 9, "stop": ["。"],
                                          "result_format": "message"}
    assert sent["headers"]["X-Request-Id"] == body["request_id"]


def test_qwen_refuses_a_per_endpoint_proxy(client):
    r = client.post("/qwen/deploy", json={"api_key": "sk-q", "chat_name": "q_proxy", "model_name": "qwen-turbo",
                                          "proxy": "http://proxy.example:3128"})
    assert r.status_code == 400 and "HTTPS_PROXY" in r.get_json()["error"]["message"]


QWEN_CASES = [
    pytest.param(dashscope_error(401, "InvalidApiKey", "Invalid API-key provided."), 502, "upstream_auth", id="qwen-key"),
    pytest.param(dashscope_error(400, "Arrearage", "Access denied, please make sure your account is in good standing."),
                 502, "upstream_quota", id="qwen-arrearage"),
    pytest.param(dashscope_error(429, "Throttling", "Requests throttling triggered."), 429, "upstream_rate_limited",
                 id="qwen-throttling"),
    pytest.param(dashscope_error(429, "Throttling.RateQuota", "Requests rate limit exceeded, please try again later."),
                 429, "upstream_rate_limited", id="qwen-ratequota"),
    pytest.param(dashscope_error(429, "Throttling.AllocationQuota", "Allocated quota exceeded, please increase your quota limit."),
                 429, "upstream_rate_limited", id="qwen-allocation"),
    pytest.param(dashscope_error(400, "DataInspectionFailed", "Input data may contain inappropriate content."), 400,
                 "content_filter", id="qwen-inspection"),
    pytest.param(dashscope_error(400, "InvalidParameter", "Required parameter(s) missing or invalid."), 400,
                 "upstream_bad_request", id="qwen-param"),
    pytest.param(dashscope_error(500, "InternalError", "An internal error has occured, please try again later."), 502,
                 "upstream_error", id="qwen-internal"),
    pytest.param(dashscope_error(503, "ModelUnavailable", "Model is unavailable, please try again later."), 502,
                 "upstream_error", id="qwen-503"),
    pytest.param(dashscope_error(418, "BrandNewCode", "never seen before"), 502, "upstream_error", id="qwen-unknown"),
]


@pytest.mark.parametrize("reply, status, kind", QWEN_CASES)
def test_qwen_error_codes(client, shared_endpoint, reply, status, kind):
    chat_name, key, fake_dashscope = shared_endpoint("qwen")
    before = len(fake_dashscope.requests_for(key))
    fake_dashscope.script(key, reply)
    r = client.post("/chat", json={"chat_name": chat_name, "content": "hi"})
    assert r.status_code == status, r.get_json()
    err = r.get_json()["error"]
    assert err["type"] == kind and err["provider"] == "qwen"
    assert err["provider_code"] == reply.body["code"] and err["upstream_status"] == reply.status
    assert err["provider_request_id"] == reply.body["request_id"]
    assert reply.body["message"] in err["message"]
    assert len(fake_dashscope.requests_for(key)) == before + 1


def test_two_qwen_endpoints_never_cross(client, qwen_endpoint):
    a, b = FakeDashScope().start(), FakeDashScope().start()
    try:
        name_a, key_a = qwen_endpoint(base_url=a.base_url)
        name_b, key_b = qwen_endpoint(base_url=b.base_url)
        for i in range(6):
            for chat_name in (name_a, name_b):
                r = client.post("/chat", json={"chat_name": chat_name, "content": f"m{i}"})
                assert r.status_code == 200 and r.get_json()["output"] == f"echo: m{i}"
        assert a.keys_seen() == {key_a} and b.keys_seen() == {key_b}
        assert len(a.requests) == len(b.requests) == 6
    finally:
        a.stop()
        b.stop()


def test_zhipu_and_qwen_time_out_at_the_deadline(client, zhipu_endpoint, qwen_endpoint, fake_zhipu, fake_dashscope):
    for (chat_name, key), fake in ((zhipu_endpoint(timeout=1), fake_zhipu), (qwen_endpoint(timeout=1), fake_dashscope)):
        fake.script(key, Reply(delay=3))
        r = client.post("/chat", json={"chat_name": chat_name, "content": "hi"})
        assert r.status_code == 504 and r.get_json()["error"]["type"] == "upstream_timeout", r.get_json()
