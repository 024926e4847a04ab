"""What the gateway's side holds the limits keeper to: how long a caller waits for it, and the 503 after.

The request rate's leases (``gateway.rate_leases``) and the reservations of tokens and budgets
(``gateway.reservations``) both ask the keeper (``gateway.keeper``, a Ray actor) before a call is
made, and answer the key's callers the same way when it does not answer in time or fails. Kept
apart from the actor so that both import without Ray.
"""
from __future__ import annotations

from contract.errors import GatewayError, whole_seconds

#: how long a caller waits for the keeper to answer a lease or a reservation (a restart by Ray usually
#: fits); past it the key's calls are answered 503 ``cluster_unavailable`` at once (see ``gateway.limits``)
KEEPER_WAIT_S = 3.0
#: after the keeper failed a key's request, its calls are answered 503 at once for this long
KEEPER_BACKOFF_S = 2.0


def keeper_down(name: str, what: str, retry_after: float) -> GatewayError:
    """503 for a call of the key named ``name`` that the keeper could not admit (it ``what``): nothing was called."""
    return GatewayError("cluster_unavailable", f"the cluster's client-key limits keeper {what}, so {name}'s call "
                        f"was not made (no upstream was called); try again in {whole_seconds(retry_after)}s",
                        retry_after=max(1.0, retry_after))
