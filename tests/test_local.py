"""Local model replicas: the transformers engine end to end under real Ray Serve.

A tiny random-weight Llama is built on the fly (``tests/tiny_model.py``); what the
gateway answers is compared with what transformers answers for the same model loaded
here, greedily. Deploy states (DEPLOYING -> RUNNING, DEPLOY_FAILED with a reason) and
every failure that needs no GPU are produced for real.
"""
from __future__ import annotations

import json
import time

import pytest
from ray import serve

from gateway import Settings, create_app
from tests.test_resilience import sse_events

pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tests.tiny_model import build

    return build(tmp_path_factory.mktemp("models") / "tiny-chat")


@pytest.fixture(scope="module")
def impatient(ray_head, app):
    """A gateway that waits 0.1 s for a deploy: loading a model answers 202 DEPLOYING."""
    return create_app(Settings.from_env(ray_address=ray_head.address, deploy_wait_s=0.1, cooldown_s=0)).test_client()


def wait_status(client, chat_name: str, wanted: set, limit: float = 180) -> dict:
    deadline = time.monotonic() + limit
    seen = []
    while time.monotonic() < deadline:
        r = client.get(f"/deployments/{chat_name}")
        view = r.get_json() if r.status_code == 200 else {"status": r.status_code}
        if not seen or seen[-1] != view["status"]:
            seen.append(view["status"])
        if view["status"] in wanted:
            view["seen"] = seen
            return view
        time.sleep(0.25)
    raise AssertionError(f"{chat_name} never reached {wanted}: {seen}")


def app_gone(chat_name: str, limit: float = 60) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if chat_name not in serve.status().applications:
            return True
        time.sleep(0.25)
    return False


def test_a_local_model_deploys_in_the_background_then_answers_like_transformers(client, impatient, tiny_model, name):
    from tests.tiny_model import greedy

    chat_name = name("hf")
    r = impatient.post("/hf/deploy", json={"chat_name": chat_name, "model_path": str(tiny_model), "workers": 1,
                                           "cpus_per_worker": 0.5, "model_type": "local/hf"})
    assert r.status_code == 202, r.get_json()
    body = r.get_json()
    assert body["status"] == "DEPLOYING" and body["model"] == "tiny-chat" and body["provider"] == "hf"
    assert r.headers["Location"] == f"/deployments/{chat_name}" and int(r.headers["Retry-After"]) >= 1
    try:
        # Meanwhile chat calls are told to come back, not left hanging.
        early = client.post("/chat", json={"chat_name": chat_name, "content": "hello"})
        if early.status_code != 200:  # (unless the model was already loaded)
            assert early.status_code == 503 and early.get_json()["error"]["type"] == "endpoint_not_ready"
            assert int(early.headers["Retry-After"]) >= 1 and "deploying" in early.get_json()["error"]["message"]
        view = wait_status(client, chat_name, {"RUNNING", "DEPLOY_FAILED"})
        assert view["status"] == "RUNNING", view
        assert view["seen"][0] in ("DEPLOYING", "RUNNING") and view["workers_running"] == 1
        assert view["provider"] == "hf" and view["model_path"] == str(tiny_model) and "progress" not in view

        # Legacy route: the reply text as a JSON string, the same text transformers gives.
        expected, prompt_tokens, completion_tokens = greedy(tiny_model, [{"role": "user", "content": "hello world"}], 12)
        expected = expected.rstrip("\ufffd")
        r = client.post("/hf/chat", json={"chat_name": chat_name, "content": "hello world", "temperature": 0, "max_tokens": 12})
        assert r.status_code == 200 and r.get_json() == expected

        # Unified route: usage counted by the replica's tokenizer.
        r = client.post("/chat", json={"chat_name": chat_name, "messages": [{"role": "user", "content": "hello world"}],
                                       "temperature": 0, "max_tokens": 12}).get_json()
        assert r["output"] == expected and r["provider"] == "hf" and r["model"] == "tiny-chat"
        assert r["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens}
        assert r["finish_reason"] == ("length" if completion_tokens == 12 else "stop")

        # Streaming (OpenAI rendering): the deltas add up to the same text, usage last.
        r = client.post("/v1/chat/completions", json={
            "model": chat_name, "messages": [{"role": "user", "content": "hello world"}], "temperature": 0, "max_tokens": 12,
            "stream": True, "stream_options": {"include_usage": True}})
        assert r.status_code == 200 and r.mimetype == "text/event-stream"
        events = [data for _, data in sse_events(r.get_data(as_text=True))]
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert text == expected and len([c for c in chunks if c["choices"]]) >= 2
        assert chunks[-1]["usage"]["completion_tokens"] == completion_tokens

        # A stop string ends the answer before it, as providers do.
        if len(expected) >= 6 and expected[3:5].strip() and "\ufffd" not in expected[:5]:
            stop = expected[3:5]
            r = client.post("/chat", json={"chat_name": chat_name, "content": "hello world", "temperature": 0,
                                           "max_tokens": 12, "stop": [stop]}).get_json()
            assert r["output"] == expected[: expected.find(stop)] and r["finish_reason"] == "stop"

        # What a local model cannot do is a clear 400.
        r = client.post("/chat", json={"chat_name": chat_name, "content": "x", "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]})
        assert r.status_code == 400 and "tools" in r.get_json()["error"]["message"]
        r = client.post("/chat", json={"chat_name": chat_name, "content": "hello world " * 200, "max_tokens": 4})
        err = r.get_json()["error"]
        assert r.status_code == 400 and err["type"] == "invalid_request" and "context is 256 tokens" in err["message"]

        models = client.get("/v1/models").get_json()["data"]
        assert {"id": chat_name, "owned_by": "hf"}.items() <= next(m for m in models if m["id"] == chat_name).items()
    finally:
        assert client.post("/hf/undeploy", json={"chat_name": chat_name}).status_code == 200
    assert app_gone(chat_name) and client.get(f"/deployments/{chat_name}").status_code == 404


def test_a_missing_model_path_fails_the_deploy_with_its_reason_and_leaves_nothing(client, name):
    chat_name = name("hf_missing")
    r = client.post("/hf/deploy", json={"chat_name": chat_name, "model_path": "/nonexistent/models/Qwen2.5-7B",
                                        "cpus_per_worker": 0.5})
    assert r.status_code == 422, r.get_json()
    err = r.get_json()["error"]
    assert err["type"] == "deploy_failed" and err["reason"] == "model_not_found"
    assert "/nonexistent/models/Qwen2.5-7B" in err["message"] and "Traceback" not in err["message"]
    view = client.get(f"/deployments/{chat_name}").get_json()
    assert view["status"] == "DEPLOY_FAILED" and view["failure"]["reason"] == "model_not_found"
    assert app_gone(chat_name)  # nothing left in the cluster
    r = client.post("/chat", json={"chat_name": chat_name, "content": "hi"})
    assert r.status_code == 503 and "failed to deploy (model_not_found)" in r.get_json()["error"]["message"]
    assert client.post("/hf/undeploy", json={"chat_name": chat_name}).status_code == 200
    assert client.get(f"/deployments/{chat_name}").status_code == 404


def test_a_broken_model_folder_is_a_load_error(client, name, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{ not json")
    chat_name = name("hf_broken")
    r = client.post("/hf/deploy", json={"chat_name": chat_name, "model_path": str(folder), "cpus_per_worker": 0.5})
    assert r.status_code == 422 and r.get_json()["error"]["reason"] == "load_error", r.get_json()
    assert app_gone(chat_name)
    client.post("/hf/undeploy", json={"chat_name": chat_name})


def test_more_gpus_than_the_cluster_has_fails_at_once(client, name, tiny_model):
    chat_name = name("gpu")
    # (the second provider reuses the name of the first one's failed deploy: a failure holds no name)
    for provider, extra in (("hf", {"gpus_per_worker": 1}), ("vllm", {"workers": 2})):
        r = client.post(f"/{provider}/deploy", json={"chat_name": chat_name, "model_path": str(tiny_model), **extra})
        err = r.get_json()["error"]
        assert r.status_code == 422 and err["type"] == "deploy_failed" and err["reason"] == "insufficient_gpus", err
        assert "not enough GPUs" in err["message"]
        view = client.get(f"/deployments/{chat_name}").get_json()
        assert view["status"] == "DEPLOY_FAILED" and view["failure"]["reason"] == "insufficient_gpus"
        assert view["provider"] == provider and chat_name not in serve.status().applications
    assert client.post("/vllm/undeploy", json={"chat_name": chat_name}).status_code == 200
    assert client.get(f"/deployments/{chat_name}").status_code == 404


def test_local_deploy_fields_are_checked(client, name):
    cases = [
        ({"model_path": "/m", "api_key": "sk-x"}, "api_key"),
        ({"model_path": "/m", "dtype": "float77"}, "dtype"),
        ({"model_path": "https://example.com/model"}, "model_path"),
        ({"model_path": "/m", "gpus_per_worker": -1}, "gpus_per_worker"),
    ]
    for body, field in cases:
        r = client.post("/hf/deploy", json={"chat_name": name(), **body})
        assert r.status_code == 400 and field in r.get_json()["error"]["message"], (body, r.get_json())
    r = client.post("/vllm/deploy", json={"chat_name": name(), "model_path": "/m", "engine_args": {"max_model_len": 4}})
    assert r.status_code == 400 and "max_model_len" in r.get_json()["error"]["message"]
    r = client.post("/hf/deploy", json={"chat_name": name(), "model_path": "/m", "engine_args": {}})
    assert r.status_code == 400 and "engine_args" in r.get_json()["error"]["message"]  # vLLM-only


def test_a_deploy_that_outlives_its_deploy_timeout_is_failed_and_removed(client, impatient, tiny_model, name):
    chat_name = name("hf_slow")
    r = impatient.post("/hf/deploy", json={"chat_name": chat_name, "model_path": str(tiny_model), "cpus_per_worker": 0.5,
                                           "deploy_timeout": 0.5})
    assert r.status_code in (202, 422), r.get_json()
    view = wait_status(client, chat_name, {"DEPLOY_FAILED", "RUNNING"}, limit=60)
    if view["status"] == "RUNNING":  # loaded within half a second: nothing to observe on this machine
        client.post("/hf/undeploy", json={"chat_name": chat_name})
        pytest.skip("the tiny model loaded within the deploy_timeout")
    assert view["failure"]["reason"] == "timeout" and "deploy_timeout" in view["failure"]["message"]
    assert app_gone(chat_name)
    client.post("/hf/undeploy", json={"chat_name": chat_name})


def test_undeploy_cancels_a_deploy_under_way(client, impatient, tiny_model, name):
    chat_name = name("hf_cancel")
    r = impatient.post("/hf/deploy", json={"chat_name": chat_name, "model_path": str(tiny_model), "cpus_per_worker": 0.5})
    assert r.status_code in (200, 202)
    again = impatient.post("/hf/deploy", json={"chat_name": chat_name, "model_path": str(tiny_model), "cpus_per_worker": 0.5})
    assert again.status_code in (200, 202)  # the same deploy again reports on the one under way
    other = impatient.post("/hf/deploy", json={"chat_name": chat_name, "model_path": str(tiny_model), "cpus_per_worker": 0.25})
    assert other.status_code in (200, 202, 409)  # 409 while the first is still loading, else an update
    if other.status_code == 409:
        assert "still deploying" in other.get_json()["error"]["message"]
    assert client.post("/hf/undeploy", json={"chat_name": chat_name}).status_code == 200
    assert app_gone(chat_name) and client.get(f"/deployments/{chat_name}").status_code == 404
    time.sleep(1)  # the watcher thread notices and leaves nothing behind either
    assert client.get(f"/deployments/{chat_name}").status_code == 404
    assert json.dumps(client.get("/deployments").get_json()).count(chat_name) == 0
