"""Client-key budgets: what a call reserves, what it is charged, and when a budget resets.

A key's token limits and budgets (``tokens_per_minute``, ``tokens_per_day``, ``tokens_per_month``,
``spend_per_month`` in the client keys file) are held by *reservations*: before each endpoint call
the gateway reserves what the call may cost at most, and settles it with the real usage after
(``gateway.limits``; ``gateway.reservations`` is this process's part). The keeper admits a call
only while, for each limit, what was used plus what calls in flight reserved is under the limit:
its books are ``gateway.budget_books.Books``.

What a call reserves (``reservation``): an estimate of its input (``input_estimate``: the UTF-8
bytes of its messages' text and tool JSON, halved, plus 4 a message; tokens are rarely shorter
than 2 bytes, so this errs high) plus its ``max_tokens`` (or ``GATEWAY_BUDGET_DEFAULT_MAX_TOKENS``);
its spend at the endpoint's ``price`` (per million input and output tokens; an endpoint without
one costs nothing: a local model, or an operator who did not say).

Budgets reset at the start of each UTC day and UTC month (``resets_at``); ``tokens_per_minute`` is
a bucket that refills continuously, as the request rate's does.

Pure arithmetic (no Ray, no I/O): the keeper's books, the gateway's reservations and the fast tests
share it.
"""
from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from typing import Any, Iterable, Optional

#: the budgets (they reset at the start of a UTC day or month); ``budget_exceeded`` when over one
BUDGETS = ("tokens_per_day", "tokens_per_month", "spend_per_month")
#: every limit a reservation is held against (``tokens_per_minute``: ``rate_limited`` when over it)
LIMITS = ("tokens_per_minute",) + BUDGETS
#: the file under ``GATEWAY_STATE_DIR``
LEDGER_FILE = "usage.sqlite3"
DEFAULT_STATE_DIR = "~/.local/state/llm_gateway"
#: a caller refused because calls in flight hold the rest is told to try again this soon
IN_FLIGHT_WAIT_S = 1.0


# -- what a call reserves ----------------------------------------------------------------
def input_estimate(messages: Iterable[Any], tools: Optional[list] = None) -> int:
    """Input tokens a call may take, estimated high: UTF-8 bytes of the messages' text and tool JSON / 2,
    + 4 per message (``messages``: ``schemas.Message`` or dicts with the same fields)."""
    size, count = 0, 0
    for message in messages:
        count += 1
        get = message.get if isinstance(message, dict) else (lambda name, m=message: getattr(m, name, None))
        for text in (get("content"), get("name"), get("tool_call_id")):
            if isinstance(text, str):
                size += len(text.encode("utf-8"))
        if get("tool_calls"):
            size += len(json.dumps(get("tool_calls"), ensure_ascii=False).encode("utf-8"))
    if tools:
        size += len(json.dumps(tools, ensure_ascii=False).encode("utf-8"))
    return math.ceil(size / 2) + 4 * count


def reservation(call: Any, default_max_tokens: int) -> tuple[int, int]:
    """(input estimate, output at most) of a ``contract.calls.ChatCall``: what it reserves of a key's tokens."""
    return input_estimate(call.messages, call.params.tools), call.params.max_output() or default_max_tokens


def price_of(price: Any) -> tuple[float, float]:
    """An endpoint's price per million (input, output) tokens, from its record's ``price`` (``EndpointRecord.price``:
    ``{"input_per_mtok", "output_per_mtok"}``, as the deploy gave it); (0, 0) without one."""
    if not isinstance(price, dict):
        return 0.0, 0.0

    def rate(name: str) -> float:
        value = price.get(name)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
        return float(value) if ok else 0.0

    return rate("input_per_mtok"), rate("output_per_mtok")


def spend(price: tuple[float, float], tokens_in: float, tokens_out: float) -> float:
    return (tokens_in * price[0] + tokens_out * price[1]) / 1_000_000


def counted(pieces: int, text_bytes: int) -> int:
    """Output tokens of what was streamed when the provider did not say (a stream abandoned or cut): the
    pieces received or the text's UTF-8 bytes / 4, whichever is more (one piece is about one token on
    OpenAI's wire; some providers send several in one)."""
    return max(pieces, math.ceil(text_bytes / 4))


def charged(usage: Any, estimate: int, output_counted: int) -> tuple[int, int]:
    """(tokens in, tokens out) to charge for an answer's ``usage`` (``schemas.Usage``). A total above
    prompt + completion (reasoning, cached parts) is charged as output; no usage at all (the provider
    said nothing) is the input estimate and the output counted."""
    tokens_in, tokens_out, total = usage.prompt_tokens or 0, usage.completion_tokens or 0, usage.total_tokens or 0
    if tokens_in + tokens_out == 0 and total == 0:
        return estimate, output_counted
    return tokens_in, tokens_out + max(0, total - tokens_in - tokens_out)


# -- when budgets reset -------------------------------------------------------------------
def _utc(now: float) -> datetime:
    return datetime.fromtimestamp(now, timezone.utc)


def day_of(now: float) -> str:
    return _utc(now).strftime("%Y-%m-%d")


def month_of(now: float) -> str:
    return _utc(now).strftime("%Y-%m")


def next_month(month: str) -> str:
    year, number = int(month[:4]), int(month[5:7])
    return f"{year + number // 12:04d}-{number % 12 + 1:02d}"


def resets_at(budget: str, now: float) -> Optional[float]:
    """When ``budget`` starts afresh (epoch seconds): the next UTC midnight, or the first of next month
    (UTC); None for ``tokens_per_minute`` (it refills as it goes)."""
    t = _utc(now)
    if budget == "tokens_per_day":
        return datetime(t.year, t.month, t.day, tzinfo=timezone.utc).timestamp() + 86400
    if budget in ("tokens_per_month", "spend_per_month"):
        year, month = (t.year + 1, 1) if t.month == 12 else (t.year, t.month + 1)
        return datetime(year, month, 1, tzinfo=timezone.utc).timestamp()
    return None


def iso(ts: float) -> str:
    """ISO 8601, UTC, whole seconds: ``2026-12-03T00:00:00Z``."""
    return _utc(ts).strftime("%Y-%m-%dT%H:%M:%SZ")


def ledger_path(state_dir: Optional[str]) -> str:
    """The ledger's file, ``GATEWAY_STATE_DIR`` (or its default) resolved in the calling process (the keeper's, on the head)."""
    return os.path.join(os.path.expanduser(state_dir or DEFAULT_STATE_DIR), LEDGER_FILE)
