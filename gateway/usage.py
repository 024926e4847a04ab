"""``GET /usage`` (admin): what client keys used, by key, endpoint and day, and each budgeted key's budgets.

Query (all optional): ``client_key`` (a key's ``name``), ``chat_name``, ``since`` and ``until`` (UTC days,
``YYYY-MM-DD``, inclusive; by default the current month so far). The answer::

    {"since": "2026-12-01", "until": "2026-12-02",
     "usage": [{"day", "client_key", "chat_name", "requests", "tokens_in", "tokens_out", "spend"}, ...],
     "truncated": false,
     "budgets": [{"client_key": "app1", "tokens_per_day": {"limit", "used", "reserved", "resets_at"}, ...}, ...]}

Read from the limits keeper's ledger (``gateway.budget_books``: SQLite on the head node, the same numbers
the keeper admits calls against), so it is the whole cluster's, whichever gateway process answers.
Only keys with a token limit or a budget are counted (the others cost nothing, and are not kept);
``spend`` is at the endpoints' ``price``. Keys are named by their ``name``, never shown.
"""
from __future__ import annotations

import re
import time
from datetime import datetime, timezone

from flask import Blueprint, jsonify, request

from .context import gw
from contract.errors import GatewayError

usage = Blueprint("usage", __name__)

#: how long the view waits for the keeper (a restart of it by Ray fits)
_WAIT_S = 15.0
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _day(name: str, default: str) -> str:
    value = request.args.get(name) or default
    try:
        if not _DAY.match(value):
            raise ValueError
        datetime.strptime(value, "%Y-%m-%d")
    except ValueError:
        raise GatewayError("invalid_request", f"{name} is a UTC day as YYYY-MM-DD (e.g. 2026-12-01): send it so, or "
                           f"leave it out (default: this month so far)", fields=[name]) from None
    return value


@usage.get("/usage")
def usage_report():
    services = gw()  # (the admin token: ``context.ADMIN``)
    today = datetime.fromtimestamp(time.time(), timezone.utc)
    since = _day("since", today.strftime("%Y-%m-01"))
    until = _day("until", today.strftime("%Y-%m-%d"))
    if since > until:
        raise GatewayError("invalid_request", "since comes after until: send since <= until (days as YYYY-MM-DD)",
                           fields=["since", "until"])
    client_key = request.args.get("client_key") or None
    chat_name = request.args.get("chat_name") or None
    keys = [k for k in services.auth.keys if client_key is None or k.name == client_key]
    report = services.limits.usage(since, until, client_key, chat_name, keys, timeout=_WAIT_S)
    return jsonify(since=since, until=until, **report)
