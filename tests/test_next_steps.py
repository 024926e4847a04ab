"""Every error says what to do next: each error type, reached once, names a next step.

The walk covers every type of ``errors.STATUS`` that the Flask test client reaches cheaply
(the session cluster, one or two deploys on the fake upstream); ``SKIPPED`` names the
others and why. Each case checks its own fragments (the next step it must name), and every
message also matches one of ``NEXT_STEP`` (a route, a field, a setting, "did you mean" …).
"""
from __future__ import annotations

import re
import uuid

import pytest

from gateway import Settings, create_app
from contract.errors import STATUS

#: words that name a next step: a route, a header, a setting, a field to give or leave out, a retry
NEXT_STEP = re.compile(
    r"did you mean|use (POST|GET)|(GET|POST) /|try again|deploy it again|GATEWAY_[A-Z_]+|RAY_ADDRESS|"
    r"is required|leave it out|Authorization: Bearer|\bsend\b|see its log|\bforce\b|add it to|ask for"
)

#: types this walk does not reach, and why
SKIPPED = {
    "content_filter": "needs the upstream to refuse the content; its message is written in providers/",
    "upstream_bad_request": "needs an upstream 400; written in providers/",
    "upstream_auth": "needs a rejected key; its wording is changed with the deploy-time key check",
    "invalid_key": "the deploy-time key check's own type; its tests and wording come with that check",
    "upstream_quota": "needs an upstream quota answer; written in providers/",
    "upstream_rate_limited": "needs an upstream 429; written in providers/",
    "upstream_error": "needs an upstream failure; written in providers/",
    "upstream_timeout": "needs a hanging upstream (seconds of waiting)",
    "deploy_failed": "needs a model that fails to load (a self-hosted provider)",
    "endpoint_not_ready": "needs a deploy in progress or a cooldown (the session app has cooldowns off)",
    "endpoint_busy": "needs a hanging upstream holding every seat",
    "rate_limited": "needs a rate-limited client key and a call that spends it (tests/test_limits.py)",
    "budget_exceeded": "needs a budgeted client key and calls that spend it (tests/test_budgets.py checks its next step)",
    "server_busy": "answered by the worker's protocol past GATEWAY_MAX_CONNECTIONS (tests/test_slow_clients.py)",
    "header_too_large": "answered by the worker's protocol to an oversized head (tests/fast/test_server_protocol.py)",
    "request_timeout": "answered by the worker's protocol to a late head or a slow body "
                       "(tests/fast/test_server_protocol.py checks its next step; tests/test_slow_clients.py)",
}

_seen: set[str] = set()
_ran: set[str] = set()


@pytest.fixture(autouse=True)
def _count(request):
    _ran.add(request.node.nodeid)


def _error(r):
    body = r.get_json()
    err = body["error"]
    kind = err.get("gateway_type", err["type"])  # (the /v1/ routes answer in OpenAI's shape)
    assert STATUS[kind] == r.status_code, (kind, r.status_code)
    return kind, err["message"]


def _check(r, kind, *fragments):
    got, message = _error(r)
    assert got == kind, (got, message)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert NEXT_STEP.search(message), f"{kind}: no next step in {message!r}"
    _seen.add(kind)
    return message


_ADMIN = "admin-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def other_app(ray_head, tmp_path_factory):
    """An app with an admin token, scoped client keys, a small body limit and a route that fails."""
    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys.write_text("- {key: k-scoped, name: scoped-app, chat_names: [only_this_one]}\n")
    app = create_app(Settings.from_env(ray_address=ray_head.address, admin_token=_ADMIN,
                                       api_keys_file=str(keys), max_body_bytes=2048))

    @app.get("/_boom")
    def _boom():
        raise RuntimeError("a bug")

    return app.test_client()


def test_invalid_request_says_the_required_field_and_the_close_name(client):
    for path in ("/chat", "/openai/chat"):
        message = _check(client.post(path, json={"chat_name": "x", "message": "hi"}), "invalid_request",
                         "did you mean 'messages'", "content or messages is required")
        assert "Input should" not in message
    _check(client.post("/chat", json={"content": "hi"}), "invalid_request", "chat_name is required", "GET /v1/models")
    _check(client.post("/chat", json={"chat_name": "x"}), "invalid_request", "content or messages is required")
    _check(client.post("/chat", json={"chat_name": "x", "content": "a", "temprature": 1}), "invalid_request",
           "did you mean 'temperature'")
    _check(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}]}),
           "invalid_request", "model is required", "GET /v1/models")
    parts = [{"type": "image_url", "image_url": {"url": "http://x.example/a.png"}}]
    _check(client.post("/v1/chat/completions", json={"model": "x", "messages": [{"role": "user", "content": parts}]}),
           "invalid_request", "not supported by this gateway", "send text parts")
    r = client.post("/openai/deploy", json={"api_key": "sk-x", "chat_name": "a", "model_name": "m", "wokers": 2})
    _check(r, "invalid_request", "did you mean 'workers'")


@pytest.mark.parametrize("param, value, only", [("frequency_penalty", 0.5, "0"), ("presence_penalty", 1, "0"), ("n", 2, "1")])
def test_refused_parameters_say_not_supported(client, param, value, only):
    r = client.post("/v1/chat/completions", json={"model": "x", "messages": [{"role": "user", "content": "a"}], param: value})
    message = _check(r, "invalid_request", f"{param} is not supported by this gateway", f"send {only}")
    assert "Input should" not in message
    assert r.get_json()["error"]["param"] == param


def test_unknown_chat_name_names_the_close_deployed_one(client, deploy, name):
    real = name("nextsteps")
    r = deploy(real, "sk-" + uuid.uuid4().hex)
    assert r.status_code == 200, r.get_json()
    typo = real.replace("nextsteps", "nextstpes")
    for path in ("/chat", "/openai/chat"):
        _check(client.post(path, json={"chat_name": typo, "content": "hi"}), "not_found",
               f"did you mean '{real}'", "GET /deployments")
    r = client.post("/v1/chat/completions", json={"model": typo, "messages": [{"role": "user", "content": "hi"}]})
    _check(r, "not_found", f"did you mean '{real}'", "GET /v1/models")
    # far from every name: no guess, still the listing
    message = _check(client.post("/chat", json={"chat_name": "zzqqxx", "content": "hi"}), "not_found", "GET /deployments")
    assert "did you mean" not in message
    _check(client.get(f"/deployments/{typo}"), "not_found", "GET /deployments")
    _check(client.post("/openai/undeploy", json={"chat_name": typo}), "not_found", "GET /deployments")


def test_unknown_route_names_the_providers_or_the_routes(client):
    message = _check(client.post("/claude/deploy", json={}), "not_found", "no route POST /claude/deploy",
                     "the providers are", "openai")
    assert "zhipu" in message and "qwen" in message
    _check(client.post("/opneai/chat", json={}), "not_found", "did you mean POST /openai/chat")
    _check(client.get("/deployment"), "not_found", "did you mean /deployments", "POST /chat")


def test_wrong_method_says_which_to_use(client):
    _check(client.get("/chat"), "method_not_allowed", "GET is not allowed on /chat: use POST")
    _check(client.post("/deployments"), "method_not_allowed", "use GET")


def test_doors_say_which_setting_opens_them(client):
    _check(client.post("/chat", json={}, headers={"Host": "evil.example"}), "host_not_allowed", "GATEWAY_ALLOWED_HOSTS")
    _check(client.post("/chat", json={}, headers={"Origin": "http://evil.example"}), "origin_not_allowed",
           "GATEWAY_ALLOWED_ORIGINS")
    _check(client.post("/openai/deploy", data=b"{}", content_type="text/xml"), "unsupported_media_type",
           "application/json")


def test_conflict_says_how_to_go_on(client, deploy, name):
    primary, backup = name("ns_primary"), name("ns_backup")
    assert deploy(backup, "sk-" + uuid.uuid4().hex).status_code == 200
    assert deploy(primary, "sk-" + uuid.uuid4().hex, fallbacks=[backup]).status_code == 200
    _check(client.post("/openai/undeploy", json={"chat_name": backup}), "conflict", "force")


def test_other_app_errors(other_app):
    _check(other_app.get("/deployments"), "unauthorized", "Authorization: Bearer")
    _check(other_app.post("/chat", json={"chat_name": "x", "content": "a"}), "unauthorized", "Authorization: Bearer")
    r = other_app.post("/chat", json={"chat_name": "not_this_one", "content": "a"}, headers={"Authorization": "Bearer k-scoped"})
    _check(r, "forbidden", "only_this_one")
    r = other_app.post("/chat", data=b'{"chat_name": "x", "content": "' + b"a" * 5000 + b'"}',
                       content_type="application/json", headers={"Authorization": "Bearer k-scoped"})
    _check(r, "payload_too_large", "GATEWAY_MAX_BODY_BYTES")
    _check(other_app.get("/_boom", headers={"Authorization": f"Bearer {_ADMIN}"}), "internal_error", "see its log")


def test_unreachable_cluster_says_what_to_do(ray_head):
    from gateway.head import free_port

    down = create_app(Settings.from_env(ray_address=f"127.0.0.1:{free_port()}")).test_client()
    _check(down.post("/chat", json={"chat_name": "anything", "content": "hi"}), "cluster_unavailable", "try again")


def test_every_type_is_walked_or_skipped_for_a_reason(request):
    """Runs last in this module: every type was reached above, or is listed in SKIPPED."""
    mine = [i.nodeid for i in request.session.items if i.module is request.module]
    if set(mine) - _ran - {request.node.nodeid}:
        pytest.skip("only part of this module ran")
    assert set(SKIPPED) <= set(STATUS)
    assert not set(SKIPPED) & _seen, "a skipped type was reached: take it out of SKIPPED"
    missing = set(STATUS) - set(SKIPPED) - _seen
    assert not missing, f"error types neither walked nor skipped: {sorted(missing)}"
