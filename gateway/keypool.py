"""Key pools: an endpoint's keys, each with its own health, and which key a call goes to.

Pure (no Ray, no I/O): the replica and the keeper actor (``gateway.pool_keeper``) hold the same
``Pool`` and apply the same events to it, so what one replica learns (a key revoked, a quota
spent, a 429) is seen by every replica within a sync (about a second).

A key is in one of three states:

- ``ok``: it takes calls, by ``weight`` among the ok keys (weight 0: drained, never used);
- ``cooling``: it answered 429, or a 5xx, until ``until`` (the provider's ``Retry-After``, else
  ``COOL_S``; at most ``COOL_CAP_S``); used only when no key is ok (the one that cools down
  soonest: a pool of one behaves under 429s as an endpoint with one key always did);
- ``disabled``: the provider refused it (``upstream_auth``) or its balance is spent
  (``upstream_quota``); never used, and checked again with the provider's free key check at
  ``next_check`` (``check_backoff``: 5 s, doubling up to 300 s, 60 s first for a spent balance; the count reset by a successful
  call). A pool of one key still calls its key: the provider's own error reaches the caller
  (and the endpoint's cooldown), as before pools.

A replica's own copy of its pool, the events its calls make and the rotation of a call over the
keys are ``gateway.key_rotation``.

Keys themselves are held as ``SecretStr`` (their repr hides them); everything else here is
about fingerprints (``providers.keys.key_fingerprint``).
"""
from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from pydantic import SecretStr

from providers.keys import key_fingerprint
from providers.specs import MAX_POOL_KEYS

from contract.errors import ErrorInfo, GatewayError

OK, COOLING, DISABLED = "ok", "cooling", "disabled"
#: a cooling key's wait when the provider names none, and the longest one honoured
COOL_S, COOL_CAP_S = 5.0, 300.0
#: the first re-check of a disabled key, and the longest wait between two
CHECK_S, CHECK_CAP_S = 5.0, 300.0
#: the first re-check of a key disabled for its spent balance
QUOTA_CHECK_S = 60.0
#: a re-check handed to a replica is its own for this long (then another may take it)
CLAIM_S = 30.0
#: the failures that disable a key until it passes a check
DISABLE_ON = frozenset({"upstream_auth", "upstream_quota"})


def check_backoff(strikes: int, error_type: Optional[str] = None) -> float:
    """Seconds to a disabled key's next check after its ``strikes``-th failure: 5 s x 2^(n-1), at most 300 s;
    a spent balance (``upstream_quota``) from ``QUOTA_CHECK_S`` on: it comes back when someone pays, not within
    seconds, and the free key check passes for it (it lists models), so an early check would only bring it
    back for its next call to disable it again."""
    first = QUOTA_CHECK_S if error_type == "upstream_quota" else CHECK_S
    return min(CHECK_CAP_S, first * 2 ** max(0, min(strikes, 30) - 1))


def reason_of(info: ErrorInfo) -> str:
    """``upstream_quota (insufficient_quota)``: the type, then the provider's code or the HTTP status."""
    said = info.provider_code or (f"HTTP {info.upstream_status}" if info.upstream_status else None)
    return f"{info.type} ({said})" if said else info.type


def judge(info: ErrorInfo) -> Optional[tuple[str, str, float]]:
    """What a failure says about the key that got it: ``(DISABLED | COOLING, reason, seconds)``, or None
    (the call's fault, a timeout, the network: nothing about the key)."""
    if info.type in DISABLE_ON:
        return DISABLED, reason_of(info), 0.0
    if info.type == "upstream_rate_limited" or (info.type == "upstream_error" and (info.upstream_status or 0) >= 500):
        wait = info.retry_after if info.retry_after is not None else COOL_S
        return COOLING, reason_of(info), min(COOL_CAP_S, max(0.0, wait))
    return None


def keyed(err: GatewayError, fingerprint: str) -> GatewayError:
    """``err`` saying which key it came from (``ErrorInfo.key``, where the error model has the field)."""
    if "key" not in type(err.info).model_fields or err.info.key == fingerprint:
        return err
    return GatewayError.from_info(err.info.model_copy(update={"key": fingerprint}))


@dataclass
class KeyState:
    """One key's health and traffic (never the key: ``Pool`` keeps it apart)."""

    fingerprint: str
    weight: int = 1
    state: str = OK
    reason: Optional[str] = None
    #: when it entered its state (epoch seconds)
    since: float = 0.0
    #: cooling: when it may take calls again
    until: Optional[float] = None
    #: disabled: when it is checked again
    next_check: Optional[float] = None
    #: disables and failed checks since its last successful call (the check backoff's n)
    strikes: int = 0
    calls: int = 0
    failures: int = 0
    #: calls by outcome: ``ok`` or the error type
    outcomes: dict[str, int] = field(default_factory=dict)
    #: its last failure: when, and its type (the error of a pool whose every key is disabled)
    failed_at: Optional[float] = None
    failed_type: Optional[str] = None
    #: (the keeper's) a re-check handed to a replica, until then
    claimed_until: Optional[float] = None

    def view(self) -> dict[str, Any]:
        """What listings show of it."""
        return {"fingerprint": self.fingerprint, "weight": self.weight, "state": self.state, "reason": self.reason,
                "since": _round(self.since), "until": _round(self.until), "next_check": _round(self.next_check),
                "calls": self.calls, "failures": self.failures, "outcomes": dict(self.outcomes)}


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 3)


class Pool:
    """One endpoint's keys (one generation of its deploy), their states, and the pick of a key."""

    def __init__(self, chat_name: str, generation: str, keys: Iterable[tuple[str, int]] = (),
                 now: Optional[float] = None) -> None:
        self.chat_name, self.generation = chat_name, generation
        #: the keeper's count of changes (edits and state changes): a replica asks for the pool when it differs
        self.version = 0
        self.keys: dict[str, KeyState] = {}
        self._secrets: dict[str, SecretStr] = {}
        at = time.time() if now is None else now
        for key, weight in keys:
            self.add(key, weight, at)

    def __len__(self) -> int:
        return len(self.keys)

    def secret(self, fingerprint: str) -> str:
        return self._secrets[fingerprint].get_secret_value()

    # -- edits (the keeper's, through the admin routes) -------------------------------
    def add(self, key: str, weight: int, now: float) -> KeyState:
        fingerprint = key_fingerprint(key)
        same = next((fp for fp, s in self._secrets.items() if s.get_secret_value() == key), None)
        if same is not None:
            raise GatewayError("conflict", f"this key is in the pool of '{self.chat_name}' already, as {same}")
        if fingerprint in self.keys:
            raise GatewayError("conflict", f"another key of '{self.chat_name}' has the fingerprint {fingerprint}: two "
                                           f"keys that listings cannot tell apart cannot be in one pool")
        if len(self.keys) >= MAX_POOL_KEYS:
            raise GatewayError("invalid_request", f"the pool of '{self.chat_name}' holds {MAX_POOL_KEYS} keys, the most "
                                                  f"it may: remove one first")
        self.keys[fingerprint] = KeyState(fingerprint, weight, since=now)
        self._secrets[fingerprint] = SecretStr(key)
        return self.keys[fingerprint]

    def _get(self, fingerprint: str) -> KeyState:
        state = self.keys.get(fingerprint)
        if state is None:
            raise GatewayError("not_found", f"'{self.chat_name}' has no key {fingerprint}; GET /deployments/"
                                            f"{self.chat_name}/keys lists its keys")
        return state

    def remove(self, fingerprint: str) -> None:
        self._get(fingerprint)
        if len(self.keys) == 1:
            raise GatewayError("conflict", f"{fingerprint} is the last key of '{self.chat_name}': add another first "
                                           f"(or undeploy the endpoint)")
        del self.keys[fingerprint], self._secrets[fingerprint]

    def set_weight(self, fingerprint: str, weight: int) -> None:
        self._get(fingerprint).weight = weight

    def enable(self, fingerprint: str, now: float) -> None:
        """Back to ok by hand, whatever its state; its check backoff starts over."""
        state = self._get(fingerprint)
        if state.state != OK:
            state.state, state.since = OK, now
        state.reason = state.until = state.next_check = state.claimed_until = None
        state.strikes = 0

    # -- events (a replica's, applied by it at once and by the keeper on sync) -----------
    def apply(self, event: tuple) -> bool:
        """Apply one event (``key_rotation.Ledger`` makes them); whether a state changed. Unknown keys (removed
        meanwhile) are ignored; applying an event twice changes nothing more than once."""
        kind, fingerprint = event[0], event[1]
        state = self.keys.get(fingerprint)
        if state is None:
            return False
        if kind == "ok":  # ("ok", fp, started, at): a call that started after its failure shows it works
            _, _, started, at = event
            changed = state.state != OK and started >= state.since
            if changed:
                state.state, state.since, state.reason, state.until, state.next_check = OK, at, None, None, None
            changed = changed or state.strikes != 0
            state.strikes = 0
            return changed
        if kind == "fail":  # ("fail", fp, error type, DISABLED | COOLING, reason, seconds, at)
            _, _, error_type, verdict, reason, seconds, at = event
            state.failed_at, state.failed_type = at, error_type
            if state.state == DISABLED:
                return False
            if verdict == DISABLED:
                state.strikes += 1
                state.state, state.reason, state.since, state.until = DISABLED, reason, at, None
                state.next_check, state.claimed_until = at + check_backoff(state.strikes, error_type), None
                return True
            until = at + seconds
            if state.state == COOLING and (state.until or 0) >= until:
                return False
            if state.state != COOLING:
                state.since = at
            state.state, state.reason, state.until = COOLING, reason, until
            return True
        if kind == "checked":  # ("checked", fp, passed, at): a disabled key's check
            _, _, passed, at = event
            if state.state != DISABLED:
                return False  # (enabled by hand meanwhile)
            state.claimed_until = None
            if passed:
                state.state, state.since, state.reason, state.next_check = OK, at, None, None
            else:
                state.strikes += 1
                state.next_check = at + check_backoff(state.strikes, state.failed_type)
            return True
        return False

    def count(self, counts: dict[str, dict[str, int]]) -> None:
        """Add a replica's calls by key and outcome (``ok`` or the error type)."""
        for fingerprint, outcomes in counts.items():
            state = self.keys.get(fingerprint)
            if state is None:
                continue
            for outcome, n in outcomes.items():
                state.calls += n
                state.outcomes[outcome] = state.outcomes.get(outcome, 0) + n
                if outcome != "ok":
                    state.failures += n

    def refresh(self, now: float) -> None:
        """Cooling keys whose time is up are ok again (the same on every side: no event needed)."""
        for state in self.keys.values():
            if state.state == COOLING and (state.until or 0) <= now:
                state.state, state.since, state.until, state.reason = OK, state.until or now, None, None

    # -- which key --------------------------------------------------------------------
    def pick(self, tried: set[str], now: float, rng: Optional[random.Random] = None) -> Optional[str]:
        """The key a call goes to, none of ``tried``: by weight among the ok keys; else the cooling key that
        cools down soonest; else, in a pool of one, its key whatever its state; else None."""
        self.refresh(now)
        live = [s for s in self.keys.values() if s.weight > 0 and s.fingerprint not in tried]
        ok = [s for s in live if s.state == OK]
        if ok:
            return ok[0].fingerprint if len(ok) == 1 else (rng or random).choices(ok, weights=[s.weight for s in ok])[0].fingerprint
        cooling = [s for s in live if s.state == COOLING]
        if cooling:
            return min(cooling, key=lambda s: s.until or 0).fingerprint
        if len(self.keys) == 1 and live:
            return live[0].fingerprint
        return None

    def exhausted(self, now: float) -> GatewayError:
        """The error of a call no key may take, made without an upstream call: the type of the key that
        failed last, each key named by its fingerprint with why and when it is checked again."""
        disabled = [s for s in self.keys.values() if s.state == DISABLED]
        drained = [s for s in self.keys.values() if s.weight == 0 and s.state != DISABLED]
        if not disabled:
            return GatewayError("endpoint_not_ready", f"every key of '{self.chat_name}' is drained (weight 0): give one a "
                                f"weight (PATCH /deployments/{self.chat_name}/keys/<fingerprint>)", retry_after=5)
        last = max(disabled, key=lambda s: s.failed_at or s.since)
        said = [f"{s.fingerprint} {s.reason or 'disabled'}" + (
                    f", checked again in {max(0, round((s.next_check or now) - now))} s" if s.next_check else "")
                for s in disabled] + [f"{s.fingerprint} drained (weight 0)" for s in drained]
        soonest = min((s.next_check for s in disabled if s.next_check), default=None)
        kind = last.failed_type if last.failed_type in DISABLE_ON else "upstream_auth"
        err = GatewayError(kind, f"every key of '{self.chat_name}' is disabled: {'; '.join(said)}",
                           retry_after=None if soonest is None else max(1.0, soonest - now))
        return keyed(err, last.fingerprint)

    def claim_check(self, now: float) -> Optional[str]:
        """(the keeper's) The disabled key due for its check soonest, claimed for ``CLAIM_S``; or None."""
        due = [s for s in self.keys.values() if s.state == DISABLED and (s.next_check or 0) <= now
               and (s.claimed_until or 0) <= now]
        if not due:
            return None
        state = min(due, key=lambda s: s.next_check or 0)
        state.claimed_until = now + CLAIM_S
        return state.fingerprint

    # -- transfer ------------------------------------------------------------------------
    def views(self, now: float) -> list[dict[str, Any]]:
        self.refresh(now)
        return [s.view() for s in self.keys.values()]

    def snapshot(self, secrets: bool = False) -> dict[str, Any]:
        """The pool as plain data (what crosses Ray); with ``secrets``, its keys (as ``SecretStr``) too."""
        out = {"chat_name": self.chat_name, "generation": self.generation, "version": self.version,
               "keys": [dataclasses.asdict(s) for s in self.keys.values()]}
        if secrets:
            out["secrets"] = dict(self._secrets)
        return out

    @classmethod
    def from_snapshot(cls, data: dict[str, Any]) -> "Pool":
        pool = cls(data["chat_name"], data["generation"])
        pool.version = data["version"]
        pool.keys = {s["fingerprint"]: KeyState(**s) for s in data["keys"]}
        pool._secrets = {fp: SecretStr(s.get_secret_value() if isinstance(s, SecretStr) else s)
                         for fp, s in data.get("secrets", {}).items()}
        return pool

    def adopt(self, older: "Pool") -> None:
        """Keep the states (and counts) of the keys an older generation held too: a redeploy with a
        spent key does not call it again at once."""
        by_key = {older.secret(fp): state for fp, state in older.keys.items()}
        for fingerprint, state in self.keys.items():
            old = by_key.get(self.secret(fingerprint))
            if old is not None:
                self.keys[fingerprint] = dataclasses.replace(old, fingerprint=fingerprint, weight=state.weight,
                                                             outcomes=dict(old.outcomes), claimed_until=None)
