"""Client-key limits that hold for the whole cluster: upstream calls a minute, tokens, budgets and spend per key.

Everything is kept by one small detached actor (``gateway.keeper``, on the head node) that every
gateway process shares, so W gunicorn workers in P pods give a caller its limits once, not
W x P times, and a restarted worker does not start afresh. Two mechanisms:

**The request rate** (``rate_per_minute``): a token bucket of the keeper's, leased to each process
about a second of the rate at a time and spent locally (``gateway.rate_leases``, which says how);
every endpoint the dispatcher actually calls takes one request just before the call, a replica's
own retries are charged after the answer.

**Tokens and budgets** (``tokens_per_minute``, ``tokens_per_day``, ``tokens_per_month``,
``spend_per_month``): each endpoint call *reserves* what it may cost at most before it is made
(``Caller.reserve``: its input estimate plus its ``max_tokens``, at the endpoint's price; see
``gateway.budgets``, and ``gateway.reservations`` for this process's part) and is *settled* with
its real usage after it: a whole answer before it is returned, a stream when its ``Finish``
arrives (before the caller sees it). The keeper admits a
call only while used + reserved by calls in flight is under each limit, so concurrency cannot
overshoot: what is charged ends at most one call's usage past a limit. A stream the caller
abandons is charged its input estimate and the output it streamed (``budgets.counted``: the
pieces received or the text's bytes / 4, whichever is more); a stream cut mid-way, the same; a
call that failed, or was never made (its endpoint busy), gives its reservation back; a whole
call whose caller left mid-way is charged its input estimate. Over ``tokens_per_minute``:
``rate_limited``; over a budget: ``budget_exceeded`` (429) with ``Retry-After`` until the reset
(UTC day or month start) and the reset time in the message; a call refused only because calls
in flight hold the rest is told to try again in a second. The keeper keeps what was used in
SQLite on the head node's disk (``GATEWAY_STATE_DIR``, ``budget_books.Books``): it survives ``kill -9``
of the keeper and a restart of the head. Each reservation and settle is one actor round trip
(two per call): only keys with a token limit or a budget pay it. A refusal for a spent
limit is remembered locally (for at most a minute), so a caller hammering past its budget
costs the keeper little.

A slow or stopped keeper costs a key's callers little and the rest nothing: a process asks for at
most one lease per key at a time, and never while holding an endpoint's seat (the dispatcher admits
before it takes one). The caller that asks waits up to ``KEEPER_WAIT_S`` (``gateway.keeper_terms``)
for the answer, the key's other callers meanwhile at most ``rate_leases._WAITER_WAIT_S``; past that,
and while the request stays unanswered, the key's calls are answered at once with 503
``cluster_unavailable`` (with ``Retry-After``; no upstream is called). A keeper that fails the
request (rather than being slow) is left alone for ``KEEPER_BACKOFF_S``, its key's calls answered
the same way. The answer, whenever it comes, is used: a keeper that resumes serves the key again at
once. A reservation gets the same ``KEEPER_WAIT_S`` (then 503, and it is given back); a settle that
is not written within 10 s lets the answer go (logged), and is written when the keeper answers (Ray
retries it on the restarted keeper; settles are idempotent). Keys without limits, and other keys'
leases, never wait for it.

The keeper knows keys only by ``ClientKey.id`` (a hash that leads back to no key), and
their limits come with each call, so it holds nothing secret and needs no configuration
but where its ledger lives (``GATEWAY_STATE_DIR``, given by the gateway that makes it).

Ray: this module finds the keeper (``gateway.keeper``); the leases and the reservations are written
against its handle, and every call of these to it, but the leases' (``gateway.rate_leases``), goes
through ``gateway.actors``, the one of them that imports Ray.
"""
from __future__ import annotations

from typing import Any, Optional

from .auth import ClientKey
from contract.errors import GatewayError
from . import actors
from .keeper import keeper_actor
from .rate_leases import RateLeases
from .reservations import STREAM_RESERVATION_TTL_S, RESERVATION_GRACE_S, Reservation, Reservations


class Limits:
    """This process's side of the client-key limits: leases (the request rate) and reservations (tokens,
    budgets) over the cluster's ``LimitKeeper``, and the report of what keys used (``GET /usage``).

    ``lease_size`` fixes the calls per lease (``gateway.rate_leases.RateLeases``).
    """

    def __init__(self, cluster, settings, lease_size: Optional[int] = None) -> None:
        self.cluster = cluster
        self.settings = settings
        self._keeper = None
        #: the request rate (``gateway.rate_leases``)
        self.leases = RateLeases(self, lease_size)
        #: tokens and budgets (``gateway.reservations``)
        self.reservations = Reservations(self)

    def caller(self, key: Optional[ClientKey]) -> Optional["Caller"]:
        """What the dispatcher needs of a request's key; None when keys are off or the admin calls."""
        return None if key is None else Caller(self, key)

    # -- the keeper --------------------------------------------------------------------------
    def keeper(self):
        if self._keeper is None:
            self.cluster.ensure_up()
            self._keeper = keeper_actor(self.settings.ray_namespace, self.settings.state_dir)
        return self._keeper

    def forget_keeper(self, kill: bool = False) -> None:
        """Look the keeper up again on next use; ``kill``: it runs an older gateway's code (no reservations),
        so it is made again (its buckets come back from the GCS, its books from the ledger)."""
        keeper, self._keeper = self._keeper, None
        if kill and keeper is not None:
            try:
                actors.kill(keeper)
            except Exception:  # noqa: BLE001 - gone already
                pass

    def usage(self, since: str, until: str, client_key: Optional[str], chat_name: Optional[str], keys: list[ClientKey],
              timeout: float) -> dict:
        """``GET /usage`` (blocking: in a thread): the keeper's report, with the budgets of ``keys``."""
        budgeted = [{"id": k.id, "name": k.name, "limits": k.limits()} for k in keys if k.budgeted]
        try:
            return actors.call(self.keeper(), "report", since, until, client_key, chat_name, budgeted, timeout=timeout)
        except GatewayError:
            raise
        except Exception as exc:  # noqa: BLE001 - in words, never Ray's text
            if isinstance(exc, AttributeError):  # (a keeper an older gateway made: replaced for the next call)
                self.forget_keeper(kill=True)
            raise GatewayError("cluster_unavailable", f"the cluster's client-key limits keeper did not answer "
                               f"({actors.reason(exc)}); try again shortly", retry_after=2) from None


class Caller:
    """A request's client key as the dispatcher sees it: which endpoints it may reach, and its limits."""

    __slots__ = ("_limits", "key")

    def __init__(self, limits: Limits, key: ClientKey) -> None:
        self._limits, self.key = limits, key

    @property
    def name(self) -> str:
        return self.key.name

    def allows(self, chat_name: str) -> bool:
        return self.key.allows(chat_name)

    async def admit(self) -> None:
        """Before an endpoint is called (before its seat is taken): one call of the key's request rate, or
        ``rate_limited``, or ``cluster_unavailable`` when the keeper does not answer in time."""
        await self._limits.leases.admit(self.key)

    def refund(self) -> None:
        """The call ``admit`` took was not made after all (the endpoint was busy): give it back."""
        self._limits.leases.refund(self.key)

    async def reserve(self, endpoint: Any, call: Any, stream: bool = False) -> Optional[Reservation]:
        """After ``admit``, before the seat: hold what ``call`` to ``endpoint`` (``endpoint_cache.Endpoint``) may cost
        of the key's tokens and budgets; None for a key without any. The hold is let go after the
        endpoint's deadline and ``RESERVATION_GRACE_S`` (a stream's: ``STREAM_RESERVATION_TTL_S``) if its
        process never ends it."""
        if not self.key.budgeted:
            return None
        ttl = STREAM_RESERVATION_TTL_S if stream else endpoint.deadline + RESERVATION_GRACE_S
        return await self._limits.reservations.reserve(self.key, endpoint.name, endpoint.record.price, call, ttl)

    def settle(self, attempts: int, total_tokens: int = 0) -> None:
        """After it answered (or failed after retries): the retries, charged to the request rate."""
        self._limits.leases.settle(self.key, attempts, total_tokens)
