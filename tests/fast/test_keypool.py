"""Key pools without Ray: the deploy spec's ``api_keys``, each key's states, the pick by weight, the
check backoff, rotation and its bound (gateway.keypool), and the keeper's generations (gateway.pool_keeper)."""
from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest
from pydantic import SecretStr

import providers
from contract.errors import ErrorInfo, GatewayError
from gateway.key_rotation import Ledger, call_with_keys
from gateway.keypool import CLAIM_S, COOLING, DISABLED, OK, Pool, check_backoff, judge, reason_of
from gateway.pool_keeper import Keeper, generation_of
from gateway.schemas import validate
from providers.keys import key_fingerprint
from providers.specs import MAX_POOL_KEYS

A, B, C = "sk-pool-aaaaaaaaaaaa-1111", "sk-pool-bbbbbbbbbbbb-2222", "sk-pool-cccccccccccc-3333"
FA, FB, FC = (key_fingerprint(k) for k in (A, B, C))
BASE = {"chat_name": "pooled", "model_name": "m"}
QUOTA = ErrorInfo(type="upstream_quota", message="spent", provider_code="insufficient_quota", upstream_status=429)
REVOKED = ErrorInfo(type="upstream_auth", message="bad key", provider_code="invalid_api_key", upstream_status=401)
LIMITED = ErrorInfo(type="upstream_rate_limited", message="slow down", upstream_status=429, retry_after=7)


def spec(provider: str = "openai", **fields):
    return validate(providers.get(provider).spec_class, {**BASE, **fields})


def refused(provider: str = "openai", **fields) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        spec(provider, **fields)
    assert info.value.type == "invalid_request"
    for key in (A, B, C):
        assert key not in info.value.info.message
    return info.value


# -- the deploy spec ------------------------------------------------------------------
def test_api_keys_take_keys_or_weighted_entries_and_api_key_is_the_first():
    s = spec(api_keys=[A, {"key": B, "weight": 3}, {"key": C, "weight": 0}])
    assert s.pool() == [(A, 1), (B, 3), (C, 0)]
    assert s.api_key.get_secret_value() == A  # (what builds one adapter still reads one key)
    assert s.for_key(B).api_key.get_secret_value() == B and s.for_key(B).api_keys is None
    assert sorted(s.secret_values()) == sorted([A, B, C])
    scrubbed = s.scrub(f"said: {A} {B} {C}")
    assert scrubbed.startswith("said: [redacted]") and not any(k in scrubbed for k in (A, B, C))
    public = s.public()
    assert public["keys"] == 3 and public["key_fingerprint"] == FA
    assert not any(k in str(public) for k in (A, B, C))
    assert spec(api_key=A).pool() == [(A, 1)] and spec(api_key=A).public()["keys"] == 1


def test_the_digest_covers_every_key_and_weight():
    secret = b"s" * 16
    one = spec(api_keys=[A, B]).digest(secret)
    assert one == spec(api_keys=[A, B]).digest(secret)
    assert one != spec(api_keys=[A, C]).digest(secret) != spec(api_keys=[A, {"key": B, "weight": 2}]).digest(secret)
    assert spec(api_key=A).digest(secret) != spec(api_keys=[A]).digest(secret)


@pytest.mark.parametrize("fields, said", [
    ({"api_key": A, "api_keys": [B]}, "not both"),
    ({"api_keys": [A, B, A]}, "entries 1 and 3 are the same key"),
    ({"api_keys": [A, "sk-other-key-zzzz-1111"]}, "entries 1 and 2 have the same fingerprint (sk-...1111)"),
    ({"api_keys": [{"key": A, "weight": 0}]}, "every key has weight 0"),
    ({"api_keys": [{"key": A, "weight": 101}]}, "api_keys.0.weight"),
    ({"api_keys": [A] * 0}, "api_keys"),
    ({"api_keys": [f"sk-many-keys-{i:04d}" for i in range(MAX_POOL_KEYS + 1)]}, "api_keys"),
    ({}, "api_key is required"),
])
def test_a_wrong_pool_is_refused_by_entry_number_never_by_key(fields, said):
    assert said in refused(**fields).info.message


def test_each_key_of_a_pool_meets_the_providers_own_key_rules():
    """Zhipu's keys are id.secret: every entry is held to it, as api_key is."""
    good = "abcdef123456.secretsecret1"
    assert spec("zhipu", api_keys=[good, "abcdef999999.othersecret2"]).pool()[1][0] == "abcdef999999.othersecret2"
    err = refused("zhipu", api_keys=[good, "no-dot-in-this-key"])
    assert "entry 2: a Zhipu key has the form id.secret" in err.info.message and err.info.fields == ["api_keys"]
    assert providers.get("zhipu").spec_class.key_problem("no-dot") == "a Zhipu key has the form id.secret"
    assert providers.get("zhipu").spec_class.key_problem(good) is None


def test_a_price_is_two_numbers_at_or_above_zero_and_shown():
    s = spec(api_key=A, price={"input_per_mtok": 0.15, "output_per_mtok": 0.6})
    assert s.public()["price"] == {"input_per_mtok": 0.15, "output_per_mtok": 0.6}
    assert "price" not in spec(api_key=A).public()
    assert "price.output_per_mtok is required" in refused(api_key=A, price={"input_per_mtok": 1}).info.message
    assert "price.input_per_mtok" in refused(api_key=A, price={"input_per_mtok": -1, "output_per_mtok": 1}).info.message


# -- what a failure says about its key ----------------------------------------------------
def test_auth_and_quota_disable_429s_and_5xx_cool_the_rest_says_nothing():
    assert judge(QUOTA) == (DISABLED, "upstream_quota (insufficient_quota)", 0.0)
    assert judge(REVOKED) == (DISABLED, "upstream_auth (invalid_api_key)", 0.0)
    assert judge(LIMITED) == (COOLING, "upstream_rate_limited (HTTP 429)", 7)
    assert judge(ErrorInfo(type="upstream_rate_limited", message="x"))[2] == 5.0  # no Retry-After: 5 s
    assert judge(ErrorInfo(type="upstream_rate_limited", message="x", retry_after=3600))[2] == 300.0  # capped
    assert judge(ErrorInfo(type="upstream_error", message="x", upstream_status=503))[0] == COOLING
    for kind in ("upstream_timeout", "upstream_bad_request", "content_filter"):
        assert judge(ErrorInfo(type=kind, message="x")) is None
    assert judge(ErrorInfo(type="upstream_error", message="connection failed")) is None  # the network, not the key
    assert reason_of(ErrorInfo(type="upstream_auth", message="x")) == "upstream_auth"


def test_the_check_backoff_doubles_from_5_s_up_to_300_s():
    assert [check_backoff(n) for n in range(1, 9)] == [5, 10, 20, 40, 80, 160, 300, 300]
    assert [check_backoff(n, "upstream_quota") for n in range(1, 5)] == [60, 120, 240, 300]  # (a spent balance)


# -- states and the pick -------------------------------------------------------------------
def pool(*weights: int, now: float = 1000.0) -> Pool:
    return Pool("pooled", "g1", list(zip((A, B, C), weights)), now)


def fail(p: Pool, fingerprint: str, info: ErrorInfo, at: float) -> bool:
    return p.apply(("fail", fingerprint, info.type, *judge(info), at))


def test_calls_go_to_ok_keys_by_weight_and_never_to_drained_or_disabled_ones():
    p, rng = pool(1, 3, 0), random.Random(7)
    picks = Counter(p.pick(set(), 1000.0, rng) for _ in range(4000))
    assert set(picks) == {FA, FB} and 2.6 < picks[FB] / picks[FA] < 3.4  # weight 3 against 1; C drained
    fail(p, FB, QUOTA, 1000.0)
    assert {p.pick(set(), 1000.0, rng) for _ in range(50)} == {FA}
    assert p.pick({FA}, 1000.0) is None  # (tried already within this attempt)


def test_with_no_ok_key_the_cooling_key_that_cools_soonest_is_used():
    p = pool(1, 1, 1)
    fail(p, FA, LIMITED, 1000.0)  # until 1007
    fail(p, FB, ErrorInfo(type="upstream_rate_limited", message="x", retry_after=2), 1000.0)  # until 1002
    fail(p, FC, REVOKED, 1000.0)
    assert p.pick(set(), 1001.0) == FB and p.pick({FB}, 1001.0) == FA
    assert p.pick(set(), 1003.0) == FB and p.keys[FB].state == OK  # its time is up: ok again, by itself
    assert p.keys[FA].state == COOLING and p.keys[FA].until == 1007.0


def test_a_pool_of_one_calls_its_key_whatever_its_state():
    """As an endpoint with one key always did: the provider's own error reaches the caller."""
    p = Pool("one", "g1", [(A, 1)], 1000.0)
    fail(p, FA, REVOKED, 1000.0)
    assert p.keys[FA].state == DISABLED and p.pick(set(), 1001.0) == FA
    p.apply(("ok", FA, 1002.0, 1002.5))  # a call that started after the failure worked: it is back
    assert p.keys[FA].state == OK and p.keys[FA].strikes == 0


def test_every_key_disabled_is_the_last_failures_type_naming_each_key_by_fingerprint():
    p = pool(1, 1, 0)
    fail(p, FA, REVOKED, 1000.0)
    fail(p, FB, QUOTA, 1001.0)
    assert p.pick(set(), 1002.0) is None
    err = p.exhausted(1002.0)
    assert err.type == "upstream_quota" and err.status == 502
    text = err.info.message
    assert f"{FA} upstream_auth (invalid_api_key), checked again in 3 s" in text
    assert f"{FB} upstream_quota (insufficient_quota), checked again in 59 s" in text  # (a spent balance: 60 s first)
    assert f"{FC} drained (weight 0)" in text and not any(k in text for k in (A, B, C))
    assert err.info.retry_after == 3.0
    drained = Pool("d", "g1", [(A, 0), (B, 0)], 1000.0)
    assert drained.exhausted(1000.0).type == "endpoint_not_ready"


def test_a_disabled_key_is_checked_with_backoff_and_a_successful_call_resets_it():
    p = pool(1, 1, 1)
    fail(p, FA, REVOKED, 1000.0)
    assert p.keys[FA].next_check == 1005.0
    assert not fail(p, FA, REVOKED, 1000.5)  # (already disabled: the same event twice changes nothing)
    assert p.claim_check(1004.0) is None
    assert p.claim_check(1005.0) == FA and p.claim_check(1005.0) is None  # claimed: one replica checks it
    assert p.claim_check(1005.0 + CLAIM_S) == FA  # (a claim that was never answered lapses)
    p.apply(("checked", FA, False, 1006.0))
    assert p.keys[FA].state == DISABLED and p.keys[FA].next_check == 1016.0  # 10 s: the second strike
    p.apply(("checked", FA, False, 1016.0))
    assert p.keys[FA].next_check == 1036.0
    p.apply(("checked", FA, True, 1036.0))
    assert p.keys[FA].state == OK and p.keys[FA].reason is None and p.keys[FA].strikes == 3
    fail(p, FA, QUOTA, 1040.0)
    assert p.keys[FA].next_check == 1040.0 + 300  # (still counting: no successful call yet; a spent balance: 60 s x 8, capped)
    p.apply(("checked", FA, True, 1080.0))
    p.apply(("ok", FA, 1081.0, 1081.5))
    assert p.keys[FA].strikes == 0
    fail(p, FA, QUOTA, 1090.0)
    assert p.keys[FA].next_check == 1150.0  # (back to the first strike: 60 s for a spent balance)


def test_a_success_that_started_before_a_cooldown_does_not_end_it():
    p = pool(1, 1, 1)
    fail(p, FA, LIMITED, 1000.0)
    assert not p.apply(("ok", FA, 999.0, 1000.2)) and p.keys[FA].state == COOLING
    assert p.apply(("ok", FA, 1000.5, 1000.6)) and p.keys[FA].state == OK


def test_edits_by_fingerprint():
    p = pool(1, 1, 1)
    with pytest.raises(GatewayError) as same:
        p.add(A, 1, 1000.0)
    assert same.value.type == "conflict" and FA in same.value.info.message and A not in same.value.info.message
    with pytest.raises(GatewayError) as look_alike:
        p.add("sk-other-key-zzzz-1111", 1, 1000.0)
    assert look_alike.value.type == "conflict"
    with pytest.raises(GatewayError) as unknown:
        p.set_weight("sk-...0000", 2)
    assert unknown.value.type == "not_found"
    fail(p, FA, REVOKED, 1000.0)
    p.enable(FA, 1001.0)
    assert p.keys[FA].state == OK and p.keys[FA].strikes == 0 and p.keys[FA].next_check is None
    p.remove(FB)
    p.remove(FC)
    with pytest.raises(GatewayError) as last:
        p.remove(FA)
    assert last.value.type == "conflict" and "last key" in last.value.info.message
    for i in range(MAX_POOL_KEYS - 1):
        p.add(f"sk-added-key-{i:08d}", 1, 1000.0)
    with pytest.raises(GatewayError) as full:
        p.add("sk-one-too-many-9999", 1, 1000.0)
    assert full.value.type == "invalid_request"


def test_views_and_snapshots_show_no_key_and_a_snapshot_carries_states():
    p = pool(1, 2, 1)
    fail(p, FB, QUOTA, 1000.0)
    p.count({FB: {"upstream_quota": 1}, FA: {"ok": 4}})
    views = {v["fingerprint"]: v for v in p.views(1000.0)}
    assert views[FB] == {"fingerprint": FB, "weight": 2, "state": DISABLED, "reason": "upstream_quota (insufficient_quota)",
                         "since": 1000.0, "until": None, "next_check": 1060.0, "calls": 1, "failures": 1,
                         "outcomes": {"upstream_quota": 1}}
    assert views[FA]["calls"] == 4 and views[FA]["failures"] == 0
    for shown in (str(views), str(p.snapshot()), repr(p.snapshot(secrets=True))):
        assert not any(k in shown for k in (A, B, C))
    copy = Pool.from_snapshot(p.snapshot(secrets=True))
    assert copy.secret(FB) == B and copy.keys[FB].state == DISABLED and copy.views(1000.0) == p.views(1000.0)


def test_a_new_generation_keeps_the_states_of_the_keys_it_keeps():
    old = pool(1, 1, 1)
    fail(old, FB, QUOTA, 1000.0)
    new = Pool("pooled", "g2", [(B, 5), ("sk-brand-new-key-4444", 1)], 1010.0)
    new.adopt(old)
    assert new.keys[FB].state == DISABLED and new.keys[FB].weight == 5  # (the new deploy's weight)
    assert new.keys["sk-...4444"].state == OK


# -- rotation -------------------------------------------------------------------------------
class Upstream:
    """A fake upstream by key fingerprint: what each key answers, and every call made."""

    def __init__(self, answers: dict[str, ErrorInfo]) -> None:
        self.answers, self.calls = answers, []

    async def __call__(self, fingerprint: str) -> str:
        self.calls.append(fingerprint)
        if fingerprint in self.answers:
            raise GatewayError.from_info(self.answers[fingerprint])
        return f"answered by {fingerprint}"


def run(ledger: Ledger, upstream: Upstream):
    return asyncio.run(call_with_keys(ledger, upstream))


def test_a_429_quota_or_auth_moves_on_to_the_next_key_within_the_same_call():
    changes = []
    ledger = Ledger(pool(1, 1, 1), on_change=changes.append, clock=lambda: 1000.0)
    upstream = Upstream({FA: REVOKED, FB: QUOTA})
    for _ in range(20):
        answer, used = run(ledger, upstream)
        assert used == FC and answer == f"answered by {FC}"
    assert upstream.calls.count(FA) == 1 and upstream.calls.count(FB) == 1  # then disabled: never called again
    assert {ledger.pool.keys[f].state for f in (FA, FB)} == {DISABLED}
    assert [e[1] for e in changes] == [FA, FB] or [e[1] for e in changes] == [FB, FA]
    events, counts = ledger.take()
    assert counts[FC] == {"ok": 20} and counts[FA] == {"upstream_auth": 1} and len(events) == 2


def test_rotation_is_bounded_by_the_pools_size_then_the_last_error_goes_to_the_retry_policy():
    ledger = Ledger(pool(1, 1, 1), clock=lambda: 1000.0)
    limited = {f: LIMITED for f in (FA, FB, FC)}
    upstream = Upstream(limited)
    with pytest.raises(GatewayError) as info:
        run(ledger, upstream)
    assert sorted(upstream.calls) == sorted([FA, FB, FC])  # each key once, whatever the pool's states
    assert info.value.type == "upstream_rate_limited" and info.value.info.retry_after == 7
    assert getattr(info.value.info, "key", upstream.calls[-1]) == upstream.calls[-1]
    # A call after them all cooling: the one that cools down soonest first, then the others, each once.
    upstream.calls.clear()
    with pytest.raises(GatewayError):
        run(ledger, upstream)
    assert len(upstream.calls) == 3


def test_other_failures_stop_at_once_and_a_pool_with_no_usable_key_asks_no_one():
    ledger = Ledger(pool(1, 1, 1), clock=lambda: 1000.0)
    timeout = ErrorInfo(type="upstream_timeout", message="slow")
    upstream = Upstream({FA: timeout, FB: timeout, FC: timeout})
    with pytest.raises(GatewayError) as info:
        run(ledger, upstream)
    assert info.value.type == "upstream_timeout" and len(upstream.calls) == 1
    for fingerprint in (FA, FB, FC):
        ledger.failed(fingerprint, REVOKED)
    upstream.calls.clear()
    with pytest.raises(GatewayError) as info:
        run(ledger, upstream)
    assert info.value.type == "upstream_auth" and upstream.calls == [] and "every key of 'pooled'" in info.value.info.message


def test_a_replicas_ledger_gives_back_what_it_could_not_send_and_keeps_local_news_over_the_keepers_pool():
    ledger = Ledger(pool(1, 1, 1), clock=lambda: 1000.0)
    ledger.failed(FA, QUOTA)
    events, counts = ledger.take()
    assert not ledger.pending()
    ledger.give_back(events, counts)
    assert ledger.take() == (events, counts)
    keeper_copy = pool(1, 1, 1).snapshot(secrets=True)  # (it has not heard of FA's quota yet)
    ledger.failed(FB, REVOKED)  # since the sync was sent
    ledger.adopt(keeper_copy)
    assert ledger.pool.keys[FB].state == DISABLED and ledger.pool.keys[FA].state == OK


# -- the keeper's generations -----------------------------------------------------------------
def keys(*pairs):
    return [(SecretStr(k), w) for k, w in pairs]


def test_the_keeper_syncs_seeds_edits_and_forgets():
    keeper = Keeper()
    g1 = generation_of("d1")
    keeper.put("ep", g1, b"template", keys((A, 1), (B, 1)))
    answer = keeper.sync("ep", g1, -1, [("fail", FA, "upstream_auth", DISABLED, "upstream_auth (x)", 0.0, 1.0)], {FA: {"upstream_auth": 1}})
    assert answer["pool"]["version"] == 1 and answer["check"][0] == FA  # (its first check was due long ago)
    assert answer["check"][1].get_secret_value() == A and A not in repr(answer)
    assert keeper.sync("ep", g1, 1, [], {}) == {}  # nothing new, and the check is claimed
    assert keeper.views(["ep", "other"])["ep"][0]["state"] == DISABLED and "other" not in keeper.views(["ep", "other"])
    # An edit reaches every generation; the answer shows views only.
    g2 = generation_of("d2")
    keeper.put("ep", g2, b"template2", keys((A, 1), (B, 1), (C, 1)))
    edited = keeper.edit("ep", "weight", fingerprint=FB, weight=0)
    assert edited["key"]["weight"] == 0 and not any(k in str(edited) for k in (A, B, C))
    assert all(p.keys[FB].weight == 0 for p in keeper._pools["ep"].values())
    assert keeper.edit("ep", "remove", fingerprint="sk-...0000")["error"]["type"] == "not_found"
    assert keeper.edit("missing", "enable", fingerprint=FA) == {"missing": True}
    assert keeper.template("ep") == (b"template", [FA, FB])  # (g2's replicas have not synced yet: g1 is in use)
    keeper.sync("ep", g2, -1, [], {})
    assert keeper.template("ep") == (b"template2", [FA, FB, FC])
    # A restarted keeper (a new one) is seeded by the first replica that syncs.
    fresh = Keeper()
    assert fresh.sync("ep", g1, 1, [], {}) == {"seed": True}
    assert fresh.seed("ep", g1, b"t", keeper._pools["ep"][g1].snapshot(secrets=True))
    assert fresh.views(["ep"])["ep"][0]["state"] == DISABLED
    # Undeployed: its replicas still stopping may not seed it again.
    fresh.drop("ep", at=10**10)
    assert fresh.sync("ep", g1, 1, [], {}) == {"gone": True} and not fresh.seed("ep", g1, b"t", {})
