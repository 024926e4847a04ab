"""Client-key budgets: what a call reserves, when a budget resets, and the books the limits keeper keeps.

A key's token limits and budgets (``tokens_per_minute``, ``tokens_per_day``, ``tokens_per_month``,
``spend_per_month`` in the client keys file) are held by *reservations*: before each endpoint call
the gateway reserves what the call may cost at most, and settles it with the real usage after
(``gateway.limits``). The keeper (one actor, one thread: its calls never interleave) admits a call
only while, for each limit, what was used plus what calls in flight reserved is under the limit
(strictly), so the last call admitted crosses a limit by at most its own reservation, and what is
charged in the end by at most its own usage: 200 concurrent calls do not each see the same balance.

What a call reserves (``reservation``): an estimate of its input (``input_estimate``: the UTF-8
bytes of its messages' text and tool JSON, halved, plus 4 a message; tokens are rarely shorter
than 2 bytes, so this errs high) plus its ``max_tokens`` (or ``GATEWAY_BUDGET_DEFAULT_MAX_TOKENS``);
its spend at the endpoint's ``price`` (per million input and output tokens; an endpoint without
one costs nothing: a local model, or an operator who did not say).

Budgets reset at the start of each UTC day and UTC month (``resets_at``); ``tokens_per_minute`` is
a bucket that refills continuously, as the request rate's does.

``Books`` are the keeper's: what was used (SQLite, ``usage`` by day, key, key name and endpoint:
requests, tokens in and out, spend), the reservations in flight (in memory, and in SQLite so that
a keeper killed mid-call still counts them when Ray restarts it), the minute buckets, and which
reservations were settled (``settle`` is idempotent by reservation id: Ray retries a call after a
keeper restart). SQLite in WAL mode with ``synchronous=NORMAL``: a transaction is in the file's
log once ``settle`` returns, so it survives ``kill -9`` of the keeper and a restart of the head (not
a power cut of the head's machine: that may lose the last moments). A reservation whose gateway
process died before settling it is let go after its ``ttl``.

Nothing here is secret: keys are known by ``ClientKey.id`` (a hash that leads back to no key) and
their names; ``report`` answers names, never ids.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import time
from datetime import datetime, timezone
from typing import Any, Iterable, Optional

log = logging.getLogger("gateway.budgets")

#: the budgets (they reset at the start of a UTC day or month); ``budget_exceeded`` when over one
BUDGETS = ("tokens_per_day", "tokens_per_month", "spend_per_month")
#: every limit a reservation is held against (``tokens_per_minute``: ``rate_limited`` when over it)
LIMITS = ("tokens_per_minute",) + BUDGETS
#: the file under ``GATEWAY_STATE_DIR``
LEDGER_FILE = "usage.sqlite3"
DEFAULT_STATE_DIR = "~/.local/state/llm_gateway"
#: a caller refused because calls in flight hold the rest is told to try again this soon
IN_FLIGHT_WAIT_S = 1.0
#: settled reservation ids are kept this long (a retried settle comes within seconds)
_SETTLED_KEEP_S = 3 * 86400.0
#: a reservation given up (released or settled) is remembered this long, so that a late retry of its
#: ``reserve`` (Ray does not keep a caller's order when it retries calls) holds nothing
_FINISHED_KEEP_S = 900.0
#: expired reservations are looked for at most this often
_SWEEP_S = 5.0
#: ``report`` answers at most this many rows
REPORT_ROWS = 10_000


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


def price_of(record: Optional[dict]) -> tuple[float, float]:
    """An endpoint's price per million (input, output) tokens, from its record's ``price``; (0, 0) without one."""
    price = (record or {}).get("price")
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


def _next_month(month: str) -> str:
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


def _plain(x: float) -> float:
    """A number as JSON shows it best: 140, not 140.0; 0.000125, not 0.00012500000000000003."""
    x = round(x, 9)
    return int(x) if float(x).is_integer() else x


def ledger_path(state_dir: Optional[str]) -> str:
    """The ledger's file, ``GATEWAY_STATE_DIR`` (or its default) resolved in the calling process (the keeper's, on the head)."""
    return os.path.join(os.path.expanduser(state_dir or DEFAULT_STATE_DIR), LEDGER_FILE)


# -- the keeper's books ---------------------------------------------------------------------
_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (day TEXT NOT NULL, key_id TEXT NOT NULL, key_name TEXT NOT NULL,
    chat_name TEXT NOT NULL, requests INTEGER NOT NULL, tokens_in INTEGER NOT NULL, tokens_out INTEGER NOT NULL,
    spend REAL NOT NULL, PRIMARY KEY (day, key_id, key_name, chat_name)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_by_key ON usage (key_id, day);
CREATE TABLE IF NOT EXISTS settled (rid TEXT PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reservations (rid TEXT PRIMARY KEY, key_id TEXT NOT NULL, tokens REAL NOT NULL,
    spend REAL NOT NULL, expires REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS minute_buckets (key_id TEXT PRIMARY KEY, level REAL NOT NULL, at REAL NOT NULL) WITHOUT ROWID;
"""


class Books:
    """What the keeper knows of budgeted keys (see the module docstring); ``clock`` is for tests.

    Not thread-safe: the keeper is a synchronous actor, one call at a time. Limits come with each
    call (the gateway's keys file is the truth), keyed by ``LIMITS`` (None or absent: no such limit).
    """

    def __init__(self, path: str, clock=time.time) -> None:
        self.path = path
        self.clock = clock
        self._db: Optional[sqlite3.Connection] = None
        #: reservations in flight: rid -> {"kid", "tokens", "spend", "expires"}
        self._open: dict[str, dict] = {}
        #: per key: [tokens, spend, calls] reserved by its calls in flight
        self._held: dict[str, list[float]] = {}
        #: per key: what it used this day and month, as the ledger says ({"day", "tokens_day", "month", ...})
        self._used: dict[str, dict] = {}
        #: per key: [level, at] of its tokens_per_minute bucket
        self._minute: dict[str, list[float]] = {}
        #: rid -> when it was released or settled (a late reserve of it holds nothing)
        self._finished: dict[str, float] = {}
        self._swept = 0.0

    # -- the file --------------------------------------------------------------------------
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            directory = os.path.dirname(self.path)
            os.makedirs(directory, mode=0o700, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False)  # (each write group: ``with db``, one transaction)
            try:
                os.chmod(self.path, 0o600)
            except OSError:
                pass
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            now = self.clock()
            db.execute("DELETE FROM settled WHERE at < ?", (now - _SETTLED_KEEP_S,))
            for rid, kid, tokens, cost, expires in db.execute("SELECT rid, key_id, tokens, spend, expires FROM reservations"):
                self._hold(rid, kid, tokens, cost, expires)  # (calls in flight when the keeper was last stopped)
            for kid, level, at in db.execute("SELECT key_id, level, at FROM minute_buckets"):
                self._minute[kid] = [level, at]
            self._db = db
            log.info("client-key usage ledger %s open (%d reservations in flight)", self.path, len(self._open))
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- in flight ----------------------------------------------------------------------------
    def _hold(self, rid: str, kid: str, tokens: float, cost: float, expires: float) -> None:
        self._open[rid] = {"kid": kid, "tokens": tokens, "spend": cost, "expires": expires}
        held = self._held.setdefault(kid, [0.0, 0.0, 0])
        held[0] += tokens
        held[1] += cost
        held[2] += 1

    def _unhold(self, rid: str) -> bool:
        entry = self._open.pop(rid, None)
        if entry is None:
            return False
        held = self._held.get(entry["kid"])
        if held is not None:
            held[0] -= entry["tokens"]
            held[1] -= entry["spend"]
            held[2] -= 1
            if held[2] <= 0:  # (none left in flight: exactly nothing held, whatever the floats' rounding left)
                del self._held[entry["kid"]]
        return True

    def _sweep(self, now: float) -> None:
        """Let go of reservations past their ttl (their gateway process died), and forget old finished ids."""
        if now - self._swept < _SWEEP_S:
            return
        self._swept = now
        expired = [rid for rid, entry in self._open.items() if entry["expires"] <= now]
        for rid in expired:
            log.warning("a reservation of %d tokens was neither settled nor released in time (its gateway process "
                        "stopped?): let go", self._open[rid]["tokens"])
            self._unhold(rid)
        if expired:
            with self.db():
                self.db().executemany("DELETE FROM reservations WHERE rid = ?", [(rid,) for rid in expired])
        old = now - _FINISHED_KEEP_S
        for rid in [rid for rid, at in self._finished.items() if at < old]:
            del self._finished[rid]

    def held(self, kid: str) -> tuple[float, float]:
        self.db()  # (a keeper just restarted reads the reservations in flight first)
        tokens, cost, _ = self._held.get(kid, (0.0, 0.0, 0))
        return max(0.0, tokens), max(0.0, cost)

    # -- what was used ------------------------------------------------------------------------
    def used(self, kid: str, now: Optional[float] = None) -> dict:
        """{"tokens_day", "tokens_month", "spend_month"} of ``kid`` now (read from the ledger once a day, then kept)."""
        now = self.clock() if now is None else now
        day, month = day_of(now), month_of(now)
        cached = self._used.get(kid)
        if cached is None or cached["day"] != day:
            db = self.db()
            if cached is None or cached["month"] != month:
                tokens_month, spend_month = db.execute(
                    "SELECT COALESCE(SUM(tokens_in + tokens_out), 0), COALESCE(SUM(spend), 0) FROM usage "
                    "WHERE key_id = ? AND day >= ? AND day < ?", (kid, month + "-01", _next_month(month) + "-01")).fetchone()
            else:
                tokens_month, spend_month = cached["tokens_month"], cached["spend_month"]
            (tokens_day,) = db.execute("SELECT COALESCE(SUM(tokens_in + tokens_out), 0) FROM usage WHERE key_id = ? AND day = ?",
                                       (kid, day)).fetchone()
            cached = self._used[kid] = {"day": day, "month": month, "tokens_day": tokens_day,
                                        "tokens_month": tokens_month, "spend_month": spend_month}
        return cached

    def _level(self, kid: str, per_minute: float, now: float) -> float:
        """The key's tokens_per_minute bucket refilled to now (a key new to it starts full)."""
        top = max(per_minute, 1.0)
        bucket = self._minute.get(kid)
        if bucket is None:
            return top
        return min(top, bucket[0] + max(0.0, now - bucket[1]) * per_minute / 60.0)

    # -- the keeper's calls -------------------------------------------------------------------
    def reserve(self, rid: str, kid: str, limits: dict, tokens: float, cost: float, ttl: float) -> dict:
        """Hold ``tokens`` (and ``cost`` of spend) for a call of ``kid``, or refuse: ``{"ok": True}``, or
        ``{"ok": False, "limit", "kind": "spent" | "in_flight", "wait", "resets_at", "allowed", "used", "held"}``
        for the limit with the longest wait. Asked again with the same ``rid``, the same hold."""
        now = self.clock()
        self.db()
        self._sweep(now)
        if rid in self._open:
            return {"ok": True}
        if rid in self._finished:  # (released or settled before this call ran: a late retry holds nothing)
            return {"ok": False, "limit": "", "kind": "finished", "wait": 0.0}
        refusal = self.refusal(kid, limits, now)
        if refusal is not None:
            return refusal
        expires = now + ttl
        with self.db():
            self.db().execute("INSERT OR REPLACE INTO reservations (rid, key_id, tokens, spend, expires) VALUES (?, ?, ?, ?, ?)",
                              (rid, kid, tokens, cost, expires))
        self._hold(rid, kid, tokens, cost, expires)
        return {"ok": True}

    def refusal(self, kid: str, limits: dict, now: float) -> Optional[dict]:
        """Why a new call of ``kid`` may not start now (see ``reserve``), or None: for each limit,
        used + held by calls in flight must stay under it."""
        held_tokens, held_spend = self.held(kid)
        found: list[dict] = []
        per_minute = limits.get("tokens_per_minute")
        if per_minute is not None:
            level = self._level(kid, per_minute, now)
            if level - held_tokens <= 0:
                spent = level <= 0
                wait = (1.0 - level) * 60.0 / per_minute if spent else IN_FLIGHT_WAIT_S
                found.append({"limit": "tokens_per_minute", "kind": "spent" if spent else "in_flight", "wait": wait,
                              "resets_at": None, "allowed": per_minute, "used": max(per_minute, 1.0) - level,
                              "held": held_tokens})
        if any(limits.get(b) is not None for b in BUDGETS):
            used = self.used(kid, now)
            for budget, so_far, held in (("tokens_per_day", used["tokens_day"], held_tokens),
                                         ("tokens_per_month", used["tokens_month"], held_tokens),
                                         ("spend_per_month", used["spend_month"], held_spend)):
                allowed = limits.get(budget)
                if allowed is None or so_far + held < allowed:
                    continue
                reset = resets_at(budget, now)
                spent = so_far >= allowed
                found.append({"limit": budget, "kind": "spent" if spent else "in_flight",
                              "wait": reset - now if spent else IN_FLIGHT_WAIT_S, "resets_at": iso(reset),
                              "allowed": allowed, "used": so_far, "held": held})
        if not found:
            return None
        return {"ok": False, **max(found, key=lambda r: r["wait"])}

    def settle(self, rid: str, kid: str, name: str, chat_name: str, tokens_in: int, tokens_out: int, cost: float,
               limits: dict) -> bool:
        """Charge a call's real usage (its reservation, if still held, is let go), once per ``rid``:
        written to the ledger before this returns. False when ``rid`` was settled already."""
        now = self.clock()
        db = self.db()
        self._unhold(rid)
        self._finished[rid] = now
        tokens = tokens_in + tokens_out
        per_minute = limits.get("tokens_per_minute")
        with db:
            fresh = db.execute("INSERT OR IGNORE INTO settled (rid, at) VALUES (?, ?)", (rid, now)).rowcount == 1
            db.execute("DELETE FROM reservations WHERE rid = ?", (rid,))
            if fresh:
                db.execute("INSERT INTO usage (day, key_id, key_name, chat_name, requests, tokens_in, tokens_out, spend) "
                           "VALUES (?, ?, ?, ?, 1, ?, ?, ?) ON CONFLICT (day, key_id, key_name, chat_name) DO UPDATE SET "
                           "requests = requests + 1, tokens_in = tokens_in + excluded.tokens_in, "
                           "tokens_out = tokens_out + excluded.tokens_out, spend = spend + excluded.spend",
                           (day_of(now), kid, name, chat_name, tokens_in, tokens_out, cost))
                if per_minute is not None:
                    level = self._level(kid, per_minute, now) - tokens
                    db.execute("INSERT OR REPLACE INTO minute_buckets (key_id, level, at) VALUES (?, ?, ?)", (kid, level, now))
        if fresh:  # (the ledger has it: now the cache)
            if per_minute is not None:
                self._minute[kid] = [level, now]
            cached = self._used.get(kid)
            if cached is not None and cached["day"] == day_of(now):
                cached["tokens_day"] += tokens
                cached["tokens_month"] += tokens
                cached["spend_month"] += cost
            else:
                self._used.pop(kid, None)
        return fresh

    def release(self, rid: str) -> None:
        """A call that failed, or was never made after all: its reservation goes back, nothing is charged."""
        self.db()  # (a keeper just restarted reads the reservations in flight first)
        self._finished[rid] = self.clock()
        if self._unhold(rid):
            with self.db():
                self.db().execute("DELETE FROM reservations WHERE rid = ?", (rid,))

    def report(self, since: str, until: str, client_key: Optional[str] = None, chat_name: Optional[str] = None,
               budgeted: Iterable[dict] = ()) -> dict:
        """``GET /usage``: rows by day, client key (its name) and endpoint between ``since`` and ``until``
        (days, inclusive), and for each of ``budgeted`` (``{"id", "name", "limits"}``) its budgets now:
        ``{limit, used, reserved, resets_at}``."""
        now = self.clock()
        self._sweep(now)
        where, args = ["day >= ?", "day <= ?"], [since, until]
        if client_key is not None:
            where.append("key_name = ?")
            args.append(client_key)
        if chat_name is not None:
            where.append("chat_name = ?")
            args.append(chat_name)
        rows = [{"day": day, "client_key": name, "chat_name": chat, "requests": requests, "tokens_in": tokens_in,
                 "tokens_out": tokens_out, "spend": _plain(cost)}
                for day, name, chat, requests, tokens_in, tokens_out, cost in self.db().execute(
                    f"SELECT day, key_name, chat_name, requests, tokens_in, tokens_out, spend FROM usage "
                    f"WHERE {' AND '.join(where)} ORDER BY day, key_name, chat_name LIMIT ?", (*args, REPORT_ROWS + 1))]
        budgets = []
        for key in budgeted:
            kid, limits = key["id"], key["limits"]
            used, (held_tokens, held_spend) = self.used(kid, now), self.held(kid)
            entry: dict[str, Any] = {}
            for budget, so_far, held in (("tokens_per_day", used["tokens_day"], held_tokens),
                                         ("tokens_per_month", used["tokens_month"], held_tokens),
                                         ("spend_per_month", used["spend_month"], held_spend)):
                if limits.get(budget) is not None:
                    entry[budget] = {"limit": _plain(limits[budget]), "used": _plain(so_far), "reserved": _plain(held),
                                     "resets_at": iso(resets_at(budget, now))}
            if limits.get("tokens_per_minute") is not None:
                per_minute = limits["tokens_per_minute"]
                entry["tokens_per_minute"] = {"limit": _plain(per_minute), "reserved": _plain(held_tokens),
                                              "used": _plain(max(per_minute, 1.0) - self._level(kid, per_minute, now))}
            budgets.append({"client_key": key["name"], **entry})
        return {"usage": rows[:REPORT_ROWS], "truncated": len(rows) > REPORT_ROWS, "budgets": budgets}
