"""Keep each replica's inter-deployment gRPC server on loopback when its Ray node is on loopback.

Ray Serve binds every replica's gRPC server (the one Serve's router, so the gateway, calls the
replica on: ``GATEWAY_SERVE_GRPC``) to ``[::]:0``, all interfaces, whatever the node's address, and
has no setting for it (Ray 2.60.0, ``ray/serve/_private/replica.py``, ``Replica._on_initialized``::

    self._internal_grpc_port = add_port_to_grpc_server(self._server, "[::]:0")

). Callers dial it at the replica's node address: the replica reports ``ray.util.get_node_ip_address()``
(``ReplicaActor.is_allocated``), the controller hands it on as ``RunningReplicaInfo.node_ip``, and the
router opens ``f"{node_ip}:{port}"`` (``request_router/replica_wrapper.py``, ``RunningReplica.stub``).

The rule: a replica whose node address is loopback (``127.0.0.1``, ``::1``: the embedded head runs
``--node-ip-address=127.0.0.1`` with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) binds that server on
that same address, the one its callers dial; no other machine could reach such a node anyway. Any other
node address (a cluster joined with ``RAY_ADDRESS``, whose replicas other nodes must reach) is left
exactly as Ray sets it.

How: the replica's constructor (``gateway.replica.ChatReplica``) runs inside
``Replica.initialize`` before ``_on_initialized`` starts that server, so it
(``gateway.serve_apps.keep_replica_grpc_on_loopback``, which finds the node's address and Serve's
replica module: this module imports no Ray) swaps the name
``add_port_to_grpc_server`` in Serve's replica module, in its own process only, for a wrapper that
rewrites the address of that one call (``[::]:0`` to ``127.0.0.1:0``), calls Ray's helper (which keeps
``RAY_USE_TLS`` working), and puts Ray's helper back. It does so only if Ray's source still makes
exactly that call; otherwise it logs one warning and changes nothing (Ray's own bind stands), and
``tests/test_ray_doors.py`` fails, so a Ray upgrade that moves this code is caught.
"""
from __future__ import annotations

import inspect
import ipaddress
import logging
from types import ModuleType
from typing import Optional

log = logging.getLogger("ray.serve")

ANY_ADDRESS = "[::]:0"


def loopback_bind_address(node_ip: Optional[str]) -> Optional[str]:
    """Where a replica on a node with address ``node_ip`` binds its gRPC server instead of
    ``[::]:0``; ``None``: leave Ray's bind as it is (not a loopback address)."""
    try:
        addr = ipaddress.ip_address((node_ip or "").strip("[]"))
    except ValueError:  # a host name, or nothing: not ours to judge
        return None
    if not addr.is_loopback:
        return None
    return f"[{addr}]:0" if addr.version == 6 else f"{addr}:0"


def rewrite_bind_once(serve_replica: ModuleType, bind: str, upstream_call: str, ray_version: str) -> bool:
    """Make the next ``[::]:0`` bind of Serve's replica module (``serve_replica``, Ray's
    ``ray.serve._private.replica`` in this process) bind on ``bind`` instead, if Ray's
    ``Replica._on_initialized`` still makes exactly ``upstream_call``. True: in place (or already
    was); False: nothing changed (one warning logged)."""
    original = getattr(serve_replica, "add_port_to_grpc_server", None)
    if getattr(original, "gateway_loopback", False):
        return True  # already in place (a second constructor in this process)
    try:
        source = inspect.getsource(serve_replica.Replica._on_initialized)
    except (AttributeError, OSError, TypeError):
        source = ""
    if original is None or upstream_call not in source:
        log.warning(
            "Ray %s does not start Serve replicas' gRPC servers as the gateway expects (%s in "
            "ray/serve/_private/replica.py Replica._on_initialized); this replica's gRPC server listens on "
            "all interfaces. Update gateway/loopback.py for this Ray version.",
            ray_version, upstream_call)
        return False

    def add_port_to_grpc_server(server, address):
        if address == ANY_ADDRESS:
            serve_replica.add_port_to_grpc_server = original  # this one call only
            address = bind
        return original(server, address)

    add_port_to_grpc_server.gateway_loopback = True
    serve_replica.add_port_to_grpc_server = add_port_to_grpc_server
    return True
