"""Providers that speak OpenAI's wire, each a configuration of ``providers.openai_wire`` (see there).

Adding one is a configuration here and its line in ``BUILTIN`` (``providers/__init__.py``).
Error codes come from each provider's published error table (cited per entry); the HTTP status
decides everything else (401/403 auth, 402 quota, 429 rate limit, other 4xx bad request, 5xx error).
"""
from __future__ import annotations

from .openai_wire import OpenAIWire

_TOOLS = frozenset({"response_format", "tools", "tool_choice"})

DEEPSEEK = OpenAIWire(
    name="deepseek", model_types=("saas/deepseek",), default_base_url="https://api.deepseek.com/v1", params=_TOOLS,
    # api-docs.deepseek.com/quick_start/error_codes: 402 Insufficient Balance is a quota by its status alone
    about="DeepSeek (deepseek-chat, deepseek-reasoner)",
)

MOONSHOT = OpenAIWire(
    name="moonshot", model_types=("saas/moonshot",), default_base_url="https://api.moonshot.cn/v1",
    params=_TOOLS,
    # platform.moonshot.cn docs, errors: {"error": {"type", "message"}}, no code; two 429s that differ
    error_codes={"exceeded_current_quota_error": "upstream_quota", "rate_limit_reached_error": "upstream_rate_limited",
                 "engine_overloaded_error": "upstream_rate_limited", "content_filter": "content_filter"},
    about="Moonshot AI (Kimi); https://api.moonshot.ai/v1 outside China",
)

ARK = OpenAIWire(
    name="ark", model_types=("saas/ark", "saas/volcengine"),
    default_base_url="https://ark.cn-beijing.volces.com/api/v3", params=_TOOLS,
    # Ark's model API has no GET /models for an API key (models and endpoints are listed with AK/SK):
    # the deploy-time check is off unless asked for
    key_check=False,
    # volcengine.com/docs/82379/1299023 (error codes): an overdue account is a 403, not a wrong key
    error_codes={"AccountOverdueError": "upstream_quota", "OperationDenied.ServiceOverdue": "upstream_quota",
                 "QuotaExceeded": "upstream_quota", "*SensitiveContentDetected*": "content_filter",
                 "RateLimitExceeded*": "upstream_rate_limited",
                 # (assumed: the "safe experience" spending cap is a 429 that no retry clears)
                 "SetLimitExceeded": "upstream_quota"},
    about="Volcengine Ark (Doubao): model_name is an endpoint id (ep-...) or a model name (doubao-1-5-pro-32k-250115)",
)

# Servers our users run themselves. No default base URL: a replica runs on any node of the cluster,
# where localhost is that node, not the gateway's. A key only if the server was started with one.
OLLAMA = OpenAIWire(
    name="ollama", model_types=("saas/ollama",), base_url_example="http://ollama-host:11434/v1", key="optional",
    params=frozenset({"seed", "response_format", "tools"}), about="Ollama's OpenAI-compatible API (/v1)",
)

XINFERENCE = OpenAIWire(
    name="xinference", model_types=("saas/xinference",), base_url_example="http://xinference-host:9997/v1",
    key="optional", params=frozenset({"tools"}), about="Xorbits Inference's OpenAI-compatible API (/v1)",
)

FASTCHAT = OpenAIWire(
    name="fastchat", model_types=("saas/fastchat",), base_url_example="http://fastchat-host:8000/v1", key="optional",
    about="FastChat's openai_api_server (/v1)",
)

VLLM_OPENAI = OpenAIWire(
    name="vllm_openai", model_types=("saas/vllm_openai",),
    base_url_example="http://vllm-host:8000/v1", key="optional",
    params=frozenset({"seed", "user", "response_format", "tools", "tool_choice"}),
    about="a vLLM OpenAI-compatible server run outside the cluster (vllm serve); 'vllm' runs vLLM in the cluster",
)
