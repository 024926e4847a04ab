"""The key pools keeper as a Ray actor, and the gateway's side of it (``KeyPools``).

The keeper's logic is ``gateway.pool_keeper.Keeper`` (pure); it runs as a detached actor (named
``key_pools`` in the gateway's namespace, on the head node like the endpoint registry and the limits
keeper: ``gateway.actors.named_actor``), found by ``keeper_actor``. The gateway puts and drops an
endpoint's pool at deploy and undeploy, reads them for the listings and edits them
(``gateway.key_routes``), each a blocking call with a timeout (``KeyPools.ask``); a replica syncs with it
(``gateway.pool_member``). Every call to the keeper is made here or there, through ``gateway.actors``.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Optional

from pydantic import SecretStr

from contract.errors import GatewayError
from . import actors
from .actors import ActorCallFailed
from .pool_keeper import PROTOCOL, Keeper

log = logging.getLogger("gateway.key_pools")

KEEPER_NAME = "key_pools"
#: how long one call to the keeper may take
CALL_S = 10.0
#: how long a listing waits for the keeper (then it shows the pools' sizes only)
_VIEWS_S = 2.0


def keeper_actor(namespace: str):
    """The key pools keeper of this cluster (created on first use, on the head node): a detached actor, which
    Ray restarts when its process dies (its pools come back from the replicas)."""
    return actors.named_actor(Keeper, KEEPER_NAME, namespace)


class KeyPools:
    """The gateway's side: puts and drops an endpoint's pool at deploy and undeploy, reads them for the
    listings, and edits them (``gateway.key_routes``). One per gateway process (``Endpoints.key_pools``)."""

    def __init__(self, cluster: Any, settings: Any) -> None:
        self.cluster, self.settings = cluster, settings
        self._keeper = None

    def keeper(self):
        if self._keeper is None:
            self.cluster.ensure_up()
            keeper = keeper_actor(self.settings.ray_namespace)
            for _ in range(50):
                try:
                    if actors.call(keeper, "protocol", timeout=CALL_S) == PROTOCOL:
                        break
                except (AttributeError, ActorCallFailed) as exc:  # (older than protocols; or just killed)
                    if isinstance(exc, ActorCallFailed) and not exc.died:
                        raise
                    time.sleep(0.1)
                    keeper = keeper_actor(self.settings.ray_namespace)
                    continue
                # (its pools come back from the replicas, which seed the new one)
                log.warning("the key pools keeper runs an older gateway's code: replacing it")
                actors.kill(keeper)
                time.sleep(0.1)  # (the name is free once the GCS has seen it die)
                keeper = keeper_actor(self.settings.ray_namespace)
            self._keeper = keeper
        return self._keeper

    def ask(self, method: str, *args: Any, timeout: float = CALL_S, **kwargs: Any) -> Any:
        """One call to the keeper; ``cluster_unavailable`` when it does not answer."""
        try:
            return actors.call(self.keeper(), method, *args, timeout=timeout, **kwargs)
        except GatewayError:
            raise
        except Exception as exc:  # noqa: BLE001 - a keeper being restarted, a lost cluster
            self._keeper = None
            raise GatewayError("cluster_unavailable", f"the key pools keeper did not answer ({actors.reason(exc)}); "
                               f"try again shortly", retry_after=2) from None

    def put(self, spec: Any, generation: str) -> None:
        """Put ``spec``'s pool as ``generation`` (before Serve starts its replicas). Best effort: replicas
        that find no pool in the keeper seed it with theirs."""
        try:
            self.ask("put", spec.chat_name, generation, template_of(spec),
                     [(SecretStr(key), weight) for key, weight in spec.pool()])
        except GatewayError as err:
            log.warning("key pool of %s not put (its workers will seed it): %s", spec.chat_name, err.info.message)

    def drop(self, chat_name: str) -> None:
        try:
            self.ask("drop", chat_name, time.time())
        except GatewayError as err:
            log.warning("key pool of %s not dropped: %s", chat_name, err.info.message)

    def views(self, names: Optional[list[str]] = None) -> dict[str, list[dict]]:
        """The key views of ``names``' pools (what listings show); nothing when the keeper does not answer soon."""
        try:
            return self.ask("views", names, timeout=_VIEWS_S)
        except GatewayError:
            return {}


def template_of(spec: Any) -> bytes:
    """``spec`` without its keys, pickled: the keeper keeps it as bytes (it never needs a provider's classes)."""
    return actors.pickled(spec.for_key(""))
