"""gunicorn settings: ASGI workers (uvicorn's, with the gateway's deadlines), Ray connected after fork,
the embedded head in the master.

Start with ``gunicorn -c gunicorn.conf.py app:app`` (or ``make start``). Each worker runs an asyncio loop
(``gateway.server.GatewayWorker``) serving the ASGI app ``app:app``; ``worker.wsgi`` in the hooks below is
that app (its ``extensions`` are the Flask app's). Settings come from the environment (see
``gateway/config.py``): GATEWAY_BIND, GATEWAY_WORKERS, GATEWAY_KEEPALIVE_S, GATEWAY_HEADER_TIMEOUT_S,
GATEWAY_BODY_MIN_RATE, GATEWAY_MAX_CONNECTIONS, GATEWAY_TLS_HANDSHAKE_S, RAY_ADDRESS, ...
"""
import math

from gateway.config import Settings

_settings = Settings.from_env()
_head = None
_metrics_dir = None  # the metrics directory this master made (mkdtemp), removed on exit; never an operator's
_ready_pipe = None  # (read end, write end): each worker writes one byte once it is connected (see ``when_ready``)

bind = _settings.bind
workers = _settings.workers
# one asyncio loop per worker: an LLM call in flight is a coroutine, not a thread; head and body deadlines,
# the connection cap, the TLS handshake deadline and the idle keep-alive are this worker's (gateway/server.py)
worker_class = "gateway.server.GatewayWorker"
preload_app = False  # never fork a process that has Ray initialised
timeout = 120
graceful_timeout = 30  # SIGTERM: in-flight requests get this long to finish
keepalive = max(1, math.ceil(_settings.keepalive_s))  # (gunicorn's is whole seconds; the worker uses keepalive_s)
if _settings.certfile:  # TLS (GATEWAY_CERTFILE / GATEWAY_KEYFILE); gunicorn's --certfile works too
    certfile, keyfile = _settings.certfile, _settings.keyfile
accesslog = None  # the gateway writes its own access log lines
errorlog = "-"
loglevel = "info"


def on_starting(server):
    """Master, before any fork: the bind check; metrics directory for all workers; the embedded Ray head."""
    global _head, _metrics_dir
    import atexit
    import os
    import tempfile

    # gunicorn exits without on_exit when it cannot bind (after this hook): clean up then too
    atexit.register(_at_exit, os.getpid())
    # no Ray process (a replica running a model's own code) may read this process's or its workers'
    # environment or memory: tokens and keys (gateway.secrecy; the workers inherit it at fork)
    from gateway.secrecy import keep_to_itself

    keep_to_itself()

    # where gunicorn will listen, however it was told (GATEWAY_BIND, -b, GUNICORN_CMD_ARGS, a config)
    # (an int is an inherited fd://, checked in when_ready; a str is a unix socket's path)
    _settings.check_bind(["unix:" + a if isinstance(a, str) else a for a in server.cfg.address if not isinstance(a, int)])
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        _metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="gateway-metrics-")
    else:  # samples of a previous run are not this run's; the operator's directory and other files stay
        from gateway.metrics import clear_samples

        clear_samples(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    server.log.info("metrics directory %s", os.environ["PROMETHEUS_MULTIPROC_DIR"])
    if _settings.embedded:
        from gateway.head import EmbeddedHead, export_embedded_env

        # (the head's environment is an allow-list: PROMETHEUS_MULTIPROC_DIR stays here, so no Ray
        # process writes its own metrics into the gateway's /metrics)
        _head = EmbeddedHead(_settings)
        server.log.info("starting the embedded Ray head on 127.0.0.1:%d (log: %s)...", _settings.ray_port, _head.log_path)
        try:
            export_embedded_env(_head.start())
        except BaseException:
            _remove_metrics_dir()  # gunicorn runs no on_exit when on_starting fails
            raise
        server.log.info("embedded Ray head at %s; dashboard http://%s:%d",
                        _head.address, _settings.dashboard_host, _settings.dashboard_port)
    else:
        server.log.info("joining the Ray cluster at %s", os.environ.get("RAY_ADDRESS") or _settings.ray_address)


def _at_exit(master_pid: int) -> None:
    """The master's last word (forked workers inherit this hook: they leave the head alone)."""
    import os

    if os.getpid() == master_pid:
        if _head is not None:
            _head.stop()
        _remove_metrics_dir()


def _remove_metrics_dir():
    """The metrics directory this master made: gone with it (one the operator named stays)."""
    global _metrics_dir
    import shutil

    path, _metrics_dir = _metrics_dir, None
    if path:
        shutil.rmtree(path, ignore_errors=True)


def when_ready(server):
    """Master, listening: check the sockets it really holds (systemd or fd:// ones included); then
    wait, in a thread, for every worker to connect and say where the gateway and the dashboard are."""
    import os
    import socket
    import threading

    global _ready_pipe
    addresses = [("unix:" + str(listener.sock.getsockname())) if listener.sock.family == socket.AF_UNIX
                 else listener.sock.getsockname()[:2] for listener in server.LISTENERS]
    try:
        _settings.check_bind(addresses)
    except SystemExit:
        if _head is not None:
            _head.stop()
        _remove_metrics_dir()  # gunicorn runs no on_exit when when_ready fails
        raise
    server.log.info("starting %d worker(s); each connects to Ray (up to a minute), then the ready line follows",
                    server.cfg.workers)
    _ready_pipe = os.pipe()
    os.set_blocking(_ready_pipe[1], False)  # a worker never waits on it
    threading.Thread(target=_say_ready, args=(server, addresses, _ready_pipe[0]), name="ready-line", daemon=True).start()


def _say_ready(server, addresses, read_fd):
    """Once as many workers as configured have connected: the URLs, and how to authenticate to the dashboard."""
    import os

    workers_up = 0
    while workers_up < server.cfg.workers:
        got = os.read(read_fd, 64)
        if not got:
            return
        workers_up += len(got)
    scheme = "https" if _settings.certfile else "http"
    urls = [a if isinstance(a, str) else f"{scheme}://{_url_host(a[0])}:{a[1]}" for a in addresses]
    server.log.info("ready: the gateway serves %s (%d worker%s)", ", ".join(urls), workers_up, "s" * (workers_up != 1))
    if _head is not None:
        dashboard = f"http://{_url_host(_settings.dashboard_host)}:{_settings.dashboard_port}"
        server.log.info("Ray dashboard: %s (%s)", dashboard, _dashboard_auth(dashboard))


def _url_host(host):
    return f"[{host}]" if ":" in host else host


def _dashboard_auth(dashboard):
    """How to authenticate to the dashboard, never the token itself."""
    import os

    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return "no authentication"
    if os.environ.get("RAY_AUTH_TOKEN"):
        where, value = "RAY_AUTH_TOKEN", "$RAY_AUTH_TOKEN"
    else:
        where = os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token"
        value = f"$(cat {where})"
    return (f"the page asks for the Ray token, in {where}; its REST API takes it as a header: "
            f"curl -H \"Authorization: Bearer {value}\" {dashboard}/api/serve/applications/")


def post_worker_init(worker):
    """Each worker connects to Ray and applies GATEWAY_ENDPOINTS_FILE in the background, tried again
    with backoff until done (the head may come up after the gateway), so /healthz answers at once
    and /readyz says ready only when it is done."""
    import os
    import signal
    import threading

    import gc

    # What the worker holds now (Flask, Ray's client, the SDKs) lives as long as the worker: out of the
    # cyclic collector's passes, which otherwise walk it every time a request makes many containers
    # (1 MiB of JSON lists: 0.25 s of CPU, 0.03 s frozen)
    gc.freeze()
    gateway = worker.wsgi.extensions["gateway"]
    # A Ray driver cannot reconnect to a restarted cluster in-process: when the lost cluster
    # answers again, this worker stops gracefully and the master starts a fresh one, whose
    # startup connects and applies the file again.
    gateway.cluster.on_recovered = lambda: os.kill(os.getpid(), signal.SIGTERM)
    gateway.start_in_background()  # (a thread: Ray is never started from the ASGI lifespan)
    # (a stop says what it waits for from the worker's shutdown: "stopping: waiting for N requests in flight,
    # up to S s", gateway.server; SIGTERM stops the worker's server gracefully, also the one just above)
    if _ready_pipe is not None:  # tell the master once connected (its ready line)
        os.close(_ready_pipe[0])
        threading.Thread(target=_connected, args=(gateway, _ready_pipe[1]), name="ready-signal", daemon=True).start()


def _connected(gateway, write_fd):
    import os

    gateway.started.wait()
    try:
        os.write(write_fd, b"1")
    except OSError:  # the master stopped listening (it said ready already): nothing to tell
        pass


def worker_exit(server, worker):
    """Skip Ray's exit hooks when the cluster is gone: they would wait on it. Else leave the cluster here, the
    requests in flight answered (the server stopped gracefully): Ray's exit hook does the same after a pause of
    half a second that every stop and every worker restart would wait out, and during which a startup still
    retrying could begin to apply the endpoints file (``Cluster.disconnect``: it stops that too)."""
    import os

    gateway = worker.wsgi.extensions["gateway"] if worker.wsgi else None
    if gateway is None:
        return
    if gateway.cluster.lost:
        os._exit(0)
    gateway.cluster.disconnect()


def child_exit(server, worker):
    """A dead worker's live gauges leave /metrics."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """Master, last: stop the embedded head (endpoints die with it); remove the metrics directory it made."""
    import time

    started = time.monotonic()
    if _head is not None:
        server.log.info("stopping the embedded Ray head at %s (its endpoints stop with it)...", _head.address)
        _head.stop()
    _remove_metrics_dir()
    if _head is not None:
        server.log.info("stopped: the gateway and its embedded Ray head (%.1f s)", time.monotonic() - started)
    else:
        import os

        server.log.info("stopped: the endpoints keep running in the Ray cluster at %s",
                        os.environ.get("RAY_ADDRESS") or _settings.ray_address)
