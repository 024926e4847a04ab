"""Providers registered only by the test suite, through the public ``providers.register``.

``relay`` is the OpenAI adapter under another name (a second provider for conflict and
routing tests); ``stuck`` asks Ray for a resource no node has, so its replicas never start;
``buggy`` is the OpenAI adapter with a bug on demand: a prompt starting ``crash-before`` or
``crash-after`` makes its stream raise a raw exception before or after the first event;
``brittle`` is the OpenAI adapter behind an SDK constructor that puts the key in its error
(as some do) when the model name starts with ``unbuildable``: only in the replica, so the
failure takes Serve's path (``brittle_eager`` fails the same way in the gateway's own check).
Replicas import this module by reference (the embedded head puts the project on PYTHONPATH).
"""
from __future__ import annotations

import providers
from providers.openai_provider import OpenAIAdapter, OpenAIDeploySpec, OpenAIProvider


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


class BuggyAdapter(OpenAIAdapter):
    async def stream(self, call):
        text = call.messages[-1].content or ""
        if text.startswith("crash-before"):
            raise RuntimeError("an adapter bug before the first event: " + text)
        async for event in super().stream(call):
            yield event
            if text.startswith("crash-after"):
                raise RuntimeError("an adapter bug after the first event: " + text)


class BuggyProvider(OpenAIProvider):
    name = "buggy"

    def create_adapter(self, spec):
        return BuggyAdapter(spec)


class BrittleProvider(OpenAIProvider):
    name = "brittle"

    def replica_options(self, spec, settings):
        return {**super().replica_options(spec, settings), "max_constructor_retry_count": 1}  # one failed start is enough

    def check_deploy(self, spec):
        """Nothing checked in the gateway: the constructor fails where the replica runs."""

    def create_adapter(self, spec):
        if spec.model_name.startswith("unbuildable"):
            raise ValueError(f"could not build the client with api_key={spec.api_key.get_secret_value()}")
        return super().create_adapter(spec)


class EagerBrittleProvider(BrittleProvider):
    name = "brittle_eager"
    check_deploy = OpenAIProvider.check_deploy  # builds the adapter in the gateway, as SaaS providers do


def register_test_providers() -> None:
    for provider in (RelayProvider(), StuckProvider(), BuggyProvider(), BrittleProvider(), EagerBrittleProvider()):
        if provider.name not in providers.names():
            providers.register(provider)
