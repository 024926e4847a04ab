"""The provider registry: ``name -> Provider``.

Adding a provider is one module in this package plus its line in ``BUILTIN`` below;
the gateway derives its routes (``/<name>/deploy``, ``/<name>/chat``,
``/<name>/undeploy``) and its replicas from what is registered here.
"""
from __future__ import annotations

import importlib
import threading

from .base import ChatAdapter, DeploySpec, Provider, SaaSDeploySpec

#: the built-in providers, by name: ``"module:Class"``. A module is imported where it is
#: first used, so a replica loads only its own provider's SDK (memory per endpoint, start time).
BUILTIN: dict[str, str] = {
    "openai": "providers.openai_provider:OpenAIProvider",
    "zhipu": "providers.zhipu_provider:ZhipuProvider",
    "qwen": "providers.qwen_provider:QwenProvider",
    "hf": "providers.hf_provider:HFProvider",  # local models: transformers (CPU, or a GPU without vLLM)
    "vllm": "providers.vllm_provider:VLLMProvider",  # local models: vLLM on GPUs
}

_PROVIDERS: dict[str, Provider] = {}
_EXTRA: list[str] = []  # registered at run time (plugins, the test suite), in order
_lock = threading.Lock()


def register(provider: Provider) -> Provider:
    """Add a provider instance at run time (built-ins are listed in ``BUILTIN``)."""
    with _lock:
        if provider.name in _PROVIDERS or provider.name in BUILTIN:
            raise ValueError(f"provider {provider.name!r} is already registered")
        _PROVIDERS[provider.name] = provider
        _EXTRA.append(provider.name)
    return provider


def get(name: str) -> Provider:
    """The provider called ``name`` (its module imported on first use); ``KeyError`` if there is none."""
    provider = _PROVIDERS.get(name)
    if provider is not None:
        return provider
    module, _, cls = BUILTIN[name].partition(":")
    provider = getattr(importlib.import_module(module), cls)()
    with _lock:
        return _PROVIDERS.setdefault(name, provider)


def names() -> list[str]:
    return list(BUILTIN) + list(_EXTRA)


__all__ = ["BUILTIN", "ChatAdapter", "DeploySpec", "Provider", "SaaSDeploySpec", "get", "names", "register"]
