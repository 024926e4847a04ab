"""Retries around the upstream call, inside the replica (tenacity).

Retried: the types ``errors.TYPES`` marks ``retried`` (``upstream_rate_limited``,
``upstream_error``: 5xx, malformed answers, broken connections; ``upstream_timeout``).
Never: auth, quota, content filter, bad request.
Backoff is exponential with jitter; a provider's ``Retry-After`` (or ``retry-after-ms``)
is honoured up to ``retry_after_cap_s``; past the cap the call stops at once and the
caller gets the 429 with the provider's ``Retry-After``. No retry starts past the
endpoint's deadline (``timeout``), and every attempt is cut at what is left of it.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, stop_before_delay
from tenacity import wait_exponential_jitter
from tenacity.stop import stop_base

from contract.errors import TYPES, GatewayError

T = TypeVar("T")

RETRYABLE = frozenset(name for name, kind in TYPES.items() if kind.retried)


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 2
    deadline_s: float = 60.0
    retry_after_cap_s: float = 10.0
    backoff_initial_s: float = 0.25
    backoff_max_s: float = 4.0


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, GatewayError) and exc.type in RETRYABLE


class _stop_on_long_retry_after(stop_base):
    def __init__(self, cap: float) -> None:
        self.cap = cap

    def __call__(self, retry_state: RetryCallState) -> bool:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        after = exc.info.retry_after if isinstance(exc, GatewayError) else None
        return after is not None and after > self.cap


async def call_with_retries(policy: RetryPolicy, attempt: Callable[[], Awaitable[T]]) -> tuple[T, int]:
    """``(result, attempts)``; on failure the last ``GatewayError`` with ``attempts`` set."""
    started = time.monotonic()
    backoff = wait_exponential_jitter(initial=policy.backoff_initial_s, max=policy.backoff_max_s, jitter=policy.backoff_initial_s)

    def wait(retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception()
        if isinstance(exc, GatewayError) and exc.info.retry_after is not None:
            return exc.info.retry_after
        return backoff(retry_state)

    retrying = AsyncRetrying(
        stop=(stop_after_attempt(policy.max_retries + 1) | stop_before_delay(policy.deadline_s)
              | _stop_on_long_retry_after(policy.retry_after_cap_s)),
        wait=wait,
        retry=retry_if_exception(_retryable),
        reraise=True,
    )
    attempts = 0
    try:
        async for state in retrying:
            with state:
                attempts = state.retry_state.attempt_number
                left = policy.deadline_s - (time.monotonic() - started)
                try:
                    result = await asyncio.wait_for(attempt(), max(left, 0.001))
                except asyncio.TimeoutError:
                    raise GatewayError("upstream_timeout", f"no answer within the endpoint's {policy.deadline_s:g}s deadline: try again, "
                                       f"or deploy it again with a larger timeout") from None
    except GatewayError as err:
        raise GatewayError.from_info(err.info.model_copy(update={"attempts": attempts})) from None
    return result, attempts
