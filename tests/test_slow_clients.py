"""Slow and idle clients against the real worker (``gateway.server.GatewayWorker``): one gunicorn process,
real sockets, short deadlines. It serves tests/slow_clients_app.py (no Ray), so these test the worker
alone: head deadline, body rate, head size, connection cap, idle keep-alive, and a graceful stop, and the JSON
errors (``errors.TYPES``) the worker answers itself."""
from __future__ import annotations

import http.client
import json
import signal
import socket
import sys
import threading
import time

import pytest

from gateway.head import free_port
from tests.procs import start, stop, wait_ready

HEAD_S = 3.0  # GATEWAY_HEADER_TIMEOUT_S (also the body's grace)
RATE = 1000  # GATEWAY_BODY_MIN_RATE
CAP = 64  # GATEWAY_MAX_CONNECTIONS
KEEPALIVE_S = 1.5  # GATEWAY_KEEPALIVE_S: under HEAD_S, so an idle close is keep-alive's, not the head deadline's
GRACE_S = 5  # gunicorn's graceful_timeout
TLS_S = 1.0  # GATEWAY_TLS_HANDSHAKE_S
SECRET = b"s3cr3t-header-value"  # sent in heads: never in an answer


def _gunicorn(where, *args: str):
    """(port, process, log path): gunicorn with one GatewayWorker serving the test app, short deadlines."""
    log_path, conf = where / "gunicorn.log", where / "gunicorn_conf.py"
    conf.write_text("")  # not the repository's gunicorn.conf.py (gunicorn reads it from the cwd by default)
    port = free_port()
    proc = start([sys.executable, "-m", "gunicorn", "-c", str(conf), "-k", "gateway.server.GatewayWorker", "-w", "1",
                  "-b", f"127.0.0.1:{port}", "--graceful-timeout", str(GRACE_S), *args, "tests.slow_clients_app:app"],
                 {"GATEWAY_HEADER_TIMEOUT_S": str(HEAD_S), "GATEWAY_BODY_MIN_RATE": str(RATE),
                  "GATEWAY_MAX_CONNECTIONS": str(CAP), "GATEWAY_KEEPALIVE_S": str(KEEPALIVE_S),
                  "GATEWAY_TLS_HANDSHAKE_S": str(TLS_S)}, log_path)
    return port, proc, log_path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port, proc, log_path = _gunicorn(tmp_path_factory.mktemp("slow_clients"))
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, log_path, limit=60)
        yield port, proc, log_path
    finally:
        if proc.poll() is None:
            stop(proc, 30)


def _get(port: int, path: str, conn: http.client.HTTPConnection | None = None, body: bytes | None = None):
    """(status, lower-cased headers, body) of one request, on ``conn`` if given (left open)."""
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("POST" if body is not None else "GET", path, body=body)
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        if conn is None:
            c.close()


def _closed(sock: socket.socket, got: bytearray) -> bool:
    """Whether the server has closed ``sock`` (what it sent before is added to ``got``); non-blocking."""
    try:
        while data := sock.recv(65536):
            got += data
        return True
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def _json_error(raw: bytes, status: int, kind: str) -> dict:
    """``raw``, a whole answer, is ``status`` with the JSON error ``kind`` (``{"error": {"type", "message"}}``),
    closing the connection, echoing none of the request; returns the error."""
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith(f"HTTP/1.1 {status} "), raw[:300]
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    assert headers["content-type"] == "application/json" and headers["connection"] == "close", headers
    assert int(headers["content-length"]) == len(body) and "date" in headers, headers
    error = json.loads(body)["error"]
    assert error["type"] == kind and error["message"], error
    assert SECRET not in body and b"/upload" not in body, body
    return error


def _answer(sock: socket.socket) -> bytes:
    """Everything ``sock`` gets until the server closes it (a generous limit: a failure, not a measure)."""
    sock.settimeout(max(30.0, 5 * HEAD_S))
    got = bytearray()
    while data := sock.recv(65536):
        got += data
    return bytes(got)


def _log_mark(log_path) -> int:
    """Where the log ends now: ``_log_lines`` reads only what a test wrote after it (a client port is reused:
    an earlier test's connection from the same port is not this one's)."""
    return log_path.stat().st_size


def _log_lines(log_path, port: int, since: int, limit: float = 5.0) -> list[str]:
    """The worker's ``gateway.server`` lines about the client's local ``port`` written after ``since``
    (``_log_mark``; waits for one, briefly)."""
    deadline = time.monotonic() + limit
    while True:
        with open(log_path, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        lines = [line for line in text.splitlines() if "gateway.server" in line and f"127.0.0.1:{port}:" in line]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def test_trickling_heads_are_closed_while_health_checks_answer(server):
    port, _, log_path = server
    since = _log_mark(log_path)
    head = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n"
    tricklers = [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
    started = time.monotonic()
    for s in tricklers + silent:
        s.setblocking(False)
    sent = {s: 0 for s in tricklers}
    got = {s: bytearray() for s in tricklers + silent}
    closed_after: dict[socket.socket, float] = {}
    health = []
    next_byte = started
    while len(closed_after) < len(got) and time.monotonic() - started < 3 * HEAD_S:
        now = time.monotonic()
        if now >= next_byte:  # one byte a second from each trickler still open, and a health check
            next_byte += 1.0
            for s in tricklers:
                if s not in closed_after:
                    try:
                        sent[s] += s.send(head[sent[s]:sent[s] + 1])
                    except (BrokenPipeError, ConnectionResetError):
                        closed_after[s] = now - started
            health.append(_get(port, "/healthz")[0])
        for s in got:
            if s not in closed_after and _closed(s, got[s]):
                closed_after[s] = time.monotonic() - started
        time.sleep(0.05)
    try:
        assert len(closed_after) == len(got), f"{len(got) - len(closed_after)} still open after {3 * HEAD_S} s"
        assert len(health) >= 3 and set(health) == {200}, health
        assert all(sent[s] >= 1 for s in tricklers)
        for s in tricklers:  # a partial head gets a 408 at most, never the answer to the request
            if got[s]:  # (the worker half closes and drops what still comes, so it is rarely lost to a reset)
                _json_error(bytes(got[s]), 408, "request_timeout")
        assert all(not got[s] for s in silent)
        for s in tricklers[:20] + silent[:5]:  # each close logged once, naming the head deadline
            lines = _log_lines(log_path, s.getsockname()[1], since)
            assert len(lines) == 1 and "head deadline" in lines[0], lines
    finally:
        for s in got:
            s.close()


def _post_at(port: int, size: int, chunk: int, every_s: float, out: dict) -> None:
    """POST /upload with ``Content-Length: size``, ``chunk`` bytes every ``every_s``; ``out``: what came back."""
    s = socket.create_connection(("127.0.0.1", port))
    out["port"] = s.getsockname()[1]
    s.sendall(b"POST /upload HTTP/1.1\r\nHost: gateway\r\nContent-Length: %d\r\n\r\n" % size)
    out["head_sent"] = time.monotonic()
    got, left = bytearray(), size
    s.setblocking(False)
    try:
        while left and not _closed(s, got) and time.monotonic() - out["head_sent"] < 3 * HEAD_S + 5:
            try:
                left -= s.send(b"x" * min(chunk, left))
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(every_s)
        s.setblocking(True)
        s.settimeout(3 * HEAD_S)
        try:
            while data := s.recv(65536):
                got += data
                if b"}" in data:
                    break
        except (ConnectionResetError, TimeoutError):
            pass
        out["after_s"] = time.monotonic() - out["head_sent"]
        out["answer"] = bytes(got)
    finally:
        s.close()


def test_a_trickling_body_is_closed_and_a_slow_steady_one_is_not(server):
    port, _, log_path = server
    since = _log_mark(log_path)
    trickle, steady = {}, {}
    threads = [threading.Thread(target=_post_at, args=(port, 100_000, 1, 0.1, trickle)),  # 10 bytes/s
               threading.Thread(target=_post_at, args=(port, 16_000, 400, 0.1, steady))]  # ~4000 bytes/s, 4 s
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    if trickle["answer"]:  # a 408, unless a reset lost it (test_late_heads_and_bodies_get_408_in_json has it surely)
        _json_error(trickle["answer"], 408, "request_timeout")
    assert trickle["after_s"] < 3 * HEAD_S, trickle
    lines = _log_lines(log_path, trickle["port"], since)
    assert len(lines) == 1 and f"body below {RATE} bytes/s" in lines[0], lines
    # longer than the grace, above the least rate: answered whole
    assert steady["answer"].startswith(b"HTTP/1.1 200"), steady["answer"][:200]
    assert json.loads(steady["answer"].split(b"\r\n\r\n", 1)[1])["received"] == 16_000
    assert _log_lines(log_path, steady["port"], since, limit=0) == []


def test_late_heads_and_bodies_get_408_in_json(server):
    """Part of a head, or of a body, then nothing: a 408 request_timeout each, then the close."""
    port, _, log_path = server
    since = _log_mark(log_path)
    head = socket.create_connection(("127.0.0.1", port))
    body = socket.create_connection(("127.0.0.1", port))
    try:
        head.sendall(b"GET /upload HTTP/1.1\r\nHost: gateway\r\nX-Token: " + SECRET)
        body.sendall(b"POST /upload HTTP/1.1\r\nHost: gateway\r\nX-Token: " + SECRET
                     + b"\r\nContent-Length: 1000\r\n\r\n" + SECRET)
        error = _json_error(_answer(head), 408, "request_timeout")
        assert error["message"].startswith(f"the request line and headers did not all arrive within {HEAD_S:g} s")
        error = _json_error(_answer(body), 408, "request_timeout")
        assert error["message"].startswith(f"the request body came slower than {RATE} bytes/s")
        assert "head incomplete" in _log_lines(log_path, head.getsockname()[1], since)[0]
        assert "body below" in _log_lines(log_path, body.getsockname()[1], since)[0]
    finally:
        head.close()
        body.close()


def test_oversized_heads_get_431_in_json(server):
    """Over 64 KiB (here far over: the head's first read, up to 256 KiB, is not counted), or over 100 fields."""
    port, _, _ = server
    big = socket.create_connection(("127.0.0.1", port))
    try:
        big.sendall(b"GET /upload HTTP/1.1\r\nX-Big: " + SECRET * (640 * 1024 // len(SECRET)))  # (all read, dropped)
        error = _json_error(_answer(big), 431, "header_too_large")
        assert error["message"].startswith("the request head is over 64 KiB")
    finally:
        big.close()
    many = socket.create_connection(("127.0.0.1", port))
    try:
        many.sendall(b"GET /upload HTTP/1.1\r\nHost: gateway\r\n"
                     + b"".join(b"X-F%d: %s\r\n" % (i, SECRET) for i in range(101)) + b"\r\n")
        error = _json_error(_answer(many), 431, "header_too_large")
        assert error["message"] == "the request head has more than 100 header fields: send at most 100"
    finally:
        many.close()


def test_past_the_connection_cap_only_health_checks_are_answered(server):
    port, _, _ = server
    held = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(CAP + 16)]
    try:
        for _ in range(2):  # the 2nd round just before the checks: no idle keep-alive closes them meanwhile
            assert {_get(port, "/healthz", conn=c)[0] for c in held} == {200}  # health checks pass the cap
        assert _get(port, "/healthz")[0] == 200
        assert _get(port, "/readyz")[0] == 200
        for status, headers, body in (_get(port, "/providers"), _get(port, "/upload", body=b"x" * 50_000)):
            assert status == 503, body
            assert headers["retry-after"] == "1" and headers["connection"] == "close", headers
            assert json.loads(body)["error"]["type"] == "server_busy", body
    finally:
        for c in held:
            c.close()
    deadline = time.monotonic() + 5
    while (status := _get(port, "/providers")[0]) != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status == 200  # under the cap again once they are gone


def test_an_idle_kept_alive_connection_is_closed_after_keepalive(server):
    port, _, log_path = server
    since = _log_mark(log_path)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        assert _get(port, "/healthz", conn=conn)[0] == 200
        time.sleep(KEEPALIVE_S / 3)
        assert _get(port, "/healthz", conn=conn)[0] == 200  # kept alive: the same connection answers again
        sock = conn.sock
        sock.settimeout(3 * KEEPALIVE_S)
        assert sock.recv(1) == b""  # closed by the server (a timeout would raise)
        # keep-alive's close, not the head deadline's (which would be logged)
        assert _log_lines(log_path, sock.getsockname()[1], since, limit=0.5) == []
    finally:
        conn.close()


def test_a_silent_tls_connection_is_closed_at_the_handshake_deadline(tmp_path):
    """Before its handshake a TLS connection has no HTTP protocol yet: only the loop's deadline bounds it."""
    import ssl

    from tests.test_doors import _self_signed

    cert, key = _self_signed(tmp_path)
    port, proc, log_path = _gunicorn(tmp_path, "--certfile", cert, "--keyfile", key)
    context = ssl.create_default_context(cafile=cert)
    try:
        deadline = time.monotonic() + 60
        while True:  # ready: a request over TLS is answered
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            try:
                if _get(port, "/readyz", conn=http.client.HTTPSConnection("127.0.0.1", port, context=context))[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        silent = socket.create_connection(("127.0.0.1", port))
        silent.settimeout(3 * TLS_S)  # (asyncio's default handshake deadline is 60 s)
        try:
            assert silent.recv(1) == b""
        except ConnectionResetError:
            pass
        finally:
            silent.close()
    finally:
        stop(proc, 30)


def test_sigterm_lets_the_request_in_flight_finish(server):
    """Last: stops the module's server."""
    port, proc, log_path = server
    result = {}
    caller = threading.Thread(target=lambda: result.update(r=_get(port, "/slow?2")))
    caller.start()
    time.sleep(0.7)
    proc.send_signal(signal.SIGTERM)
    caller.join(20)
    assert proc.wait(GRACE_S + 10) == 0
    assert result["r"][0] == 200, result
    text = log_path.read_text()
    assert f"stopping: waiting for 1 request in flight, up to {GRACE_S} s" in text, text[-3000:]
    # the worker stopped on its own (gunicorn's worker_exit ran), not killed by the re-raised signal
    assert "Worker exiting" in text and "was sent SIGTERM" not in text, text[-3000:]
