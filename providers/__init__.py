"""The provider registry: ``name -> Provider``.

Adding a provider is one module in this package plus one ``register`` line below;
the gateway derives its routes (``/<name>/deploy``, ``/<name>/chat``,
``/<name>/undeploy``) and its replicas from what is registered here.
"""
from __future__ import annotations

from .base import ChatAdapter, DeploySpec, Provider, SaaSDeploySpec

_PROVIDERS: dict[str, Provider] = {}


def register(provider: Provider) -> Provider:
    if provider.name in _PROVIDERS:
        raise ValueError(f"provider {provider.name!r} is already registered")
    _PROVIDERS[provider.name] = provider
    return provider


def get(name: str) -> Provider:
    """The provider called ``name``; ``KeyError`` if there is none."""
    return _PROVIDERS[name]


def names() -> list[str]:
    return list(_PROVIDERS)


# -- registrations -----------------------------------------------------------
from .hf_provider import HFProvider  # noqa: E402
from .openai_provider import OpenAIProvider  # noqa: E402
from .qwen_provider import QwenProvider  # noqa: E402
from .vllm_provider import VLLMProvider  # noqa: E402
from .zhipu_provider import ZhipuProvider  # noqa: E402

register(OpenAIProvider())
register(ZhipuProvider())
register(QwenProvider())
register(HFProvider())  # local models: transformers (CPU, or a GPU without vLLM)
register(VLLMProvider())  # local models: vLLM on GPUs

__all__ = ["ChatAdapter", "DeploySpec", "Provider", "SaaSDeploySpec", "get", "names", "register"]
