"""OpenAI (and any OpenAI-wire relay): the ``openai`` configuration of ``providers.openai_wire``.

``OpenAIProvider`` is a class (the test suite's providers, relays, a stuck and a buggy one, subclass
it); ``OpenAIDeploySpec`` and ``OpenAIAdapter`` name what the configuration makes.
"""
from __future__ import annotations

from contract.errors import GatewayError

from .base import Provider
from .error_mapping import ErrorTable, map_by_class
from .openai_wire import OpenAIWire, OpenAIWireAdapter, OpenAIWireProvider

OPENAI = OpenAIWire(
    name="openai",
    model_types=("saas/openai", "saas/official_openai"),
    default_base_url="https://api.openai.com/v1",
    params=frozenset({"seed", "user", "response_format", "tools", "tool_choice"}),
    # platform.openai.com/docs/guides/error-codes: a 429 that is a spent quota, and the safety system's refusals
    error_codes={"insufficient_quota": "upstream_quota", "content_filter": "content_filter",
                 "content_policy_violation": "content_filter"},
    about="OpenAI, or any relay in front of it (base_url)",
    account_headers=True,
)

#: every public exception class of the pinned ``openai`` SDK -> its mapper, with OpenAI's own codes
OPENAI_ERRORS: ErrorTable = OPENAI.errors
OpenAIDeploySpec = OPENAI.spec_class
OpenAIAdapter = OpenAIWireAdapter  # (its wire and name default to the spec's: openai)


def map_openai_error(exc: BaseException) -> GatewayError:
    """An ``openai`` SDK exception as OpenAI's own failure (``OPENAI_ERRORS``)."""
    return map_by_class(exc, OPENAI_ERRORS)


class OpenAIProvider(OpenAIWireProvider):
    wire = OPENAI
    name = "openai"
    spec_class = OpenAIDeploySpec
    params = Provider.params | OPENAI.params


__all__ = ["OPENAI", "OPENAI_ERRORS", "OpenAIAdapter", "OpenAIDeploySpec", "OpenAIProvider", "map_openai_error"]
