"""Deploy, chat, update, undeploy and list through real Ray Serve and the fake OpenAI upstream."""
from __future__ import annotations

import threading
import time

from ray import serve


def test_user_session_from_the_issue(client, deploy, fake_openai, name):
    chat_name = name("openai_chat")
    key = "sk-session-0001-abcd"
    r = client.post("/openai/deploy", json={
        "api_key": key, "chat_name": chat_name, "model_name": "gpt-4o-mini",
        "model_type": "saas/openai", "http_proxy": fake_openai.base_url, "workers": 4,
    })
    try:
        assert r.status_code == 200, r.get_json()
        # a deploy's seconds are not the gateway's overhead on a call: only chat routes carry that header
        assert "X-Gateway-Overhead-Ms" not in r.headers and r.headers["X-Request-Id"]
        assert r.get_json() == {"ret": "ok", "chat_name": chat_name, "provider": "openai",
                                "model": "gpt-4o-mini", "workers": 4, "status": "RUNNING"}
        app = serve.status().applications[chat_name]
        assert list(app.deployments) == ["openai"]
        assert app.deployments["openai"].replica_states.get("RUNNING") == 4

        r = client.post("/openai/chat", json={"chat_name": chat_name, "content": "你好，你是谁"})
        assert r.status_code == 200
        assert r.get_json() == "echo: 你好，你是谁"
        assert float(r.headers["X-Gateway-Overhead-Ms"]) >= 0
        assert "你好" in r.get_data(as_text=True)  # UTF-8 as written, not \\u escapes

        r = client.post("/chat", json={
            "chat_name": chat_name,
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
            "temperature": 0.2, "max_tokens": 64,
        })
        body = r.get_json()
        assert r.status_code == 200, body
        assert list(body) == ["chat_name", "provider", "model", "output", "finish_reason", "usage",
                              "attempts", "latency_ms", "request_id", "served_by", "tried"]
        assert body["served_by"] == chat_name and body["tried"] == []
        assert body["chat_name"] == chat_name and body["provider"] == "openai" and body["model"] == "gpt-4o-mini"
        assert body["output"] == "echo: hi" and body["finish_reason"] == "stop" and body["attempts"] == 1
        assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
        assert body["request_id"] == r.headers["X-Request-Id"] and body["latency_ms"] > 0
        assert float(r.headers["X-Gateway-Overhead-Ms"]) >= 0

        sent = fake_openai.requests_for(key)[-1]
        assert sent["path"] == "/v1/chat/completions"
        assert sent["json"] == {
            "model": "gpt-4o-mini",
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
            "temperature": 0.2, "max_tokens": 64,
        }
        assert sent["headers"]["x-stainless-retry-count"] == "0"
        assert sent["headers"]["X-Request-ID"] == body["request_id"]  # the id reaches the provider
    finally:
        client.post("/openai/undeploy", json={"chat_name": chat_name})


def test_params_reach_the_provider_under_their_names(client, deploy, fake_openai, name):
    chat_name, key = name(), "sk-params-0002-abcd"
    assert deploy(chat_name, key).status_code == 200
    r = client.post("/chat", json={"chat_name": chat_name, "content": "x", "temperature": 0,
                                   "top_p": 0.5, "max_tokens": 5, "stop": ["\n", "END"]})
    assert r.status_code == 200
    sent = fake_openai.requests_for(key)[-1]["json"]
    assert sent["temperature"] == 0 and sent["top_p"] == 0.5 and sent["max_tokens"] == 5
    assert sent["stop"] == ["\n", "END"]
    assert "seed" not in sent and "stream" not in sent  # nothing the caller did not send


def test_listing_shows_state_and_never_the_key(client, deploy, fake_openai, name):
    chat_name, key = name(), "sk-listing-0003-zz99"
    assert deploy(chat_name, key, workers=2, timeout=30).status_code == 200
    rows = {d["chat_name"]: d for d in client.get("/deployments").get_json()["deployments"]}
    row = rows[chat_name]
    assert row["provider"] == "openai" and row["model"] == "gpt-4o-mini"
    assert row["base_url_host"] == "127.0.0.1"
    assert row["workers"] == 2 and row["workers_running"] == 2 and row["status"] == "RUNNING"
    assert row["key_fingerprint"] == "sk-...zz99" and row["timeout"] == 30
    assert row["created_at"] and row["updated_at"]
    assert client.get(f"/deployments/{chat_name}").get_json() == row
    assert key not in client.get("/deployments").get_data(as_text=True)


def test_undeploy_removes_the_endpoint(client, fake_openai, name):
    chat_name = name()
    r = client.post("/openai/deploy", json={"api_key": "sk-undeploy-0004", "chat_name": chat_name,
                                            "model_name": "m", "base_url": fake_openai.base_url})
    assert r.status_code == 200
    assert client.post("/chat", json={"chat_name": chat_name, "content": "hi"}).status_code == 200
    dispatcher = client.application.extensions["gateway"].dispatcher
    assert [k for k in dispatcher.cache.handles if k[0] == chat_name] == [(chat_name, "openai")]
    r = client.post("/openai/undeploy", json={"chat_name": chat_name})
    assert r.status_code == 200 and r.get_json()["status"] == "DELETED"
    assert chat_name not in serve.status().applications
    assert client.get(f"/deployments/{chat_name}").status_code == 404
    r = client.post("/chat", json={"chat_name": chat_name, "content": "hi"})
    assert r.status_code == 404 and r.get_json()["error"]["type"] == "not_found"
    # its router is shut down (a live one wakes the process's loop ten times a second)
    assert [k for k in dispatcher.cache.handles if k[0] == chat_name] == []


def test_redeploy_updates_in_place_without_a_gap(client, deploy, fake_openai, name):
    chat_name, old_key, new_key = name(), "sk-update-old-0005", "sk-update-new-0005"
    assert deploy(chat_name, old_key, workers=1).status_code == 200
    created = client.get(f"/deployments/{chat_name}").get_json()["created_at"]

    statuses, stop = [], threading.Event()

    def hammer():
        while not stop.is_set():
            statuses.append(client.post("/chat", json={"chat_name": chat_name, "content": "ping"}).status_code)

    worker = threading.Thread(target=hammer)
    worker.start()
    try:
        r = deploy(chat_name, new_key, model_name="gpt-4o", workers=2)
        assert r.status_code == 200 and r.get_json()["model"] == "gpt-4o" and r.get_json()["workers"] == 2
        for _ in range(5):  # a few more calls after the update settled
            statuses.append(client.post("/chat", json={"chat_name": chat_name, "content": "ping"}).status_code)
    finally:
        stop.set()
        worker.join()
    assert statuses and set(statuses) == {200}, statuses
    row = client.get(f"/deployments/{chat_name}").get_json()
    assert row["model"] == "gpt-4o" and row["workers_running"] == 2 and row["created_at"] == created
    assert fake_openai.requests_for(new_key)[-1]["json"]["model"] == "gpt-4o"
    assert row["key_fingerprint"] == "sk-...0005"


def test_same_name_under_another_provider_is_a_conflict(client, deploy, name):
    chat_name = name()
    assert deploy(chat_name, "sk-conflict-0006").status_code == 200
    r = deploy(chat_name, "sk-conflict-0006", provider="relay")
    assert r.status_code == 409
    err = r.get_json()["error"]
    assert err["type"] == "conflict" and "/openai/undeploy" in err["message"]
    assert client.get(f"/deployments/{chat_name}").get_json()["provider"] == "openai"


def test_provider_routes_only_answer_their_own_endpoints(client, deploy, name):
    chat_name = name()
    assert deploy(chat_name, "sk-relay-0007", provider="relay", model_type="saas/relay").status_code == 200
    r = client.post("/openai/chat", json={"chat_name": chat_name, "content": "hi"})
    assert r.status_code == 404
    assert "relay endpoint" in r.get_json()["error"]["message"] and "/relay/chat" in r.get_json()["error"]["message"]
    r = client.post("/openai/undeploy", json={"chat_name": chat_name})
    assert r.status_code == 404 and "/relay/undeploy" in r.get_json()["error"]["message"]
    assert client.post("/relay/chat", json={"chat_name": chat_name, "content": "hi"}).get_json() == "echo: hi"
    assert client.post("/chat", json={"chat_name": chat_name, "content": "hi"}).get_json()["provider"] == "relay"
    # The same model_type check per provider: openai's value is refused on /relay/deploy.
    r = client.post("/relay/deploy", json={"api_key": "k", "chat_name": name(), "model_name": "m", "model_type": "saas/openai"})
    assert r.status_code == 400 and "model_type" in r.get_json()["error"]["message"]


def test_a_deploy_the_cluster_can_never_place_fails_at_once_and_leaves_nothing(client, fake_openai, name):
    chat_name = name()
    r = client.post("/stuck/deploy", json={"api_key": "sk-stuck-0008", "chat_name": chat_name,
                                           "model_name": "m", "base_url": fake_openai.base_url, "timeout": 1})
    assert r.status_code == 422
    err = r.get_json()["error"]
    assert err["type"] == "deploy_failed" and err["reason"] == "insufficient_resources"
    assert "'no_such_node' resources" in err["message"] and chat_name in err["message"]
    # Nothing was started; the listing says why, and chat calls are told.
    assert chat_name not in serve.status().applications
    view = client.get(f"/deployments/{chat_name}").get_json()
    assert view["status"] == "DEPLOY_FAILED" and view["failure"]["reason"] == "insufficient_resources"
    r = client.post("/chat", json={"chat_name": chat_name, "content": "hi"})
    assert r.status_code == 503 and r.get_json()["error"]["type"] == "endpoint_not_ready"
    assert client.post("/stuck/undeploy", json={"chat_name": chat_name}).status_code == 200
    assert client.get(f"/deployments/{chat_name}").status_code == 404


def test_a_name_can_move_to_another_provider_after_undeploy(client, deploy, name):
    chat_name = name()
    assert deploy(chat_name, "sk-move-0009").status_code == 200
    assert client.post("/chat", json={"chat_name": chat_name, "content": "a"}).get_json()["provider"] == "openai"
    assert client.post("/openai/undeploy", json={"chat_name": chat_name}).status_code == 200
    assert deploy(chat_name, "sk-move-0009", provider="relay").status_code == 200
    r = client.post("/chat", json={"chat_name": chat_name, "content": "b"})
    assert r.status_code == 200 and r.get_json()["provider"] == "relay" and r.get_json()["output"] == "echo: b"


def test_the_overhead_header_of_a_stream_leaves_out_the_upstreams_time_to_first_token(client, shared_endpoint):
    """``X-Gateway-Overhead-Ms`` is the gateway's own time: on a stream, its time to the first
    byte less the upstream's time to the first event (here at least 1.5 s: the fake waits)."""
    from tests.fakes.upstreams import Reply

    chat_name, key, fake = shared_endpoint("openai")
    wait_ms = 1500
    for path, body in (("/chat", {"chat_name": chat_name, "content": "slow start", "stream": True}),
                       ("/v1/chat/completions", {"model": chat_name, "stream": True,
                                                 "messages": [{"role": "user", "content": "slow start"}]})):
        fake.script(key, Reply(delay=wait_ms / 1000))
        started = time.perf_counter()
        r = client.post(path, json=body, buffered=False)
        to_headers_ms = (time.perf_counter() - started) * 1000
        try:
            assert r.status_code == 200 and to_headers_ms >= wait_ms
            overhead = float(r.headers["X-Gateway-Overhead-Ms"])
            # (before: the header was the whole time to first byte, the upstream's 1.5 s included)
            assert 0 <= overhead <= to_headers_ms - wait_ms, (path, overhead, to_headers_ms)
            assert "[DONE]" in r.get_data(as_text=True)
        finally:
            r.close()


def test_providers_list_their_deploy_forms_and_rows_count_their_traffic(client, shared_endpoint):
    """What the console is built from: each provider's deploy schema, and each endpoint's traffic."""
    import providers
    from tests.fakes.upstreams import openai_error

    listed = {p["name"]: p for p in client.get("/providers").get_json()["providers"]}
    assert set(listed) == set(providers.names())
    schema = listed["openai"]["schema"]
    assert schema["properties"]["api_key"]["writeOnly"] is True and {"chat_name", "api_key"} <= set(schema["required"])
    assert "api_key" not in listed["ollama"]["schema"]["required"]  # a keyless server
    assert listed["hf"]["kind"] == "local" and "saas/openai" in listed["openai"]["model_types"]

    chat_name, key, fake = shared_endpoint("openai")

    def traffic() -> dict:
        return client.get(f"/deployments/{chat_name}").get_json()["traffic"]

    before = traffic()
    assert client.post("/chat", json={"chat_name": chat_name, "content": "one two"}).status_code == 200
    fake.script(key, openai_error(500, "The server had an error", "server_error", None))
    assert client.post("/chat", json={"chat_name": chat_name, "content": "three"}).status_code == 502
    after = traffic()
    assert after["requests"] - before["requests"] == 2 and after["errors"] - before["errors"] == 1
    assert after["prompt_tokens"] > before["prompt_tokens"] and after["completion_tokens"] > before["completion_tokens"]
    rows = {r["chat_name"]: r for r in client.get("/deployments").get_json()["deployments"]}
    assert rows[chat_name]["traffic"] == after


def test_with_grpc_off_calls_go_as_ray_actor_calls_and_answer_the_same(client, deploy, ray_head, name):
    """GATEWAY_SERVE_GRPC=0 (a cluster whose replicas' gRPC ports the gateway cannot reach): same answers."""
    from gateway import Settings, create_app

    chat_name = name()
    assert deploy(chat_name, "sk-grpc-off-0099").status_code == 200
    other = create_app(Settings.from_env(ray_address=ray_head.address, cooldown_s=0, serve_grpc=False))
    plain = other.test_client()
    assert plain.post("/chat", json={"chat_name": chat_name, "content": "hi"}).get_json()["output"] == "echo: hi"
    streamed = plain.post("/chat", json={"chat_name": chat_name, "content": "a b", "stream": True}).get_data(as_text=True)
    assert '"delta"' in streamed and '"finish_reason"' in streamed
    dispatcher = other.extensions["gateway"].dispatcher
    handles = dispatcher.loop.run(dispatcher.resolve(chat_name)).handle
    assert handles.chat.handle_options._by_reference is True  # (Ray actor calls, not gRPC)
    assert handles.stream.handle_options._by_reference is True
    dispatcher = client.application.extensions["gateway"].dispatcher
    default = dispatcher.loop.run(dispatcher.resolve(chat_name)).handle
    assert default.chat.handle_options._by_reference is False and default.stream.handle_options._by_reference is False
    assert default.chat.init_options._run_router_in_separate_loop is False  # (the router runs in the process's loop)


def test_a_deploy_asking_for_a_resource_no_node_has_is_refused_at_once(client, deploy, name):
    """``resources`` no live node carries would wait for ever: refused before anything starts, naming it."""
    chat_name = name()
    started = time.monotonic()
    r = deploy(chat_name, "sk-place-0010", resources={"node_b": 1})
    err = r.get_json()["error"]
    assert r.status_code == 422 and time.monotonic() - started < 10, err
    assert err["type"] == "deploy_failed" and err["reason"] == "insufficient_resources" and err["fields"] == ["resources"]
    assert "'node_b'" in err["message"] and "no live node has it" in err["message"] and "ray start --resources" in err["message"]
    assert chat_name not in serve.status().applications
    assert client.get(f"/deployments/{chat_name}").get_json()["status"] == "DEPLOY_FAILED"
    assert client.post("/openai/undeploy", json={"chat_name": chat_name}).status_code == 200


def test_workers_run_where_their_resources_are_and_the_listing_shows_their_nodes(client, deploy, fake_openai, ray_head, name):
    """Each worker asks Ray for the deploy's ``resources``; the listing shows every worker's node, and why
    workers are missing (here: a worker no node has room for)."""
    import ray
    from ray.serve.context import _get_global_client

    from gateway import Settings, create_app
    from tests.conftest import TEST_POOL

    chat_name = name()
    r = deploy(chat_name, "sk-place-0011", workers=2, resources={TEST_POOL: 1})
    assert r.status_code == 200, r.get_json()
    details = _get_global_client().get_serve_details()["applications"][chat_name]["deployments"]["openai"]
    assert details["deployment_config"]["ray_actor_options"]["resources"] == {TEST_POOL: 1.0}
    head = next(n for n in ray.nodes() if n["Alive"])
    row = {d["chat_name"]: d for d in client.get("/deployments").get_json()["deployments"]}[chat_name]
    assert row["status"] == "RUNNING" and row["resources"] == {TEST_POOL: 1.0} and "workers_missing" not in row
    assert row["replicas"] == [{"state": "RUNNING", "node_ip": "127.0.0.1", "node_id": head["NodeID"]}] * 2
    assert client.get(f"/deployments/{chat_name}").get_json()["replicas"] == row["replicas"]
    assert client.post("/chat", json={"chat_name": chat_name, "content": "hi"}).get_json()["output"] == "echo: hi"

    # 2 of the head's 4 are taken: a worker that needs 3 fits the cluster (not refused) but no node has room now
    impatient = create_app(Settings.from_env(ray_address=ray_head.address, cooldown_s=0, deploy_wait_s=1)).test_client()
    waiting = name()
    try:
        r = impatient.post("/openai/deploy", json={"api_key": "sk-place-0012", "chat_name": waiting, "model_name": "m",
                                                   "base_url": fake_openai.base_url, "resources": {TEST_POOL: 3},
                                                   # (Serve waits a replica's graceful shutdown, timeout + 5 s, even
                                                   # for one that never started: the undeploy below takes that long)
                                                   "timeout": 1})
        assert r.status_code == 202 and r.get_json()["status"] == "DEPLOYING", r.get_json()
        deadline = time.monotonic() + 15
        while True:
            view = client.get(f"/deployments/{waiting}").get_json()
            if "pending" in (view.get("workers_missing") or {}).get("why", "") or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert view["status"] == "DEPLOYING" and view["workers_running"] == 0, view
        assert view["workers_missing"]["count"] == 1 and view["workers_missing"]["why"].startswith(
            f"1 pending: no live node has the free resources each worker needs (custom resources: {TEST_POOL} 3)"), view
        assert view["replicas"] == [{"state": "STARTING", "node_ip": None, "node_id": None}]
    finally:
        assert client.post("/openai/undeploy", json={"chat_name": waiting}).status_code == 200
        # (the deploy's watcher, which answered 202, sees it gone and ends: never to poll a cluster torn down)
        for thread in threading.enumerate():
            if thread.name == f"deploy-{waiting}":
                thread.join(10)


def test_a_call_in_flight_when_its_endpoint_is_undeployed_still_gets_its_answer(client, deploy, fake_openai, name):
    """Undeploy stops replicas gracefully: a call a replica already took is answered, never cut off by the
    dispatcher's "no worker is running" answer (which is only for calls no replica took)."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.fakes.upstreams import Reply

    chat_name, key = name(), "sk-inflight-undeploy-0001"
    assert deploy(chat_name, key, max_retries=0).status_code == 200
    fake_openai.script(key, Reply(delay=5.0))
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.application.test_client().post, "/chat",
                              json={"chat_name": chat_name, "content": "slow"})
        def asked() -> bool:
            return any(r["path"].endswith("/chat/completions") for r in fake_openai.requests_for(key))

        deadline = time.monotonic() + 10
        while not asked() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert asked(), "the call never reached the upstream"
        assert client.post("/openai/undeploy", json={"chat_name": chat_name}).status_code == 200
        answer = pending.result(30)
    assert answer.status_code == 200 and answer.get_json()["output"] == "echo: slow", answer.get_json()
    assert client.post("/chat", json={"chat_name": chat_name, "content": "x"}).status_code == 404
