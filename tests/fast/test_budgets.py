"""Budgets without Ray: what a call reserves, when budgets reset, and the keeper's books (SQLite in a temp dir).

``Books`` is what the limits keeper runs (``gateway.keeper``); here it is driven directly, with a clock
of the test's, to check the arithmetic: admission against used + reserved, idempotent settles, what
survives a keeper that is made again on the same file (its restart), resets at UTC day and month.
"""
from __future__ import annotations

import random
import sqlite3
from datetime import datetime, timezone

import pytest
import yaml

from gateway import budgets
from gateway.auth import load_keys
from gateway.budget_books import Books
from gateway.reservations import _num, _over
from contract.calls import ChatCall, Message, SamplingParams, Usage


class Clock:
    def __init__(self, when: str = "2026-12-02T10:00:00") -> None:
        self.now = datetime.fromisoformat(when).replace(tzinfo=timezone.utc).timestamp()

    def __call__(self) -> float:
        return self.now


def books(tmp_path, clock=None) -> Books:
    return Books(budgets.ledger_path(str(tmp_path / "state")), clock or Clock())


DAY = {"tokens_per_day": 140}


# -- what a call reserves ------------------------------------------------------------------
def test_the_input_estimate_is_half_the_bytes_plus_four_a_message():
    assert budgets.input_estimate([Message(role="user", content="hi")]) == 1 + 4
    two = [Message(role="system", content="be brief"), Message(role="user", content="你好")]  # 8 + 6 bytes
    assert budgets.input_estimate(two) == 7 + 8
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    import json
    tool_bytes = len(json.dumps(tools).encode())
    assert budgets.input_estimate([{"role": "user", "content": "hi"}], tools) == -(-(2 + tool_bytes) // 2) + 4
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    with_calls = Message(role="assistant", content=None, tool_calls=calls)
    assert budgets.input_estimate([with_calls]) == -(-len(json.dumps(calls).encode()) // 2) + 4


def test_a_call_reserves_its_estimate_and_its_max_tokens_or_the_default():
    call = ChatCall(request_id="r", messages=[Message(role="user", content="hi")])
    assert budgets.reservation(call, 1024) == (5, 1024)
    call = ChatCall(request_id="r", messages=[Message(role="user", content="hi")], params=SamplingParams(max_tokens=8))
    assert budgets.reservation(call, 1024) == (5, 8)
    call = ChatCall(request_id="r", messages=[Message(role="user", content="hi")],
                    params=SamplingParams(max_tokens=8, max_completion_tokens=3))
    assert budgets.reservation(call, 1024) == (5, 3)


@pytest.mark.parametrize("record, price", [
    (None, (0, 0)), ({}, (0, 0)), ({"price": None}, (0, 0)), ({"price": "cheap"}, (0, 0)),
    ({"price": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}}, (0.15, 0.6)),
    ({"price": {"input_per_mtok": -1, "output_per_mtok": True}}, (0, 0)),
    ({"price": {"input_per_mtok": float("inf"), "output_per_mtok": 2}}, (0, 2)),
])
def test_an_endpoints_price_is_read_defensively(record, price):
    assert budgets.price_of((record or {}).get("price")) == price


def test_spend_counted_and_charged():
    assert budgets.spend((0.15, 0.6), 1_000_000, 500_000) == pytest.approx(0.45)
    assert budgets.counted(3, 4) == 3 and budgets.counted(1, 30) == 8  # pieces, or bytes / 4: whichever is more
    assert budgets.charged(Usage(prompt_tokens=5, completion_tokens=2, total_tokens=7), 9, 9) == (5, 2)
    assert budgets.charged(Usage(prompt_tokens=5, completion_tokens=2, total_tokens=10), 9, 9) == (5, 5)  # (reasoning)
    assert budgets.charged(Usage(), 9, 4) == (9, 4)  # no usage said: the estimate and what was counted


# -- when budgets reset --------------------------------------------------------------------------
def test_budgets_reset_at_the_next_utc_day_and_month():
    now = Clock("2026-12-31T23:59:30")()
    assert budgets.iso(budgets.resets_at("tokens_per_day", now)) == "2027-01-01T00:00:00Z"
    assert budgets.iso(budgets.resets_at("tokens_per_month", now)) == "2027-01-01T00:00:00Z"
    assert budgets.resets_at("tokens_per_day", now) - now == 30
    now = Clock("2026-02-10T05:00:00")()
    assert budgets.iso(budgets.resets_at("spend_per_month", now)) == "2026-03-01T00:00:00Z"
    assert budgets.iso(budgets.resets_at("tokens_per_day", now)) == "2026-02-11T00:00:00Z"
    assert budgets.resets_at("tokens_per_minute", now) is None
    assert budgets.day_of(now) == "2026-02-10" and budgets.month_of(now) == "2026-02"


# -- admission ------------------------------------------------------------------------------------
def test_admission_is_used_plus_reserved_under_the_limit_strictly(tmp_path):
    b = books(tmp_path)
    assert b.reserve("r1", "k", DAY, 100, 0, 60)["ok"]
    assert b.reserve("r2", "k", DAY, 39, 0, 60)["ok"]  # 100 < 140
    refused = b.reserve("r3", "k", DAY, 1, 0, 60)  # 139 < 140: admitted...
    assert refused["ok"]
    refused = b.reserve("r4", "k", DAY, 1, 0, 60)  # 140 is not under 140
    assert not refused["ok"] and refused["limit"] == "tokens_per_day" and refused["kind"] == "in_flight"
    assert refused["wait"] == budgets.IN_FLIGHT_WAIT_S and refused["held"] == 140 and refused["used"] == 0
    assert b.reserve("r1", "k", DAY, 100, 0, 60)["ok"] and b.held("k") == (140, 0)  # (asked again: the same hold)
    b.settle("r1", "k", "app", "ep", 5, 2, 0.0, DAY)
    assert b.held("k") == (40, 0) and b.used("k")["tokens_day"] == 7
    b.release("r2")
    b.release("r3")
    assert b.held("k") == (0, 0)
    assert b.reserve("r5", "k", DAY, 200, 0, 60)["ok"]  # (7 used: a reservation past the limit is admitted...)
    b.settle("r5", "k", "app", "ep", 100, 100, 0.0, DAY)
    spent = b.reserve("r6", "k", DAY, 1, 0, 60)  # ...and then the key is spent until midnight
    assert not spent["ok"] and spent["kind"] == "spent" and spent["resets_at"] == "2026-12-03T00:00:00Z"
    assert spent["wait"] == 14 * 3600 and spent["used"] == 207


def test_concurrent_calls_end_at_most_one_calls_usage_past_the_budget(tmp_path):
    """Any interleaving of 200 calls (each reserving 13, using 1..7): what is charged ends under the
    budget + one call's usage, and the budget is used up (a call is refused only while it is held)."""
    rng = random.Random(25)
    for trial in range(20):
        b = books(tmp_path / str(trial))
        in_flight, started, refused, usages = [], 0, 0, []
        while started < 200 or in_flight:
            if started < 200 and (not in_flight or rng.random() < 0.6):
                rid = f"r{started}"
                started += 1
                if b.reserve(rid, "k", DAY, 13, 0, 60)["ok"]:
                    in_flight.append(rid)
                else:
                    refused += 1
            else:
                rid = in_flight.pop(rng.randrange(len(in_flight)))
                used = rng.randint(1, 7)
                usages.append(used)
                b.settle(rid, "k", "app", "ep", used - 1, 1, 0.0, DAY)
            tokens, _ = b.held("k")
            assert b.used("k")["tokens_day"] + tokens < 140 + 13  # the invariant the keeper keeps
        charged = b.used("k")["tokens_day"]
        assert charged == sum(usages) and charged < 140 + max(usages), (trial, charged)
        assert refused and len(usages) + refused == 200


def test_tokens_per_minute_bounds_what_is_in_flight_and_refills(tmp_path):
    clock = Clock()
    b = books(tmp_path, clock)
    tpm = {"tokens_per_minute": 100}
    assert [b.reserve(f"r{i}", "k", tpm, 45, 0, 60)["ok"] for i in range(4)] == [True, True, True, False]
    held = b.reserve("r9", "k", tpm, 45, 0, 60)
    assert held["limit"] == "tokens_per_minute" and held["kind"] == "in_flight" and held["wait"] == 1.0
    for i in range(3):
        b.settle(f"r{i}", "k", "app", "ep", 5, 2, 0.0, tpm)
    assert b.reserve("r4", "k", tpm, 45, 0, 60)["ok"]  # 79 left, nothing held
    b.settle("r4", "k", "app", "ep", 60, 30, 0.0, tpm)  # -11: spent
    spent = b.reserve("r5", "k", tpm, 45, 0, 60)
    assert spent["kind"] == "spent" and spent["wait"] == pytest.approx(12 * 60 / 100)
    clock.now += 7.2
    assert b.reserve("r6", "k", tpm, 45, 0, 60)["ok"]  # refilled to 1


def test_spend_per_month_counts_the_price_and_resets_with_the_month(tmp_path):
    clock = Clock("2026-12-31T23:00:00")
    b = books(tmp_path, clock)
    limits = {"spend_per_month": 0.01, "tokens_per_day": 10_000}
    price = (1.0, 4.0)  # per million
    assert b.reserve("r1", "k", limits, 3000, budgets.spend(price, 1000, 2000), 60)["ok"]
    b.settle("r1", "k", "app", "ep", 1000, 2000, budgets.spend(price, 1000, 2000), limits)  # 0.009
    assert b.reserve("r2", "k", limits, 3000, budgets.spend(price, 1000, 2000), 60)["ok"]  # 0.009 < 0.01
    b.settle("r2", "k", "app", "ep", 1000, 2000, budgets.spend(price, 1000, 2000), limits)
    spent = b.reserve("r3", "k", limits, 10, 0.0, 60)
    assert spent["limit"] == "spend_per_month" and spent["kind"] == "spent" and spent["resets_at"] == "2027-01-01T00:00:00Z"
    clock.now += 3600  # a new day and a new month
    assert b.reserve("r4", "k", limits, 10, 0.0, 60)["ok"]
    assert b.used("k") == {"day": "2027-01-01", "month": "2027-01", "tokens_day": 0, "tokens_month": 0, "spend_month": 0}


def test_a_day_budget_resets_at_midnight_and_the_month_keeps_counting(tmp_path):
    clock = Clock("2026-12-02T23:59:00")
    b = books(tmp_path, clock)
    limits = {"tokens_per_day": 10, "tokens_per_month": 25}
    b.settle("a", "k", "app", "ep", 8, 4, 0.0, limits)
    assert b.reserve("b", "k", limits, 1, 0, 60)["kind"] == "spent"
    clock.now += 120
    assert b.reserve("c", "k", limits, 1, 0, 60)["ok"]
    b.settle("c", "k", "app", "ep", 8, 4, 0.0, limits)
    b.settle("d", "k", "app", "ep", 1, 1, 0.0, limits)  # (a settle with no reservation still counts: a restarted keeper's)
    refused = b.reserve("e", "k", limits, 1, 0, 60)
    assert refused["limit"] == "tokens_per_month" and refused["resets_at"] == "2027-01-01T00:00:00Z"  # (the longer wait)
    assert b.used("k")["tokens_day"] == 14 and b.used("k")["tokens_month"] == 26


# -- what survives --------------------------------------------------------------------------------
def test_a_settle_counts_once_and_everything_survives_a_new_keeper_on_the_same_file(tmp_path):
    clock = Clock()
    first = books(tmp_path, clock)
    assert first.reserve("r1", "k", DAY, 13, 0, 60)["ok"] and first.reserve("r2", "k", DAY, 13, 0, 60)["ok"]
    assert first.settle("r1", "k", "app", "ep", 5, 2, 0.001, DAY) is True
    assert first.settle("r1", "k", "app", "ep", 5, 2, 0.001, DAY) is False  # (Ray's retry after a restart)
    # the keeper is killed: a new one on the same file (as Ray restarts it, or a restarted head makes it)
    second = books(tmp_path, clock)
    assert second.used("k")["tokens_day"] == 7
    assert second.held("k") == (13, 0)  # r2 is still in flight: still held
    assert second.settle("r1", "k", "app", "ep", 5, 2, 0.001, DAY) is False
    assert second.settle("r2", "k", "app", "ep", 5, 2, 0.001, DAY) is True
    assert second.held("k") == (0, 0) and second.used("k")["tokens_day"] == 14
    report = second.report("2026-12-01", "2026-12-31")
    assert report["usage"] == [{"day": "2026-12-02", "client_key": "app", "chat_name": "ep", "requests": 2,
                                "tokens_in": 10, "tokens_out": 4, "spend": 0.002}]
    with sqlite3.connect(second.path) as db:  # WAL, and nothing but ids, names and numbers in it
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_reservation_its_process_never_ended_is_let_go_after_its_ttl(tmp_path):
    clock = Clock()
    b = books(tmp_path, clock)
    assert b.reserve("r1", "k", DAY, 140, 0, 60)["ok"]
    assert not b.reserve("r2", "k", DAY, 1, 0, 60)["ok"]
    clock.now += 61
    assert b.reserve("r3", "k", DAY, 1, 0, 60)["ok"] and b.held("k") == (1, 0)
    reopened = books(tmp_path, clock)  # (gone from the file too)
    assert reopened.held("k") == (1, 0)


def test_a_late_reserve_of_a_released_or_settled_call_holds_nothing(tmp_path):
    b = books(tmp_path)
    b.release("gone")  # (Ray retried the reserve after the release: out of order)
    assert b.reserve("gone", "k", DAY, 13, 0, 60) == {"ok": False, "limit": "", "kind": "finished", "wait": 0.0}
    b.settle("done", "k", "app", "ep", 1, 1, 0.0, DAY)
    assert not b.reserve("done", "k", DAY, 13, 0, 60)["ok"] and b.held("k") == (0, 0)


def test_the_report_filters_and_names_keys_by_name_only(tmp_path):
    clock = Clock()
    b = books(tmp_path, clock)
    b.settle("1", "kid-a", "app-a", "ep1", 5, 2, 0.5, DAY)
    b.settle("2", "kid-a", "app-a", "ep2", 5, 2, 0.5, DAY)
    b.settle("3", "kid-b", "app-b", "ep1", 5, 2, 0.0, DAY)
    clock.now += 86400
    b.settle("4", "kid-a", "app-a", "ep1", 1, 1, 0.25, DAY)
    assert b.reserve("5", "kid-a", DAY, 13, 0.1, 60)["ok"]
    report = b.report("2026-12-01", "2026-12-31", budgeted=[{"id": "kid-a", "name": "app-a",
                                                              "limits": {**DAY, "spend_per_month": 5}}])
    assert [(r["day"], r["client_key"], r["chat_name"]) for r in report["usage"]] == [
        ("2026-12-02", "app-a", "ep1"), ("2026-12-02", "app-a", "ep2"), ("2026-12-02", "app-b", "ep1"),
        ("2026-12-03", "app-a", "ep1")]
    assert report["budgets"] == [{"client_key": "app-a",
                                  "tokens_per_day": {"limit": 140, "used": 2, "reserved": 13, "resets_at": "2026-12-04T00:00:00Z"},
                                  "spend_per_month": {"limit": 5, "used": 1.25, "reserved": 0.1, "resets_at": "2027-01-01T00:00:00Z"}}]
    assert "kid-a" not in repr(report) and "kid-b" not in repr(report)
    only = b.report("2026-12-02", "2026-12-02", client_key="app-a", chat_name="ep1")
    assert [(r["client_key"], r["chat_name"], r["requests"]) for r in only["usage"]] == [("app-a", "ep1", 1)]


# -- what the caller is told -----------------------------------------------------------------
def _key(tmp_path, **limits):
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump([{"key": "sk-budget-secret-0001", "name": "app1", **limits}]))
    return load_keys(None, str(path))[0]


def test_a_spent_budget_says_when_it_resets_and_never_the_key(tmp_path):
    key = _key(tmp_path, tokens_per_day=140)
    err = _over(key, {"limit": "tokens_per_day", "kind": "spent", "wait": 3600.2, "resets_at": "2026-12-03T00:00:00Z",
                      "allowed": 140, "used": 147, "held": 0})
    assert err.type == "budget_exceeded" and err.status == 429
    assert err.headers() == {"Retry-After": "3601", "x-should-retry": "false"}  # (OpenAI's SDKs: do not retry)
    message = err.info.message
    assert "app1" in message and "2026-12-03T00:00:00Z" in message and "tokens_per_day 140" in message
    assert "used 147" in message and "try again" in message and "GATEWAY_API_KEYS_FILE" in message
    assert "sk-budget" not in message
    held = _over(key, {"limit": "spend_per_month", "kind": "in_flight", "wait": 1.0, "resets_at": "2027-01-01T00:00:00Z",
                       "allowed": 0.5, "used": 0.25, "held": 0.3})
    assert held.type == "budget_exceeded" and held.headers() == {"Retry-After": "1"} and "in flight" in held.info.message
    minute = _over(key, {"limit": "tokens_per_minute", "kind": "spent", "wait": 12.0, "resets_at": None,
                         "allowed": 30, "used": 37, "held": 0})
    assert minute.type == "rate_limited" and "30 tokens a minute" in minute.info.message
    assert [_num(x) for x in (140, 140.0, 0.25, 0.000125, 1e6, 2.5e-8)] == ["140", "140", "0.25", "0.000125", "1000000", "0"]


def test_the_keys_file_takes_budgets_and_refuses_bad_ones_without_the_key(tmp_path):
    key = _key(tmp_path, tokens_per_day=1000, tokens_per_month="1e6", spend_per_month=2.5)
    assert key.budgeted and key.limited and key.rate_per_minute is None
    assert key.limits() == {"tokens_per_minute": None, "tokens_per_day": 1000, "tokens_per_month": 1e6, "spend_per_month": 2.5}
    assert not _key(tmp_path, rate_per_minute=5).budgeted and _key(tmp_path, tokens_per_minute=5).budgeted
    for bad in ({"tokens_per_day": 0}, {"spend_per_month": -1}, {"tokens_per_month": float("inf")}):
        with pytest.raises(SystemExit) as exc:
            _key(tmp_path, **bad)
        assert "entry #1 (name 'app1')" in str(exc.value) and next(iter(bad)) in str(exc.value)
        assert "sk-budget" not in str(exc.value)


def test_a_release_after_a_keeper_restart_lets_go_of_a_reservation_it_had_on_file(tmp_path):
    first = books(tmp_path)
    assert first.reserve("r1", "k", DAY, 140, 0, 60)["ok"]
    second = books(tmp_path)  # (restarted: the first thing it hears of r1 is its release)
    second.release("r1")
    assert second.held("k") == (0, 0) and books(tmp_path).held("k") == (0, 0)
