"""Providers registered only by the test suite, through the public ``providers.register``.

``relay`` is the OpenAI adapter under another name (a second provider for conflict and
routing tests); ``stuck`` asks Ray for a resource no node has, so its replicas never start.
Replicas import this module by reference (the embedded head puts the project on PYTHONPATH).
"""
from __future__ import annotations

import providers
from providers.openai_provider import OpenAIDeploySpec, OpenAIProvider


class RelayDeploySpec(OpenAIDeploySpec):
    MODEL_TYPES = ("saas/relay",)


class RelayProvider(OpenAIProvider):
    name = "relay"
    spec_class = RelayDeploySpec


class StuckProvider(OpenAIProvider):
    name = "stuck"

    def replica_options(self, spec, settings):
        options = super().replica_options(spec, settings)
        options["ray_actor_options"] = {**options["ray_actor_options"], "resources": {"no_such_node": 1}}
        return options


def register_test_providers() -> None:
    for provider in (RelayProvider(), StuckProvider()):
        if provider.name not in providers.names():
            providers.register(provider)
