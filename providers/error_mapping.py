"""How an SDK's exceptions become ``GatewayError``: one exception-class table per SDK, read by ``map_by_class``.

Each provider keeps a table of its SDK's exception classes (``ErrorTable``) built from the
mappers here (``fixed``, ``unexpected``, the shared entries) and its own; the adapter wraps
every upstream call in ``reraise_as_gateway_error``, which maps what escapes and scrubs the key.
The words each upstream type starts with (``MESSAGES``, ``auth_message``) are the same for
every provider, as is how a rate limit's wait is read (``retry_after_seconds``).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Mapping, Optional

from contract.errors import GatewayError

from .keys import redact


def auth_message(said: str) -> str:
    """The chat-time ``upstream_auth`` message: what the provider said, then what to do."""
    return f"{said.rstrip()} - deploy it again with a valid key"


def retry_after_seconds(headers: Any) -> Optional[float]:
    """``retry-after-ms`` first, then ``retry-after`` in seconds (as the SDK reads them)."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                seconds = float(value) / scale
            except ValueError:
                continue
            if math.isfinite(seconds):  # ("inf", "1e400": a wait no one can honour)
                return max(0.0, seconds)
    return None


#: how one exception becomes a ``GatewayError``
ErrorMapper = Callable[[BaseException], GatewayError]
#: an SDK's exception classes -> their mappers (``map_by_class``)
ErrorTable = Mapping[type, ErrorMapper]


def fixed(type: str, message: str) -> ErrorMapper:
    """A mapper that answers one type and message, whatever the exception says."""
    return lambda exc: GatewayError(type, message)


#: what each upstream type says before the provider's own words, for every provider
MESSAGES: dict[str, str] = {
    "upstream_auth": "the provider rejected the endpoint's key",
    "upstream_quota": "the provider's balance or quota is exhausted",
    "upstream_rate_limited": "the provider is rate limiting this key",
    "content_filter": "the provider refused the content",
    "upstream_bad_request": "the provider refused the request",
    "upstream_timeout": "the provider timed out",
    "upstream_error": "the provider failed",
}


def unexpected(exc: BaseException) -> GatewayError:
    """An exception no table entry says more about: its class is named, never its text (it may hold input)."""
    return GatewayError("upstream_error", f"unexpected {type(exc).__name__} while calling the provider")


#: the entries every SDK's table shares
TIMED_OUT = fixed("upstream_timeout", "the provider did not answer in time")
MALFORMED = fixed("upstream_error", "the provider's answer was malformed")
CONNECTION_FAILED = fixed("upstream_error", "could not reach the provider (connection failed)")


def map_by_class(exc: BaseException, table: ErrorTable) -> GatewayError:
    """``exc`` mapped by the entry of its most specific class in ``table`` (its MRO, as httpx does).

    Each provider keeps one such table of its SDK's exception classes; a fast test checks
    that every public exception class of the pinned SDK has its own entry, so an SDK upgrade
    that adds one fails the test instead of falling through to a guess.
    """
    for cls in type(exc).__mro__:
        mapper = table.get(cls)
        if mapper is not None:
            return mapper(exc)
    return unexpected(exc)


@contextlib.contextmanager
def reraise_as_gateway_error(provider: str, secret: str, mapper) -> Iterator[None]:
    """Map any exception to a ``GatewayError`` with ``mapper(exc)`` and scrub the key."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - every SDK failure must become ours
        err = exc if isinstance(exc, GatewayError) else mapper(exc)
        info = err.info.model_copy(update={"provider": provider, "message": redact(err.info.message, secret)})
        raise GatewayError.from_info(info) from None
