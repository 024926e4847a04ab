"""The provider registry: ``name -> Provider``.

Adding a provider is one module in this package plus its line in ``BUILTIN`` below; a provider
that speaks OpenAI's wire is only a configuration (``providers/openai_compatible.py``) plus its line.
The gateway derives its routes (``/<name>/deploy``, ``/<name>/chat``,
``/<name>/undeploy``) and its replicas from what is registered here.
"""
from __future__ import annotations

import importlib
import threading

from .base import ChatAdapter, Provider
from .specs import DeploySpec, SaaSDeploySpec

#: the built-in providers, by name: ``"module:Class"`` (a ``Provider`` subclass) or ``"module:CONFIG"``
#: (a configuration with ``provider()``, e.g. an ``OpenAIWire``). A module is imported where it is
#: first used, so a replica loads only its own provider's SDK (memory per endpoint, start time).
BUILTIN: dict[str, str] = {
    "openai": "providers.openai_provider:OpenAIProvider",
    "zhipu": "providers.zhipu_provider:ZhipuProvider",
    "qwen": "providers.qwen_provider:QwenProvider",
    "hf": "providers.hf_provider:HFProvider",  # local models: transformers (CPU, or a GPU without vLLM)
    "vllm": "providers.vllm_provider:VLLMProvider",  # local models: vLLM on GPUs
    # OpenAI's wire, as configurations: hosted ones, then servers our users run (base_url required)
    "deepseek": "providers.openai_compatible:DEEPSEEK",
    "moonshot": "providers.openai_compatible:MOONSHOT",
    "ark": "providers.openai_compatible:ARK",  # Volcengine Ark (Doubao)
    "ollama": "providers.openai_compatible:OLLAMA",
    "xinference": "providers.openai_compatible:XINFERENCE",
    "fastchat": "providers.openai_compatible:FASTCHAT",
    "vllm_openai": "providers.openai_compatible:VLLM_OPENAI",  # a vLLM server outside the cluster
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
    module, _, attr = BUILTIN[name].partition(":")
    target = getattr(importlib.import_module(module), attr)
    provider = target() if isinstance(target, type) else target.provider()
    if provider.name != name:
        raise ValueError(f"BUILTIN[{name!r}] names {BUILTIN[name]}, whose provider is called {provider.name!r}")
    with _lock:
        return _PROVIDERS.setdefault(name, provider)


def names() -> list[str]:
    return list(BUILTIN) + list(_EXTRA)


__all__ = ["BUILTIN", "ChatAdapter", "DeploySpec", "Provider", "SaaSDeploySpec", "get", "names", "register"]
