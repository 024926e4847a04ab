"""The one table of error types (``contract.errors.TYPES``) and what reads it."""
from __future__ import annotations

import re

import pytest

from gateway import dispatch, retry
from contract.errors import STATUS, TYPES, ErrorInfo, GatewayError


def test_status_is_a_view_of_the_table():
    assert STATUS == {name: kind.status for name, kind in TYPES.items()}
    assert all(100 <= kind.status < 600 for kind in TYPES.values())


def test_retry_fallback_and_cooldown_sets_come_from_the_table():
    assert retry.RETRYABLE == {"upstream_rate_limited", "upstream_error", "upstream_timeout"}
    assert dispatch.FALLBACK_ON == {"upstream_auth", "upstream_quota", "upstream_rate_limited", "upstream_error",
                                    "upstream_timeout", "endpoint_not_ready", "endpoint_busy"}
    assert dispatch.UPSTREAM_FAILURES == {"upstream_auth", "upstream_quota", "upstream_rate_limited", "upstream_error",
                                          "upstream_timeout"}
    assert dispatch.IMMEDIATE_COOLDOWN == {"upstream_auth", "upstream_quota"}


@pytest.mark.parametrize("name", sorted(TYPES))
def test_each_type_is_consistent(name):
    kind = TYPES[name]
    if kind.retried or kind.cooldown:  # what is retried or cools an endpoint down is the upstream's failure...
        assert name.startswith("upstream_") and kind.falls_back  # ...so another endpoint may answer
    if not kind.falls_back:  # a caller's error is the same on every endpoint
        assert not kind.retried and not kind.cooldown
    if kind.status < 500 and kind.status != 429:
        assert not kind.retried


def test_whose_fault_each_type_is():
    """The caller's errors (counted apart from the endpoint's failures: ``GET /deployments`` ``traffic.caller_errors``,
    the ``fault`` label of ``gateway_requests_total``) are the 4xx that no other endpoint would answer otherwise."""
    from contract.errors import CALLER_ERRORS, fault

    assert CALLER_ERRORS == {name for name, kind in TYPES.items() if kind.caller} == {
        "invalid_request", "content_filter", "upstream_bad_request", "invalid_key", "unauthorized", "forbidden",
        "host_not_allowed", "origin_not_allowed", "not_found", "method_not_allowed", "conflict", "payload_too_large",
        "unsupported_media_type", "request_timeout", "header_too_large", "rate_limited", "budget_exceeded"}
    for name in CALLER_ERRORS:  # what the caller caused fails the same everywhere: never retried, never moved on
        kind = TYPES[name]
        assert kind.status < 500 and not (kind.retried or kind.falls_back or kind.cooldown), name
    # every 4xx that does not fall back is the caller's, save a failed deploy (the model, the cluster, the GPUs ...)
    assert {n for n, k in TYPES.items() if k.status < 500 and not k.falls_back} - CALLER_ERRORS == {"deploy_failed"}
    assert fault(None) == fault("ok") == "none"
    assert {fault(name) for name in CALLER_ERRORS} == {"caller"}
    assert {fault(name) for name in set(TYPES) - CALLER_ERRORS} == {"endpoint"}
    assert fault("upstream_rate_limited") == "endpoint" and fault("rate_limited") == "caller"
    assert fault("no_such_type") == "endpoint"  # (whatever is not known to be the caller's counts against the endpoint)


def test_the_workers_protocol_answers_from_the_table():
    """gateway.server writes its own answers (a late head or body, an oversized head, bad HTTP, the cap): types of
    the table, no hand-written bodies or status lines."""
    import inspect

    from gateway import server

    source = inspect.getsource(server)
    assert {"request_timeout", "header_too_large", "invalid_request", "server_busy"} <= set(
        re.findall(r'GatewayError\(\s*"([a-z_]+)"', source)) <= set(TYPES)
    assert not re.search(r'b"HTTP/1\.1 \d{3}|"error":', source)  # (status lines: uvicorn's table; bodies: GatewayError)
    assert STATUS["request_timeout"] == 408 and STATUS["header_too_large"] == 431 and STATUS["server_busy"] == 503


def test_a_type_outside_the_table_is_refused():
    with pytest.raises(ValueError):
        GatewayError("teapot", "no such type")


@pytest.mark.parametrize("name", sorted(TYPES))
def test_openai_shape_of_every_type(name):
    from gateway.openai_compat import openai_error_body

    err = GatewayError.from_info(ErrorInfo(type=name, message="m", provider_code="pc" if name.startswith("upstream") else None))
    body = openai_error_body(err, "rid")["error"]
    assert body["gateway_type"] == name and body["message"] == "m" and body["request_id"] == "rid"
    assert body["type"] == (TYPES[name].openai_type or name)
    if name == "not_found":
        assert body["code"] == "model_not_found"  # what OpenAI answers for an unknown model
    elif name == "budget_exceeded":
        assert body["code"] == "insufficient_quota"  # what OpenAI answers for a spent quota (its clients stop, not retry)
    elif name.startswith("upstream"):
        assert body["code"] == "pc"  # the provider's own code passes through
    else:
        assert body["code"] == name


def test_retry_after_header_only_where_a_wait_helps():
    assert GatewayError("upstream_rate_limited", "m", retry_after=2.4).headers() == {"Retry-After": "3"}
    assert GatewayError("endpoint_busy", "m", retry_after=0.2).headers() == {"Retry-After": "1"}
    assert GatewayError("upstream_error", "m", retry_after=3).headers() == {}


def test_the_api_reference_lists_every_type_with_its_status():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \|", readme, re.M))
    assert {name: int(status) for name, status in rows.items()} == STATUS


@pytest.mark.parametrize("after, shown", [(29.97608, 30), (30.0, 30), (0.2, 1), (0, 1), (2.0000001, 3), (7, 7)])
def test_retry_after_is_whole_seconds_rounded_up_in_the_body_as_in_the_header(after, shown):
    err = GatewayError("endpoint_not_ready", "m", retry_after=after)  # (a cooled endpoint)
    assert err.body()["error"]["retry_after"] == shown and isinstance(err.body()["error"]["retry_after"], int)
    assert err.headers() == {"Retry-After": str(shown)}
    assert err.info.retry_after == after  # the retry policy still waits the exact time
