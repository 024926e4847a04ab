"""The gateway's side of client keys' tokens and budgets: reserve before each endpoint call, settle after.

``gateway.limits`` says what reserves and settles when (its module docstring); ``gateway.budgets``
says what a call reserves, and ``gateway.budget_books`` are the keeper's books; this is the
process's part between them: one actor round trip to reserve (at most ``KEEPER_WAIT_S``: then 503
``cluster_unavailable``, and the reservation is given back), one to settle (waited for, at most
``_SETTLE_WAIT_S``, for whole answers and a stream's ``Finish``; sent without waiting for a stream
that ended without its usage), one to release (sent). A refusal for a spent limit is answered
locally for at most ``_SPENT_MEMORY_S`` (what was used never goes down before its reset), so a
caller hammering past its budget costs the keeper one call a minute. A keeper that failed a key's
reservation is left alone for ``KEEPER_BACKOFF_S`` (the key's calls: 503 at once). Only keys with a
token limit or a budget (``ClientKey.budgeted``) come here; the others cost nothing.

The Prometheus counters (``gateway.metrics``) are counted here, by the key's name: what each
settle charged (``gateway_client_tokens_total``, ``gateway_client_spend_total``) and each refusal
for a budget (``gateway_budget_refusals_total``).

Ray-free: the keeper's handle comes from ``Limits.keeper`` (``gateway.limits``), whose ``usage`` is
the blocking report of ``GET /usage``; the calls go through ``gateway.actors`` (Ray's failures as
``ActorCallFailed``).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, Optional

from . import actors, budgets, metrics
from .auth import ClientKey
from contract.errors import GatewayError, whole_seconds
from .keeper_terms import KEEPER_BACKOFF_S, KEEPER_WAIT_S, keeper_down

log = logging.getLogger("gateway.limits")

#: how long a whole answer waits for its settle to be written (then it goes; the settle is written later)
_SETTLE_WAIT_S = 10.0
#: a refusal for a spent budget (or minute bucket) is answered locally for at most this long
_SPENT_MEMORY_S = 60.0
#: a reservation its gateway process never settled (it died) is let go after this, past the call's deadline
RESERVATION_GRACE_S = 60.0
#: ... and a stream's after this (a stream's length has no deadline; a longer one just stops being held)
STREAM_RESERVATION_TTL_S = 900.0


class Reservations:
    """This process's reservations over the keeper of ``limits`` (a ``gateway.limits.Limits``: its
    keeper, cluster and settings)."""

    def __init__(self, limits: Any) -> None:
        self._limits = limits
        self.settings = limits.settings
        #: per key id: (until (monotonic), the keeper's refusal) for a spent limit; the keeper's failure
        self._spent: dict[str, tuple[float, dict]] = {}
        self._down: dict[str, tuple[float, str]] = {}

    def keeper(self):
        return self._limits.keeper()

    async def reserve(self, key: ClientKey, chat_name: str, price: Any, call: Any, ttl: float) -> Optional["Reservation"]:
        """Hold what ``call`` to the endpoint ``chat_name`` (at its ``price``: its record's) may cost of ``key``'s
        tokens and budgets, for at most ``ttl`` seconds (see the module docstring); None for a key without
        any. Raises ``rate_limited`` (tokens_per_minute), ``budget_exceeded`` (a budget), or
        ``cluster_unavailable`` when the keeper does not answer within ``KEEPER_WAIT_S``."""
        if not key.budgeted:
            return None
        now = time.monotonic()
        spent = self._spent.get(key.id)
        if spent is not None and now < spent[0]:
            answer = spent[1]
            _count_refusal(key, answer)
            raise _over(key, {**answer, "wait": answer["wait"] - (now - answer["seen"])})
        down = self._down.get(key.id)
        if down is not None and now < down[0]:
            raise keeper_down(key.name, down[1], down[0] - now)
        estimate, most = budgets.reservation(call, self.settings.budget_default_max_tokens)
        rates = budgets.price_of(price)
        held = Reservation(self, key, uuid.uuid4().hex, chat_name, rates, estimate)
        self._limits.cluster.ensure_up()  # (answers at once when the cluster is lost; connected already: a call resolved its endpoint)
        try:
            ref = actors.send(self.keeper(), "reserve", held.rid, key.id, key.limits(), estimate + most,
                              budgets.spend(rates, estimate, most), ttl)
        except Exception as exc:  # noqa: BLE001 - whatever Ray raised, the keeper cannot be asked now
            raise self._keeper_failed(key, exc) from None
        task = asyncio.ensure_future(actors.resolve(ref))
        try:
            done, _ = await asyncio.wait((task,), timeout=KEEPER_WAIT_S)
        except asyncio.CancelledError:  # the caller left while the keeper was asked: whatever it held goes back
            held.release()
            raise
        if not done:
            task.add_done_callback(_consume)
            held.release()  # (after the reserve, in Ray's order: held for nothing, should it come)
            self._down[key.id] = (time.monotonic() + KEEPER_BACKOFF_S, f"did not answer within {KEEPER_WAIT_S:g}s")
            log.warning("the client-key limits keeper did not answer %s's reservation within %gs; the key's calls are "
                        "answered 503 for %gs", key.name, KEEPER_WAIT_S, KEEPER_BACKOFF_S)
            raise keeper_down(key.name, f"did not answer within {KEEPER_WAIT_S:g}s", KEEPER_BACKOFF_S)
        if task.exception() is not None:
            raise self._keeper_failed(key, task.exception())
        answer = task.result()
        if answer.get("ok"):
            return held
        if answer.get("kind") == "finished":  # (cannot be for a fresh id; never admit on a doubt)
            raise keeper_down(key.name, "lost track of the call's reservation", 1.0)
        _count_refusal(key, answer)
        if answer["kind"] == "spent":
            now = time.monotonic()
            self._spent[key.id] = (now + min(answer["wait"], _SPENT_MEMORY_S), {**answer, "seen": now})
        raise _over(key, answer)

    def _keeper_failed(self, key: ClientKey, exc: BaseException) -> GatewayError:
        """The keeper failed a reservation: the key's calls are answered 503 for ``KEEPER_BACKOFF_S``."""
        if isinstance(exc, GatewayError):  # (the cluster is lost: answered at once, no backoff)
            return exc
        if isinstance(exc, AttributeError):  # a keeper an older gateway made (no reservations): replaced
            log.warning("the client-key limits keeper runs an older gateway's code: replacing it (its buckets stay)")
            self._limits.forget_keeper(kill=True)
        why = f"failed ({actors.reason(exc)})"
        self._down[key.id] = (time.monotonic() + KEEPER_BACKOFF_S, why)
        log.warning("the client-key limits keeper failed %s's reservation (%s); the key's calls are answered 503 for %gs",
                    key.name, actors.reason(exc), KEEPER_BACKOFF_S)
        return keeper_down(key.name, why, KEEPER_BACKOFF_S)

    def charge(self, held: "Reservation", tokens_in: int, tokens_out: int) -> Optional[Any]:
        """Send the charge of ``held``'s call to the keeper (and count it in the metrics); the keeper's answer
        (an ObjectRef), or None when it could not be sent (its reservation then runs out by itself)."""
        key = held.key
        cost = budgets.spend(held.price, tokens_in, tokens_out)
        metrics.CLIENT_TOKENS.labels(key.name, "in").inc(tokens_in)
        metrics.CLIENT_TOKENS.labels(key.name, "out").inc(tokens_out)
        metrics.CLIENT_SPEND.labels(key.name).inc(cost)
        try:
            return actors.send(self.keeper(), "settle", held.rid, key.id, key.name, held.chat_name, tokens_in, tokens_out,
                               cost, key.limits())
        except Exception as exc:  # noqa: BLE001 - the answer is in hand
            log.warning("could not settle a call of %s with the limits keeper: %s", key.name, actors.reason(exc))
            return None

    async def settle(self, held: "Reservation", tokens_in: int, tokens_out: int) -> None:
        """Charge ``held``'s call, written by the keeper before this returns: at most ``_SETTLE_WAIT_S``, then
        the answer goes, and the keeper writes it when it answers (logged)."""
        ref = self.charge(held, tokens_in, tokens_out)
        if ref is None:
            return
        task = asyncio.ensure_future(actors.resolve(ref))
        done, _ = await asyncio.wait((task,), timeout=_SETTLE_WAIT_S)
        if not done:
            task.add_done_callback(_consume)
            log.warning("the client-key limits keeper did not write a call of %s within %gs: the answer goes now, the "
                        "keeper writes it when it answers", held.key.name, _SETTLE_WAIT_S)
        elif task.exception() is not None:
            log.warning("the client-key limits keeper failed to settle a call of %s: %s", held.key.name,
                        actors.reason(task.exception()))

    def release(self, held: "Reservation") -> None:
        try:
            actors.send(self.keeper(), "release", held.rid)
        except Exception as exc:  # noqa: BLE001 - it runs out by itself (its ttl)
            log.warning("could not give back a reservation of %s: %s", held.key.name, actors.reason(exc))


class Reservation:
    """One endpoint call's hold on its key's tokens and budgets (``Reservations.reserve``), until it is settled
    (its usage charged) or released (nothing charged). Each ends once; later ends do nothing.

    ``count`` the pieces of a stream as they pass: a stream that ends without its usage (the caller
    left, it was cut) is charged the input estimate and what was streamed (``budgets.counted``).
    """

    __slots__ = ("_books", "key", "rid", "chat_name", "price", "estimate", "pieces", "text_bytes", "ended")

    def __init__(self, books: Reservations, key: ClientKey, rid: str, chat_name: str, price: tuple[float, float],
                 estimate: int) -> None:
        self._books, self.key, self.rid, self.chat_name, self.price = books, key, rid, chat_name, price
        self.estimate = estimate
        self.pieces = 0
        self.text_bytes = 0
        self.ended = False

    def count(self, event: Any) -> None:
        """A piece of the answer passed (a ``Delta`` or ``ToolCallDelta``)."""
        text = getattr(event, "text", None)
        if text is None:
            text = json.dumps(getattr(event, "tool_calls", None) or [], ensure_ascii=False)
        self.pieces += 1
        self.text_bytes += len(text.encode("utf-8"))

    def _end(self) -> bool:
        if self.ended:
            return False
        self.ended = True
        return True

    async def settle(self, usage: Any, output: str = "") -> None:
        """Charge the answer's ``usage`` (``schemas.Usage``; none reported: the estimate and the output
        counted), written before this returns (see ``Reservations.settle``)."""
        if self._end():
            out = budgets.counted(self.pieces, self.text_bytes + len(output.encode("utf-8")))
            await self._books.settle(self, *budgets.charged(usage, self.estimate, out))

    def charge_streamed(self) -> None:
        """The call ended without its usage (abandoned, cut, its caller left): the input estimate and
        the output counted so far are charged (sent, not waited for)."""
        if self._end():
            ref = self._books.charge(self, self.estimate, budgets.counted(self.pieces, self.text_bytes))
            if ref is not None:
                actors.when_answered(ref, lambda error: _logged(error, self.key.name))

    def release(self) -> None:
        """The call failed, or was not made: nothing is charged, the hold goes back."""
        if self._end():
            self._books.release(self)


def _count_refusal(key: ClientKey, answer: dict) -> None:
    if answer["limit"] in budgets.BUDGETS:
        metrics.BUDGET_REFUSALS.labels(key.name, answer["limit"]).inc()


def _consume(task: "asyncio.Future") -> None:
    """(a done callback) Read a task's outcome nobody waits for any more, so asyncio does not log it."""
    if not task.cancelled():
        task.exception()


def _logged(error: Optional[BaseException], name: str) -> None:
    """(``actors.when_answered``'s callback) A settle sent without waiting failed: logged."""
    if error is not None:
        log.warning("the client-key limits keeper failed to settle a call of %s: %s", name, actors.reason(error))


def _num(x: float) -> str:
    """A limit or an amount as people read it: 140, 0.25, 0.000125 (never 1.4e+02)."""
    if float(x).is_integer():
        return str(int(x))
    return format(round(x, 6), "f").rstrip("0").rstrip(".") or "0"


_BUDGET_WORDS = {"tokens_per_day": "daily token budget", "tokens_per_month": "monthly token budget",
                 "spend_per_month": "monthly spend budget"}


def _over(key: ClientKey, answer: dict) -> GatewayError:
    """The keeper's refusal (``budget_books.Books.reserve``) in words: ``rate_limited`` for tokens_per_minute,
    ``budget_exceeded`` for a budget (until its reset, named in ISO 8601 UTC)."""
    limit, wait = answer["limit"], max(1.0, answer["wait"])
    allowed, used, held, after = _num(answer["allowed"]), _num(answer["used"]), _num(answer["held"]), whole_seconds(wait)
    if limit == "tokens_per_minute":
        if answer["kind"] == "spent":
            text = f"{key.name} is over its {allowed} tokens a minute: try again in {after}s"
        else:
            text = (f"{key.name}'s {allowed} tokens a minute are held by its calls in flight ({held} tokens reserved): "
                    f"try again in {after}s")
        return GatewayError("rate_limited", text, retry_after=wait)
    what = _BUDGET_WORDS[limit]
    if answer["kind"] == "spent":
        text = (f"{key.name} has used its {what} ({limit} {allowed}, used {used}); it resets at {answer['resets_at']}: "
                f"try again then (in {after}s), or ask the gateway's operator to raise {limit} in GATEWAY_API_KEYS_FILE")
    else:
        text = (f"{key.name}'s {what} ({limit} {allowed}) is held by its calls in flight (used {used}, reserved {held}): "
                f"try again in {after}s (it resets at {answer['resets_at']})")
    return GatewayError("budget_exceeded", text, retry_after=wait)
