"""One real local Ray cluster and one fake OpenAI upstream for the whole session."""
from __future__ import annotations

import itertools
import os
import tempfile
import uuid

# Before anything imports ray: the session cluster runs with token authentication,
# and Ray reads the mode once per process.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.pop("RAY_ADDRESS", None)
# Ray's heads listen on loopback only: this process, and the gateways the tests start, must keep
# 127.0.0.1 as it is (see gateway.ray_switches.LOOPBACK_SWITCH), like the systemd units do.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# Canaries (tests/test_ray_doors.py), set before any head starts: secrets a gateway's environment
# holds must reach no Ray process; what GATEWAY_HEAD_ENV names must. No test reads these names.
os.environ["OPENAI_API_KEY"] = f"sk-canary-{uuid.uuid4().hex}"
os.environ["MY_LEGACY_APP_SECRET"] = f"canary-{uuid.uuid4().hex}"
os.environ["GATEWAY_TEST_CANARY_SECRET"] = f"canary-{uuid.uuid4().hex}"
os.environ["LLMGW_TEST_HEAD_EXTRA"] = f"extra-{uuid.uuid4().hex}"
os.environ["GATEWAY_HEAD_ENV"] = "LLMGW_TEST_HEAD_EXTRA"
# The limits keeper's ledger (client-key budgets, SQLite) of this session's clusters: in a directory of its
# own, never the operator's default (~/.local/state/llm_gateway)
os.environ["GATEWAY_STATE_DIR"] = tempfile.mkdtemp(prefix="llmgw-test-state-")

import pytest  # noqa: E402

from gateway import Settings, create_app  # noqa: E402
from gateway.head import EmbeddedHead, export_embedded_env, free_port
from tests.fakes.upstreams import FakeDashScope, FakeOpenAI, FakeZhipu
from tests.providers_for_tests import register_test_providers

_names = itertools.count()
#: a custom Ray resource the session's head carries 4 of (GATEWAY_RAY_RESOURCES)
TEST_POOL = "llmgw_test_pool"


@pytest.fixture(scope="session")
def ray_head():
    os.environ.pop("RAY_ADDRESS", None)
    settings = Settings.from_env(
        ray_port=free_port(), dashboard_port=free_port(), object_store_mb=100, ray_num_cpus=2,
        ray_resources={TEST_POOL: 4},  # (a custom resource, for deploys that pin workers with ``resources``)
    )
    head = EmbeddedHead(settings)
    export_embedded_env(head.start())
    yield head
    import ray

    ray.shutdown()
    head.stop()


@pytest.fixture(scope="session")
def fake_openai():
    fake = FakeOpenAI().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def fake_zhipu():
    fake = FakeZhipu().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def fake_dashscope():
    fake = FakeDashScope().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def app(ray_head):
    register_test_providers()
    # Cooldowns off for the shared app: error-mapping tests fail endpoints on purpose.
    app = create_app(Settings.from_env(ray_address=ray_head.address, deploy_wait_s=30, cooldown_s=0))
    # Connected now: tests that call Ray themselves (an actor's pid, a remote task) use this process's
    # connection, which no Ray call makes by itself (RAY_ENABLE_AUTO_CONNECT=0, gateway/__init__.py)
    app.extensions["gateway"].cluster.ensure_up()
    return app


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def name():
    """A fresh chat_name per call: tests never share endpoints."""
    return lambda prefix="ep": f"{prefix}_{os.getpid()}_{next(_names)}"


@pytest.fixture(scope="module")
def shared_endpoint(app, fake_openai, fake_zhipu, fake_dashscope):
    """One endpoint per provider for a whole module (deploys cost seconds): (chat_name, key, fake).

    No retries: these endpoints show how one upstream answer maps, not how it is retried.
    """
    client = app.test_client()
    fakes = {"openai": fake_openai, "zhipu": fake_zhipu, "qwen": fake_dashscope}
    made = {}

    def _get(provider):
        if provider not in made:
            chat_name = f"shared_{provider}_{os.getpid()}_{next(_names)}"
            key = f"{uuid.uuid4().hex[:8]}.{uuid.uuid4().hex}"
            r = client.post(f"/{provider}/deploy", json={"api_key": key, "chat_name": chat_name, "model_name": "m",
                                                         "base_url": fakes[provider].base_url, "max_retries": 0})
            assert r.status_code == 200, r.get_json()
            made[provider] = (chat_name, key, fakes[provider])
        return made[provider]

    yield _get
    for provider, (chat_name, _, _) in made.items():
        client.post(f"/{provider}/undeploy", json={"chat_name": chat_name, "force": True})


def key() -> str:
    """A fresh provider key for the fakes (they accept any)."""
    return f"{uuid.uuid4().hex[:8]}.{uuid.uuid4().hex}"


@pytest.fixture
def ep(deploy, name):
    """Deploy an endpoint (OpenAI on the fake by default); answers (chat_name, key)."""
    def _make(provider="openai", base_url=None, **fields):
        k, chat_name = key(), name(provider)
        r = deploy(chat_name, k, provider=provider, **({"base_url": base_url} if base_url else {}), **fields)
        assert r.status_code == 200, r.get_json()
        return chat_name, k
    return _make


@pytest.fixture
def deploy(client, fake_openai):
    """Deploy an endpoint on the fake upstream; undeploy it after the test."""
    made = []

    def _deploy(chat_name, key, provider="openai", **fields):
        body = {"api_key": key, "chat_name": chat_name, "model_name": "gpt-4o-mini",
                "base_url": fake_openai.base_url, **fields}
        r = client.post(f"/{provider}/deploy", json=body)
        if r.status_code == 200:
            made.append((provider, chat_name))
        return r

    yield _deploy
    for provider, chat_name in made:  # (force: fallbacks among them go too)
        client.post(f"/{provider}/undeploy", json={"chat_name": chat_name, "force": True})


def pytest_ignore_collect(collection_path, config):
    """``pytest -m fast`` imports only tests/fast: the other modules hold no fast test, and importing them takes seconds."""
    from pathlib import Path

    if config.getoption("markexpr", "") == "fast" and collection_path.suffix == ".py" \
            and Path(__file__).parent / "fast" not in collection_path.parents:
        return True
    return None
