"""gunicorn settings: threaded workers, Ray connected after fork, the embedded head in the master.

Start with ``gunicorn -c gunicorn.conf.py app:app`` (or ``make start``). Settings come
from the environment (see ``gateway/config.py``): GATEWAY_BIND, GATEWAY_WORKERS,
GATEWAY_THREADS, RAY_ADDRESS, ...
"""
from gateway.config import Settings

_settings = Settings.from_env()
_head = None

bind = _settings.bind
workers = _settings.workers
worker_class = "gthread"  # many in-flight calls per worker: LLM calls take seconds
threads = _settings.threads
preload_app = False  # never fork a process that has Ray initialised
timeout = 120
graceful_timeout = 30  # SIGTERM: in-flight requests get this long to finish
keepalive = 5
if _settings.certfile:  # TLS (GATEWAY_CERTFILE / GATEWAY_KEYFILE); gunicorn's --certfile works too
    certfile, keyfile = _settings.certfile, _settings.keyfile
accesslog = None  # the gateway writes its own access log lines
errorlog = "-"
loglevel = "info"


def on_starting(server):
    """Master, before any fork: the bind check; metrics directory for all workers; the embedded Ray head."""
    global _head
    import os
    import shutil
    import tempfile

    # where gunicorn will listen, however it was told (GATEWAY_BIND, -b, GUNICORN_CMD_ARGS, a config)
    # (an int is an inherited fd://, checked in when_ready; a str is a unix socket's path)
    _settings.check_bind(["unix:" + a if isinstance(a, str) else a for a in server.cfg.address if not isinstance(a, int)])
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="gateway-metrics-")
    else:  # samples of a previous run are not this run's
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
        os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
    if _settings.embedded:
        from gateway.cluster import EmbeddedHead, export_embedded_env

        _head = EmbeddedHead(_settings)
        export_embedded_env(_head.start())
        server.log.info("embedded Ray head at %s; dashboard http://%s:%d",
                        _head.address, _settings.dashboard_host, _settings.dashboard_port)


def when_ready(server):
    """Master, listening: check the sockets it really holds (systemd or fd:// ones included)."""
    import socket

    addresses = [("unix:" + str(listener.sock.getsockname())) if listener.sock.family == socket.AF_UNIX
                 else listener.sock.getsockname()[:2] for listener in server.LISTENERS]
    try:
        _settings.check_bind(addresses)
    except SystemExit:
        if _head is not None:
            _head.stop()
        raise


def post_worker_init(worker):
    """Each worker connects to Ray and applies GATEWAY_ENDPOINTS_FILE in the background, tried again
    with backoff until done (the head may come up after the gateway), so /healthz answers at once
    and /readyz says ready only when it is done."""
    import os
    import signal

    gateway = worker.wsgi.extensions["gateway"]
    # A Ray driver cannot reconnect to a restarted cluster in-process: when the lost cluster
    # answers again, this worker stops gracefully and the master starts a fresh one, whose
    # startup connects and applies the file again.
    gateway.cluster.on_recovered = lambda: os.kill(os.getpid(), signal.SIGTERM)
    gateway.start_in_background()


def worker_exit(server, worker):
    """Skip Ray's exit hooks when the cluster is gone: they would wait on it."""
    import os

    gateway = worker.wsgi.extensions["gateway"] if worker.wsgi else None
    if gateway is not None and gateway.cluster.lost:
        os._exit(0)


def child_exit(server, worker):
    """A dead worker's live gauges leave /metrics."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """Master, last: stop the embedded head (endpoints die with it)."""
    if _head is not None:
        _head.stop()
