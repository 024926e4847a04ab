"""Local replicas on a GPU: vLLM, and transformers on CUDA. Skipped, and said so, without them.

On a GPU machine with the GPU requirements (``pip install -r requirements-gpu.txt``)::

    .venv/bin/python -m pytest tests/test_gpu.py -ra

``GATEWAY_TEST_MODEL=/models/Qwen2.5-0.5B-Instruct`` uses a real model instead of the
tiny random one built on the fly. ``deploy/smoke_local.py`` is the same check as a
command against a running gateway.
"""
from __future__ import annotations

import importlib.util
import os

import pytest

from tests.test_local import app_gone, wait_status

pytestmark = pytest.mark.gpu


def _gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


needs_gpu = pytest.mark.skipif(not _gpu(), reason="no CUDA GPU on this machine (the local-GPU path runs on GPU machines only)")
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed (pip install -r requirements-gpu.txt on a GPU machine)")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    if os.environ.get("GATEWAY_TEST_MODEL"):
        return os.environ["GATEWAY_TEST_MODEL"]
    from tests.tiny_model import build

    return str(build(tmp_path_factory.mktemp("models") / "tiny-chat"))


def _exercise(client, provider: str, chat_name: str, body: dict) -> None:
    r = client.post(f"/{provider}/deploy", json={"chat_name": chat_name, **body})
    assert r.status_code in (200, 202), r.get_json()
    try:
        view = wait_status(client, chat_name, {"RUNNING", "DEPLOY_FAILED"}, limit=900)
        assert view["status"] == "RUNNING", view
        request = {"chat_name": chat_name, "messages": [{"role": "user", "content": "hello world"}],
                   "temperature": 0, "max_tokens": 16}
        answer = client.post("/chat", json=request).get_json()
        usage = answer["usage"]
        assert answer["provider"] == provider and usage["prompt_tokens"] > 0
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] <= usage["prompt_tokens"] + 16
        streamed = client.post("/chat", json={**request, "stream": True}).get_data(as_text=True)
        assert "data: [DONE]" in streamed and '"usage"' in streamed
    finally:
        client.post(f"/{provider}/undeploy", json={"chat_name": chat_name})
    assert app_gone(chat_name)


@needs_gpu
@needs_vllm
def test_vllm_endpoint_on_one_gpu(client, name, model_path):
    _exercise(client, "vllm", name("vllm"), {"model_path": model_path, "gpus_per_worker": 1, "max_model_len": 256,
                                             "gpu_memory_utilization": 0.3, "engine_args": {"enforce_eager": True}})


@needs_gpu
@needs_vllm
def test_vllm_bad_engine_argument_is_a_deploy_failure(client, name, model_path):
    chat_name = name("vllm_bad")
    r = client.post("/vllm/deploy", json={"chat_name": chat_name, "model_path": model_path,
                                          "engine_args": {"no_such_engine_argument": 1}})
    assert r.status_code == 422 and r.get_json()["error"]["reason"] == "bad_engine_argument", r.get_json()
    assert app_gone(chat_name)
    client.post("/vllm/undeploy", json={"chat_name": chat_name})


@needs_gpu
def test_transformers_endpoint_on_a_gpu(client, name, model_path):
    _exercise(client, "hf", name("hf_gpu"), {"model_path": model_path, "gpus_per_worker": 1})
