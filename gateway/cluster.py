"""Each gateway process's connection to the Ray cluster: the one place where Ray is initialised.

``Cluster`` connects lazily (after fork), starts Serve without an HTTP proxy (the gateway calls handles),
and turns every way of failing to reach the cluster into ``cluster_unavailable``; its watchdog declares the
cluster lost, and back. The embedded head is ``gateway.head``; Ray's process-wide switches are
``gateway.ray_switches``; answers bounded in time and shared by callers, ``gateway.cluster_answers``.
"""
from __future__ import annotations

import copy
import logging
import os
import platform
import sys
import threading
import time
from typing import Callable, Optional

from .cluster_answers import _CALL_TIMEOUT_S, SharedAnswer, _bounded, describe_connect_error, version_problems
from .config import Settings
from contract.errors import GatewayError
from .head import PROJECT_ROOT, _host_port, reachable
from .ray_switches import LOOPBACK_SWITCH, is_loopback, quiet_ray_noise, ray_on_loopback

log = logging.getLogger("gateway.cluster")


#: The most a gateway process takes in one gRPC message from a replica: gRPC's own maximum (2 GiB - 1).
#: Serve's router makes its channel to each replica with ``RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH``
#: as its receive limit, 4 MiB by default: an answer the provider billed that is larger (a long output,
#: images in base64) failed as 413. The replica is the gateway's own code and already holds the whole
#: answer, so a smaller limit here protects nothing. (The replicas' own limit, on what the gateway sends
#: them, is set per endpoint: ``providers.base``, 4 x GATEWAY_MAX_BODY_BYTES, at least 4 MiB.)
ANSWER_GRPC_LIMIT = (2 << 30) - 1


def take_answers_of_any_size() -> None:
    """Let this process's Serve routers receive answers up to ``ANSWER_GRPC_LIMIT`` from replicas over gRPC.

    Serve reads the setting once, at import (the gunicorn master imported it before forking), and its
    router reads its module's copy when it opens a channel to a replica: both are set. Not in this
    process's environment: that would reach the Ray head's (and so the replicas') too. Idempotent.
    """
    import ray.serve._private.constants as constants
    import ray.serve._private.request_router.replica_wrapper as replica_wrapper

    for module in (constants, replica_wrapper):
        module.RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH = ANSWER_GRPC_LIMIT


class Cluster:
    """One gateway process's connection to Ray; connects lazily and thread-safely."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._registry = None
        #: the cluster went away after we connected; a Ray driver cannot reconnect in-process
        self.lost = False
        #: this process left the cluster at its end (``disconnect``): nothing of it connects again
        self.closed = False
        #: called once when the cluster answers again but this process's connection does not: it
        #: was restarted (gunicorn: restart this worker, whose successor connects afresh)
        self.on_recovered: Optional[Callable[[], None]] = None
        self._watching = False  # the watchdog runs (see ``_watch``)
        self._probing = threading.Lock()  # one liveness look at a time (see ``node_gone``)
        #: what ``readiness`` answers, shared by this process's callers
        self._ready = SharedAnswer(self._look_ready, "Serve's controller or the endpoint registry",
                                   fresh_s=_READY_FRESH_S, wait_s=_READY_WAIT_S)

    def ensure_up(self) -> None:
        """Connect if needed; fail at once, without touching Ray, when the cluster is gone (or this process left it)."""
        if self.closed:
            raise _stopping()
        if self.lost:
            raise GatewayError(
                "cluster_unavailable", f"the Ray cluster at {self.address} stopped answering; the gateway reconnects when it is back: "
                f"try again shortly",
                retry_after=2,
            )
        self.connect()

    def _watch(self, address: str) -> None:
        """Declare the cluster lost, or back; log each decision.

        Lost: ``_LOSS_LOOKS`` failed connects in a row over at least ``_LOSS_AFTER_S``, and a call
        through this process's connection that fails too (one refused connect is no outage; while
        calls work, requests are served). Back: the address accepts connections again after any
        failed look; if calls through the connection work and the cluster still knows this
        process's node, this process carries on, else the cluster was restarted (however briefly)
        and ``on_recovered`` runs: a fresh process connects.
        """
        import ray

        misses, last_ok, carried_on = 0, time.monotonic(), False
        while True:
            time.sleep(_WATCH_PERIOD_S)
            if not ray.is_initialized():  # this process left the cluster on purpose (ray.shutdown): nothing to watch
                self._watching = False
                return
            if reachable(address, _WATCH_PERIOD_S):
                if self.lost or (misses and self._registry is not None):
                    if self._answers() and not self._restarted(address):
                        if self.lost:
                            log.warning("the Ray cluster at %s answers again, and so does this process's connection; "
                                        "serving again", address)
                        self.lost = False
                    else:
                        self.lost = True
                        log.warning("the Ray cluster at %s answers again but this process's connection does not (a restarted "
                                    "cluster); this process reconnects by restarting", address)
                        if self.on_recovered is not None:
                            self.on_recovered()
                        return
                misses, last_ok, carried_on = 0, time.monotonic(), False
                continue
            if self.lost:
                continue
            misses += 1
            down_s = time.monotonic() - last_ok
            if misses < _LOSS_LOOKS or down_s < _LOSS_AFTER_S:
                continue
            if self._answers():
                if not carried_on:
                    log.warning("the Ray cluster at %s refused %d connects in %.1fs, but a call through this process's "
                                "connection works; carrying on", address, misses, down_s)
                carried_on = True
                continue
            self.lost = True
            log.error("the Ray cluster at %s refused %d connects in %.1fs and a call through this process's connection "
                      "failed: lost; requests get 503 cluster_unavailable", address, misses, down_s)

    def _restarted(self, address: str) -> bool:
        """Is the cluster that answers at ``address`` another one than this process joined?

        After a head restart the old head's actors can outlive its GCS for a moment, so a call
        through this process's connection may still work while the address already answers
        for a new cluster; then nothing would ever look again. The new cluster does not know
        this process's node: that tells them apart (a network blip keeps the node alive).
        """
        return _bounded(lambda: _no_live_node(address), _CALL_TIMEOUT_S + 1) is True

    def _answers(self) -> bool:
        """Does a call through this process's connection work? (the registry's ``versions``; a hung call is a no)"""
        from .registry_client import RegistryClient

        if self._registry is None:  # not connected yet: nothing to serve, the failed connects decide
            return False
        client = RegistryClient(self, _CALL_TIMEOUT_S)
        return bool(_bounded(lambda: client.versions(as_connected=True), _CALL_TIMEOUT_S + 1))

    def node_gone(self) -> Optional[bool]:
        """Is this process's Ray node gone while the cluster answers? (None: cannot tell now)

        A Ray driver works only through a raylet on its own host. In a gateway pod that is the
        pod's own ``ray start``: once it is gone, nothing in the pod can work with the cluster
        again until the pod restarts. The node is the one this process connected through or,
        before it connected, any raylet running on this host. A cluster that does not answer is
        not a gone node (restarting would not bring it back), nor is a brief head restart once
        its raylet registers again.
        """
        address = self.address
        if not address or _host_port(address) is None or not reachable(address, 0.5):
            return False
        if not self._probing.acquire(blocking=False):
            return None  # the previous look still waits on the cluster

        def look() -> bool:
            try:
                return _no_live_node(address)
            finally:
                self._probing.release()

        return _bounded(look, _CALL_TIMEOUT_S + 1)

    @property
    def address(self) -> Optional[str]:
        return self.settings.ray_address or os.environ.get("RAY_ADDRESS") or None

    @property
    def connected(self) -> bool:
        return self._registry is not None

    def disconnect(self) -> None:
        """Leave the cluster at this process's end, its requests answered: ``ray.shutdown()``, which Ray's own exit
        hook would run anyway, but after pausing half a second for a driver's log lines to print (this one prints
        none: ``log_to_driver=False``), on every stop of every gateway process. The driver disconnects all the same;
        the watchdog ends; from here on ``ensure_up`` and ``connect`` fail at once (``cluster_unavailable``), so a
        startup still retrying (``Gateway.startup``) touches Ray no more, and cannot begin to apply the endpoints
        file while the process ends. Idempotent; Ray is not imported for it."""
        self.closed = True
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()  # (waits for a connect in progress: they share Ray's lock)

    def registry(self):
        """The endpoint registry actor (connecting first if needed)."""
        if self._registry is None:
            self.connect()
        return self._registry

    def connect(self) -> None:
        if self.closed:
            raise _stopping()
        if self._registry is not None:
            return
        with self._lock:
            if self._registry is not None:
                return
            import ray
            from ray import serve

            from .registry import registry_actor

            address = self.address
            if not address:
                raise GatewayError("cluster_unavailable", "no Ray cluster is configured (set RAY_ADDRESS or start the gateway with its embedded head)")
            if address.startswith("ray://"):
                raise GatewayError("cluster_unavailable", "Ray Client addresses (ray://) cannot call Serve handles; run the gateway on a cluster node and use host:port")
            if not reachable(address):
                raise GatewayError("cluster_unavailable", f"the Ray cluster at {address} is not reachable: start it (or set RAY_ADDRESS to "
                                   f"a running head), then try again", retry_after=2)
            quiet_ray_noise()
            take_answers_of_any_size()
            hp = _host_port(address)
            if hp is not None and is_loopback(hp[0]) and LOOPBACK_SWITCH not in os.environ:
                ray_on_loopback()  # (a head on loopback: else Ray rewrites the address to this host's and never connects)
            try:
                if not ray.is_initialized():
                    ship = self.settings.ship_code if self.settings.ship_code is not None else True
                    ray.init(
                        address=address,
                        namespace=self.settings.ray_namespace,
                        runtime_env={"py_modules": [str(PROJECT_ROOT / m) for m in ("contract", "gateway", "providers")]} if ship else None,
                        log_to_driver=False,
                        logging_level=logging.WARNING,
                        configure_logging=False,
                    )
                if not self._watching and _host_port(address) is not None:
                    # from here on this process is a driver of that cluster: watch it, even if
                    # the rest of the connect fails (a driver cannot reconnect in-process)
                    self._watching = True
                    threading.Thread(target=self._watch, args=(address,), name="ray-watchdog", daemon=True).start()
                serve.start(proxy_location="Disabled")
                self._registry = registry_actor(self.settings.ray_namespace)
            except GatewayError:
                raise
            except Exception as exc:  # noqa: BLE001 - report why, in words
                if self.closed:  # (left meanwhile: what failed is Ray, shut down under it)
                    raise _stopping() from None
                raise GatewayError("cluster_unavailable", describe_connect_error(exc, address), retry_after=2) from None

    def readiness(self) -> tuple[bool, dict]:
        """What ``/readyz`` reports: cluster reachable, Serve up, versions equal; when not ready,
        ``reason`` (``cluster_unavailable``, ``version_mismatch``) and ``problem`` (in words).

        One look a second at most for the whole process, shared by every caller (``SharedAnswer``):
        a burst of probes never piles threads up on a cluster that does not answer, and each
        caller is answered within ``_READY_WAIT_S`` (a look that takes longer: not ready). A process
        not connected yet connects first, in the caller's thread, as every other route does (served
        processes answer "starting" until they are connected, without asking this); a lost cluster
        is not ready at once, whatever was seen a moment ago.
        """
        try:
            if not self.connected or self.lost:
                self.ensure_up()
            ok, report = self._ready.get()
        except GatewayError as err:  # (no connection, or no answer in time)
            return False, {"ray_address": self.address, "gateway": _local_versions(),
                           "reason": "cluster_unavailable", "problem": err.info.message}
        return ok, copy.deepcopy(report)  # (callers change their copy: /readyz pops ``problem``)

    def _look_ready(self) -> tuple[bool, dict]:
        """One look for ``readiness``; each call to the cluster within ``_CALL_TIMEOUT_S``."""
        local = _local_versions()
        report: dict = {"ray_address": self.address, "gateway": local}
        try:
            from .registry_client import RegistryClient

            cluster = RegistryClient(self, _CALL_TIMEOUT_S).versions()  # (connected first: ``ensure_up``)
            report["cluster"] = cluster
            serve_answers(_CALL_TIMEOUT_S)
            report["serve"] = "running"
        except GatewayError as err:
            report.update(reason="cluster_unavailable", problem=err.info.message)
            return False, report
        except Exception as exc:  # noqa: BLE001
            report.update(reason="cluster_unavailable", problem=f"the cluster did not answer ({type(exc).__name__})")
            return False, report
        problems = version_problems(local, cluster)
        if problems:
            report.update(reason="version_mismatch", problem="; ".join(problems))
            return False, report
        return True, report


def _stopping() -> GatewayError:
    return GatewayError("cluster_unavailable", "this gateway process is stopping: it left the Ray cluster", retry_after=2)


#: the watchdog looks every _WATCH_PERIOD_S; see ``Cluster._watch``
_WATCH_PERIOD_S = 0.5
_LOSS_LOOKS = 3
_LOSS_AFTER_S = 1.5

#: ``Cluster.readiness``: one look is reused this long, and a caller waits at most this long for one
_READY_FRESH_S = 1.0
_READY_WAIT_S = 1.5


def serve_answers(timeout: float) -> None:
    """Does Serve's controller answer within ``timeout``? (raises when not: ``GetTimeoutError``, ``RayActorError``)

    ``serve.status()`` would ask for every application's details and wait for them forever.
    """
    import ray
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        raise GatewayError("cluster_unavailable", "Serve's controller is not running in the Ray cluster", retry_after=2)
    ray.get(client._controller.check_alive.remote(), timeout=timeout)


def _local_versions() -> dict:
    import ray

    return {"ray": ray.__version__, "python": platform.python_version()}


def _no_live_node(address: str) -> bool:
    """True when the cluster at ``address`` has no live node for this process (see ``Cluster.node_gone``)."""
    import ray
    from ray._private.services import find_node_ids
    from ray._raylet import GcsClient, NodeID
    from ray.core.generated.gcs_pb2 import GcsNodeInfo
    from ray.core.generated.gcs_service_pb2 import GetAllNodeInfoRequest

    ids = {ray.get_runtime_context().get_node_id()} if ray.is_initialized() else find_node_ids()
    if not ids:
        return True  # no raylet at all on this host
    selectors = [GetAllNodeInfoRequest.NodeSelector(node_id=NodeID.from_hex(i).binary()) for i in ids]
    alive = GcsClient(address=address).get_all_node_info(
        timeout=_CALL_TIMEOUT_S, node_selectors=selectors, state_filter=GcsNodeInfo.GcsNodeState.ALIVE)
    return not alive

