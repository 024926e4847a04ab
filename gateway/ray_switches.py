"""Ray's process-wide switches, which Ray reads once, at import: set by every gateway process.

The gunicorn master (or ``python app.py``) imports Ray before it forks the workers, so each switch
is set twice: in the environment (for what this process starts, and a Ray not imported yet) and in
the module of Ray's that already read it. Nothing here imports Ray: the head (``gateway.head``),
the connection (``gateway.cluster``) and ``python -m gateway status`` use these before Ray runs.
"""
from __future__ import annotations

import logging
import os
import sys

#: Ray on loopback: Ray rewrites ``--node-ip-address=127.0.0.1`` (and a driver's ``127.0.0.1:port``)
#: into the host's address, and then its gRPC servers (GCS, raylet, workers) listen on all interfaces,
#: unless this switch (Ray's "multi-node clusters off", ``ray._private.ray_constants.ENABLE_RAY_CLUSTER``)
#: is off: then 127.0.0.1 stays the node's address and every Ray server binds to loopback.
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (of a ``host:port``) names this machine's loopback interface."""
    return host.startswith("127.") or host in ("localhost", "::1", "[::1]")


def ray_on_loopback() -> None:
    """Let this process (and those it forks or starts) reach a head that listens on loopback only.

    A Ray driver rewrites ``127.0.0.1:port`` into the host's address unless LOOPBACK_SWITCH is off,
    and Ray reads that switch once, when it is imported: the gunicorn master (or ``python app.py``)
    has imported it already, so the value it read is set too.
    """
    os.environ[LOOPBACK_SWITCH] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


#: Ray's lines that tell a gateway process's operator of no fault, each dropped at its own logger by its
#: own first words (everything else those loggers say still shows):
#: - the driver connects from the startup thread, and gunicorn, not Ray, handles SIGTERM;
#: - every ``serve._run`` (each deploy) "connects to the existing Serve app" and applies no new options,
#:   which the gateway never passes;
#: - Serve's router asks each replica for its queue length within 100 ms and, when a busy replica answers
#:   later, backs off, asks again and routes the call (nothing fails); on two cores under a burst that
#:   is every few calls. A replica that really does not answer still ends in the gateway's own errors.
_RAY_NOISE = {
    "ray._private.worker": ("SIGTERM handler is not set because current thread is not the main thread",),
    "ray.serve": ("Connecting to existing Serve app in namespace", "Failed to get queue length from "),
}


class _DropLines(logging.Filter):
    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(self.starts))


def quiet_ray_noise() -> None:
    """Drop ``_RAY_NOISE`` in this process, and Ray's native stack trace on SIGTERM (a gateway
    process's normal stop; Python's faulthandler still reports a real crash). Idempotent."""
    import faulthandler

    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # (read once, at import: the gunicorn master imported Ray before the fork)
        constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = os.environ["RAY_DISABLE_FAILURE_SIGNAL_HANDLER"] not in ("0", "")
    if not faulthandler.is_enabled():
        faulthandler.enable()
    for name, starts in _RAY_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in logger.filters):
            logger.addFilter(_DropLines(starts))
