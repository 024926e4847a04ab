"""The limits keeper's books of client keys' tokens and budgets: what was used, and what calls in flight hold.

``gateway.budgets`` says what a call reserves and when a budget resets; these are what the keeper
(``gateway.keeper``, one actor, one thread: its calls never interleave) admits calls against. It
admits a call only while, for each limit, what was used plus what calls in flight reserved is under
the limit (strictly), so the last call admitted crosses a limit by at most its own reservation, and
what is charged in the end by at most its own usage: 200 concurrent calls do not each see the same
balance.

``Books`` are the keeper's: what was used (SQLite, ``usage`` by day, key, key name and endpoint:
requests, tokens in and out, spend), the reservations in flight (in memory, and in SQLite so that
a keeper killed mid-call still counts them when Ray restarts it), the minute buckets, and which
reservations were settled (``settle`` is idempotent by reservation id: Ray retries a call after a
keeper restart). SQLite in WAL mode with ``synchronous=NORMAL``: a transaction is in the file's
log once ``settle`` returns, so it survives ``kill -9`` of the keeper and a restart of the head (not
a power cut of the head's machine: that may lose the last moments). A reservation whose gateway
process died before settling it is let go after its ``ttl``.

Nothing here is secret: keys are known by ``ClientKey.id`` (a hash that leads back to no key) and
their names; ``report`` answers names, never ids. Pure (SQLite, no Ray): the fast tests drive it
with a clock of their own.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import time
from typing import Any, Iterable, Optional

from .budgets import BUDGETS, IN_FLIGHT_WAIT_S, day_of, iso, month_of, next_month, resets_at

log = logging.getLogger("gateway.budgets")

#: settled reservation ids are kept this long (a retried settle comes within seconds)
_SETTLED_KEEP_S = 3 * 86400.0
#: a reservation given up (released or settled) is remembered this long, so that a late retry of its
#: ``reserve`` (Ray does not keep a caller's order when it retries calls) holds nothing
_FINISHED_KEEP_S = 900.0
#: expired reservations are looked for at most this often
_SWEEP_S = 5.0
#: ``report`` answers at most this many rows
REPORT_ROWS = 10_000


def _plain(x: float) -> float:
    """A number as JSON shows it best: 140, not 140.0; 0.000125, not 0.00012500000000000003."""
    x = round(x, 9)
    return int(x) if float(x).is_integer() else x


def _budgets_now(used: dict, held_tokens: float, held_spend: float) -> tuple[tuple[str, float, float], ...]:
    """(budget, what was used of it, what calls in flight hold of it) for each of ``BUDGETS``."""
    return (("tokens_per_day", used["tokens_day"], held_tokens),
            ("tokens_per_month", used["tokens_month"], held_tokens),
            ("spend_per_month", used["spend_month"], held_spend))


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
    call (the gateway's keys file is the truth), keyed by ``budgets.LIMITS`` (None or absent: no such limit).
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
                    "WHERE key_id = ? AND day >= ? AND day < ?", (kid, month + "-01", next_month(month) + "-01")).fetchone()
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
            for budget, so_far, held in _budgets_now(used, held_tokens, held_spend):
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
            for budget, so_far, held in _budgets_now(used, held_tokens, held_spend):
                if limits.get(budget) is not None:
                    entry[budget] = {"limit": _plain(limits[budget]), "used": _plain(so_far), "reserved": _plain(held),
                                     "resets_at": iso(resets_at(budget, now))}
            if limits.get("tokens_per_minute") is not None:
                per_minute = limits["tokens_per_minute"]
                entry["tokens_per_minute"] = {"limit": _plain(per_minute), "reserved": _plain(held_tokens),
                                              "used": _plain(max(per_minute, 1.0) - self._level(kid, per_minute, now))}
            budgets.append({"client_key": key["name"], **entry})
        return {"usage": rows[:REPORT_ROWS], "truncated": len(rows) > REPORT_ROWS, "budgets": budgets}
