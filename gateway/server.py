"""The gunicorn worker the gateway runs: uvicorn's (``uvicorn-worker``) on an asyncio loop, plus the slow-client
deadlines neither gunicorn's nor uvicorn's worker has (bench/results/front-workers.md). They are in the protocol:
a slow client costs a connection (a descriptor, a parser, buffers) before any app code runs, and only the
protocol sees bytes arrive. At most one ``call_later`` timer a connection, none once it is closed:
- head deadline (``GATEWAY_HEADER_TIMEOUT_S``) from the connection's start or the previous response's end.
  Silent: closed without a word; a partial head: 408 request_timeout. Heads are bounded in size too
  (httptools/llhttp have no limit): 431 header_too_large.
- body rate (``GATEWAY_BODY_MIN_RATE``): once the head is in, the body keeps up with ``rate * (t - grace)``,
  the grace being the head deadline, or it is closed: 408 request_timeout if the app has not begun its answer
  (the app gets ``http.disconnect`` either way). While uvicorn pauses reading (the app is not reading), the
  count starts over: not the client's fault.
- connection cap (``GATEWAY_MAX_CONNECTIONS``, this worker's ``server_state.connections``): past it only
  ``GET /healthz`` and ``GET /readyz`` reach the app; anything else gets 503 server_busy.
- idle keep-alive: uvicorn's own ``timeout_keep_alive`` (``GATEWAY_KEEPALIVE_S``), not logged.
- unparsable HTTP: 400 invalid_request (uvicorn's own answer is plain text).
Every answer written here is a ``GatewayError`` from ``errors.TYPES``, in the shape the app writes for its
path (``/v1/...``: OpenAI's), with ``Content-Type: application/json`` and ``Connection: close``; its message
names settings, never the request's bytes. Such an answer is followed by a half close and up to ``linger_s`` of
reading and dropping what the client still sends (a close with unread bytes resets the connection, and the
client would lose the answer); a TLS connection cannot half close and closes at once.
Each close for a deadline, a size or bad HTTP is logged once, at INFO on ``gateway.server``: the peer and which.
"""
from __future__ import annotations

import asyncio
import json
import logging
import resource
import signal
import sys
from typing import Callable, Optional

from gunicorn.arbiter import Arbiter
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker

from .config import Settings
from contract.errors import GatewayError

log = logging.getLogger("gateway.server")

_HEAD, _BODY, _APP, _LINGER, _CLOSED = range(5)  # awaiting a head / reading its body / the app answers /
# answered here and half closed, dropping what still comes / closed
_HEALTH = (b"/healthz", b"/readyz")


def _shape(path: bytes) -> Callable[[GatewayError, Optional[str]], dict]:
    """How the app writes an error on ``path`` when no route serves it: the shape of its blueprint whose URL
    prefix the path is under (``/v1/...``: OpenAI's), else the gateway's own (``gateway.context``). Read from
    ``gateway.context`` only where the app being served has loaded it (the gateway's app always has): importing
    it here would load Flask and Ray into gunicorn's master and into workers serving another app."""
    context = sys.modules.get("gateway.context")
    if context is None or not path:
        return GatewayError.body
    return context.shape_for(path.split(b"?", 1)[0].decode("latin-1"))


def _answer(err: GatewayError, path: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """(status, headers, body) of ``err`` on ``path``: JSON, then the connection closes."""
    body = json.dumps(_shape(path)(err, None)).encode()
    return err.status, [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close"),
                        *((k.lower().encode(), v.encode()) for k, v in err.headers().items())], body


def _refusal(err: GatewayError):
    """An ASGI app answering ``err`` (``_answer``), then closing. It reads (up to 1 MiB of) the body first:
    a close on unread bytes resets the connection, and the answer would be lost."""

    async def app(scope, receive, send) -> None:
        drained, msg = 0, {"more_body": True}
        while msg.get("more_body") and drained < 1 << 20:  # (http.disconnect has no more_body)
            msg = await receive()
            drained += len(msg.get("body", b""))
        status, headers, body = _answer(err, scope.get("raw_path") or scope["path"].encode())
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


#: no request's bytes in these: the client's own headers are not echoed back
_server_busy = _refusal(GatewayError(
    "server_busy", "this gateway process holds its most open connections (GATEWAY_MAX_CONNECTIONS): try again in a "
    "second", retry_after=1))


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the module docstring's limits (set by ``GatewayWorker``)."""

    header_timeout_s = 10.0
    body_min_rate = 1024
    max_connections = 8192
    max_head_bytes = 64 * 1024  # of a head spanning reads (its first read, at most 256 KiB, is not counted)
    max_headers = 100  # as gunicorn's limit_request_fields
    linger_s = 2.0  # after an answer written here: reading and dropping what the client still sends

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._phase, self._timer, self._own_app = _HEAD, None, self.app
        self._began = self._new_head = False  # some of the awaited head came / it began in this read
        self._head_bytes, self._body_bytes, self._body_start = 0, 0, 0.0

    def _arm(self, delay: float, callback) -> None:
        self._cancel()
        if self._phase != _CLOSED and not self.transport.is_closing():
            self._timer = self.loop.call_later(delay, callback)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer = self._timer.cancel()  # (None)

    def _await_head(self) -> None:
        self._phase = _HEAD
        self._arm(self.header_timeout_s, self._head_late)

    def _close(self, why: str, answer: Optional[GatewayError] = None) -> None:
        """Logged once; ``answer`` if any and if it is this request's to give (never into an answer being
        written, nor one owed to an earlier pipelined request), then a half close and ``linger_s`` of dropping
        what still comes; else close at once (abort if even the answer cannot go out at once)."""
        if self._phase in (_LINGER, _CLOSED) or self.transport.is_closing():
            return
        self._cancel()
        log.info("closed the connection of %s: %s", "%s:%s" % self.client if self.client else "a peer", why)
        cycle = self.cycle
        if self._phase == _BODY:  # (the cycle is this request's; none queued: reading is paused while one is)
            answerable = not self.pipeline and not cycle.response_started
        else:
            answerable = cycle is None or cycle.response_complete
        if answer is not None and answerable:
            if cycle is not None and not cycle.response_complete:  # the app hears http.disconnect; it answers no one
                cycle.disconnected = True
                cycle.message_event.set()
            status, headers, body = _answer(answer, self.url if self._began or self._phase == _BODY else b"")
            self.transport.write(b"".join([STATUS_LINE[status], *(b"%s: %s\r\n" % h for h in (
                *self.server_state.default_headers, *headers)), b"\r\n", body]))
            if self.transport.can_write_eof():
                self.transport.write_eof()
                self._phase = _LINGER
                self.flow.resume_reading()
                self._timer = self.loop.call_later(self.linger_s, self._end)
                return
        self._end()

    def _end(self) -> None:
        self._timer = None
        self.transport.abort() if self.transport.get_write_buffer_size() else self.transport.close()

    def _head_late(self) -> None:
        self._timer = None
        if not self._began:
            return self._close(f"head deadline ({self.header_timeout_s:g} s): nothing sent")
        self._close(f"head deadline ({self.header_timeout_s:g} s): head incomplete", GatewayError(
            "request_timeout", f"the request line and headers did not all arrive within {self.header_timeout_s:g} s "
            "(GATEWAY_HEADER_TIMEOUT_S) of the connection opening or of the previous answer: send them at once"))

    def _check_body(self) -> None:
        self._timer = None
        now = self.loop.time()
        if self.flow.read_paused:  # the app is not reading: the client is not to blame; start over
            self._body_start, self._body_bytes = now, 0
            return self._arm(self.header_timeout_s, self._check_body)
        due = self._body_start + self.header_timeout_s + self._body_bytes / self.body_min_rate
        if now < due - 0.001:  # ahead of the least rate: look again when it would fall behind
            self._timer = self.loop.call_at(due, self._check_body)
        else:
            self._close(f"body below {self.body_min_rate} bytes/s ({self._body_bytes} bytes in "
                        f"{now - self._body_start:.1f} s)", GatewayError(
                            "request_timeout", f"the request body came slower than {self.body_min_rate} bytes/s "
                            f"(GATEWAY_BODY_MIN_RATE), counted after a grace of {self.header_timeout_s:g} s: send "
                            "the body at once, as fast as the head"))

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc) -> None:
        self._phase = _CLOSED
        self._cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._phase == _LINGER:  # answered and half closed: dropped
            return
        self._new_head = False
        super().data_received(data)  # (closing after it: _close and _arm do nothing)
        if self._phase == _HEAD and self._began:
            if not self._new_head:  # the whole read belongs to a head still incomplete
                self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self._close("head too large", GatewayError(
                    "header_too_large", f"the request head is over {self.max_head_bytes // 1024} KiB: send fewer "
                    "or shorter header fields (data belongs in the body)"))
            elif len(self.headers) > self.max_headers:
                self._close("head too large", self._too_many_headers())
        elif self._phase == _BODY and self._timer is None:  # (a body-less request is _APP already)
            self._arm(self.header_timeout_s, self._check_body)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase = _HEAD  # (pipelined, while the previous answer is written: its deadline starts at its end)
        self._began, self._new_head, self._head_bytes = True, True, 0

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes its parser refuses (``msg``: its own words, not the request's)."""
        self._close("invalid HTTP", GatewayError(
            "invalid_request", "the request is not valid HTTP/1.1 (its request line, a header or its chunked body "
            "could not be parsed): send a well-formed request"))

    def _too_many_headers(self) -> GatewayError:
        return GatewayError("header_too_large", f"the request head has more than {self.max_headers} header fields: "
                                                f"send at most {self.max_headers}")

    def on_headers_complete(self) -> None:
        self._cancel()
        self._phase, self._began, self._body_start, self._body_bytes = _BODY, False, self.loop.time(), 0
        if len(self.headers) > self.max_headers:
            self.app = _refusal(self._too_many_headers())
        elif len(self.connections) > self.max_connections and not (
                self.parser.get_method() == b"GET" and self.url.split(b"?", 1)[0] in _HEALTH):
            self.app = _server_busy
        try:
            super().on_headers_complete()
        finally:
            self.app = self._own_app

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._cancel()
        self._phase = _APP
        if self.cycle.response_complete and not self.pipeline:  # answered before its body was all in
            self._await_head()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)
        super().on_response_complete()
        if not pipelined and self._phase in (_HEAD, _APP):  # (in _BODY, on_message_complete does it)
            self._await_head()


class GatewayLoop(asyncio.SelectorEventLoop):
    """asyncio's loop (Ray's client and gRPC run on it: not uvloop), bounding the TLS handshake (asyncio's default:
    60 s), which uvicorn's ``Server.startup`` does not pass, without copying it. Set as uvicorn's ``loop``."""

    ssl_handshake_timeout = 10.0

    async def create_server(self, *args, ssl_handshake_timeout=None, **kwargs):
        if kwargs.get("ssl") is not None and ssl_handshake_timeout is None:
            ssl_handshake_timeout = self.ssl_handshake_timeout
        return await super().create_server(*args, ssl_handshake_timeout=ssl_handshake_timeout, **kwargs)


class _GatewayServer(Server):
    """uvicorn's server, saying what a stop waits for (``worker`` set by ``GatewayWorker``)."""

    async def shutdown(self, sockets=None) -> None:
        if busy := len(self.server_state.tasks):  # (uvicorn's tasks: one per request being answered)
            self.worker.log.info("stopping: waiting for %d request%s in flight, up to %d s", busy, "s" * (busy != 1),
                                 self.worker.cfg.graceful_timeout)
        await super().shutdown(sockets)


class GatewayWorker(UvicornWorker):
    """gunicorn worker: ``GatewayHttpProtocol`` on ``GatewayLoop``, configured from ``Settings``. Graceful
    shutdown: ``graceful_timeout`` less 1 s (the master kills then: that second cancels what is left, runs the
    lifespan's shutdown and ``worker_exit``). No uvicorn access log (the gateway writes its own), no Server
    header, no websockets (none served; an upgrade would escape these deadlines). TLS: gunicorn's certfile."""

    CONFIG_KWARGS = {"loop": "gateway.server:GatewayLoop", "http": GatewayHttpProtocol}

    def __init__(self, age, ppid, sockets, app, timeout, cfg, log) -> None:
        settings = Settings.from_env()
        for name in ("header_timeout_s", "body_min_rate", "max_connections"):
            setattr(GatewayHttpProtocol, name, getattr(settings, name))
        GatewayLoop.ssl_handshake_timeout = settings.tls_handshake_s
        self.max_connections, self._server = settings.max_connections, None
        self.CONFIG_KWARGS = {**type(self).CONFIG_KWARGS, "timeout_keep_alive": settings.keepalive_s,
                              "timeout_graceful_shutdown": max(1, cfg.graceful_timeout - 1), "lifespan": "on",
                              "access_log": False, "server_header": False, "date_header": True, "ws": "none"}
        super().__init__(age, ppid, sockets, app, timeout, cfg, log)

    def init_process(self) -> None:
        """First, descriptors for ``max_connections`` and 1024 more (Ray's client, logs, upstream calls)."""
        (soft, hard), want = resource.getrlimit(resource.RLIMIT_NOFILE), self.max_connections + 1024
        if hard != resource.RLIM_INFINITY and hard < want:
            self.log.warning("open files: the hard limit (%d) is under GATEWAY_MAX_CONNECTIONS + 1024 (%d): "
                             "connections may fail before the cap", hard, want)
            want = hard
        try:
            if soft != resource.RLIM_INFINITY and soft < want:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (OSError, ValueError) as exc:
            self.log.warning("open files: cannot raise the limit from %d to %d: %s", soft, want, exc)
        super().init_process()

    def init_signals(self) -> None:
        """uvicorn-worker leaves SIGTERM/SIGINT at their default, which ``Server.serve`` restores and raises
        again when done: the worker would die by it, skipping ``worker_exit`` and Ray's exit hooks."""
        super().init_signals()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.handle_exit)

    def handle_exit(self, sig, frame) -> None:
        """SIGTERM, SIGINT and (through uvicorn-worker's handler) SIGQUIT: a graceful stop."""
        self.alive = False
        if self._server is not None:
            self._server.should_exit = True

    async def _serve(self) -> None:
        self.config.app = self.wsgi
        self._server = server = _GatewayServer(self.config)
        server.worker, server.should_exit = self, not self.alive  # (a stop asked for while booting)
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
