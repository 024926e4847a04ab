"""The limits keeper: one small detached actor that keeps every client key's limits for the whole cluster.

Made on first use by the gateway process that needs it (``keeper_actor``), on the head node, in the
gateway's namespace; restarted by Ray whenever its process dies (``max_restarts=-1``), and the calls
that were in flight then are sent again to the restarted one (``max_task_retries=-1``: settles are
idempotent, reservations too). It keeps the request rates' buckets (``gateway.rate_leases``: leases,
written through to the GCS) and the books of tokens and budgets (``gateway.budget_books``: SQLite on the
head node's disk, under ``GATEWAY_STATE_DIR``; ``gateway.reservations`` is the gateway's side).

It knows keys only by ``ClientKey.id`` (a hash that leads back to no key) and their names; their
limits come with each call, so it holds nothing secret and needs no configuration but where its
ledger lives (given by the gateway that makes it).

This is the actor's side of the client-key limits: its class (plain Python, made the detached actor by
``gateway.actors``, as the other named actors are) and how a process finds it (``keeper_actor``); only
``gateway.limits`` imports it. The gateway's side (``gateway.rate_leases``, ``gateway.reservations``,
``gateway.keeper_terms``) and the books (``gateway.budget_books``) import no Ray; their calls to it
go through ``gateway.actors``.
"""
from __future__ import annotations

import json
import time
from typing import Optional

from . import actors, budgets
from .budget_books import Books

KEEPER_NAME = "client_limits"


class LimitKeeper:
    """The request-rate buckets of every limited key, by key id (``{"requests", "tokens", "at"}``), and the
    books of tokens and budgets. (This gateway reserves tokens apart, through the books, and leases with
    ``tpm`` None; the buckets' tokens serve gateway processes of the previous version during an upgrade.)

    Restarted by Ray whenever its process dies; each bucket is read back from the GCS the
    first time it is used again. (A call retried after a restart may be charged twice:
    limits err on the side of refusing.) Tokens and budgets are its ``budget_books.Books``, in
    SQLite under ``state_dir`` (resolved here, on the head node), opened on first use.
    """

    def __init__(self, state_dir: Optional[str] = None) -> None:
        self._kv_namespace = "llm_gateway_limits:" + actors.runtime_namespace()
        self._buckets: dict[str, dict] = {}
        self._books = Books(budgets.ledger_path(state_dir))

    def _bucket(self, kid: str, rpm: Optional[float], tpm: Optional[float]) -> dict:
        """The bucket of ``kid``, refilled to now under the limits the caller has (a key seen for
        the first time, or a limit just added, starts full)."""
        now = time.time()
        bucket = self._buckets.get(kid)
        if bucket is None:
            raw = actors.kv_get(kid, self._kv_namespace)
            bucket = json.loads(raw) if raw else {"requests": None, "tokens": None, "at": now}
            self._buckets[kid] = bucket
        elapsed = max(0.0, now - bucket["at"])
        bucket["at"] = now
        for part, per_minute in (("requests", rpm), ("tokens", tpm)):
            if per_minute is None:
                bucket[part] = None
            elif bucket[part] is None:
                bucket[part] = max(per_minute, 1.0)
            else:
                bucket[part] = min(max(per_minute, 1.0), bucket[part] + elapsed * per_minute / 60.0)
        return bucket

    def _save(self, kid: str, bucket: dict) -> None:
        actors.kv_put(kid, json.dumps(bucket), self._kv_namespace)

    def lease(self, kid: str, rpm: Optional[float], tpm: Optional[float], want: int, calls_back: float,
              tokens_used: float) -> tuple[int, Optional[float], float, str]:
        """Settle what the caller owes or returns, then lease up to ``want`` calls.

        ``calls_back``: what the last lease left unspent, less the retries charged since (may be
        negative); ``tokens_used``: tokens charged since the last flush. Answers ``(calls granted,
        token balance, seconds to wait, "requests" | "tokens" | "")``; 0 calls granted is a refusal
        (a key with no request rate gets ``want``).
        """
        bucket = self._bucket(kid, rpm, tpm)
        if rpm is not None and calls_back:
            bucket["requests"] = min(max(rpm, 1.0), bucket["requests"] + calls_back)
        if tpm is not None:
            bucket["tokens"] -= tokens_used
        granted, wait, why = 0, 0.0, ""
        if tpm is not None and bucket["tokens"] <= 0:
            wait, why = (1.0 - bucket["tokens"]) * 60.0 / tpm, "tokens"
        elif rpm is not None and bucket["requests"] < 1:
            wait, why = (1.0 - bucket["requests"]) * 60.0 / rpm, "requests"
        elif rpm is not None:
            granted = min(want, int(bucket["requests"]))
            bucket["requests"] -= granted
        else:
            granted = want
        self._save(kid, bucket)
        return granted, bucket["tokens"], wait, why

    def charge(self, kid: str, rpm: Optional[float], tpm: Optional[float], requests: float, tokens: float) -> None:
        """After the fact: a replica's retries (``requests``) and an answer's usage (``tokens``)."""
        bucket = self._bucket(kid, rpm, tpm)
        if rpm is not None:
            bucket["requests"] -= requests
        if tpm is not None:
            bucket["tokens"] -= tokens
        self._save(kid, bucket)

    # -- tokens and budgets (``gateway.budget_books``) ---------------------------------------------
    def reserve(self, rid: str, kid: str, limits: dict, tokens: float, cost: float, ttl: float) -> dict:
        return self._books.reserve(rid, kid, limits, tokens, cost, ttl)

    def settle(self, rid: str, kid: str, name: str, chat_name: str, tokens_in: int, tokens_out: int, cost: float,
               limits: dict) -> bool:
        return self._books.settle(rid, kid, name, chat_name, tokens_in, tokens_out, cost, limits)

    def release(self, rid: str) -> None:
        self._books.release(rid)

    def report(self, since: str, until: str, client_key: Optional[str], chat_name: Optional[str],
               budgeted: list[dict]) -> dict:
        return self._books.report(since, until, client_key, chat_name, budgeted)


def keeper_actor(namespace: str, state_dir: Optional[str] = None):
    """The limits keeper of this cluster (created on first use, on the head node like the registry).

    ``state_dir`` (``GATEWAY_STATE_DIR``) is where the keeper made now keeps its ledger; one that
    exists already keeps the one it was made with (Ray restarts it with the same).
    """
    return actors.named_actor(LimitKeeper, KEEPER_NAME, namespace, state_dir)
