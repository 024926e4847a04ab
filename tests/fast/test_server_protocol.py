"""gateway.server.GatewayHttpProtocol on a fake transport: each deadline, size and the cap, the JSON error each
answers (``errors.TYPES``, in the shape of the path), and no timer left once a connection is closed
(tests/test_slow_clients.py runs the same against a real gunicorn)."""
from __future__ import annotations

import asyncio
import json
import logging

from uvicorn.config import Config
from uvicorn.server import ServerState

from contract.errors import STATUS
from gateway.server import GatewayHttpProtocol
from tests.test_next_steps import NEXT_STEP

T = 0.05  # the head deadline (and the body's grace, and the linger after an answer) of these tests
SECRET = b"s3cr3t-header-value"  # sent in heads: never in an answer


async def _app(scope, receive, send) -> None:
    size, more = 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return
        size, more = size + len(message.get("body", b"")), message.get("more_body", False)
    body = json.dumps({"received": size}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class _Transport(asyncio.Transport):
    def __init__(self, half_close: bool = True) -> None:
        super().__init__()
        self.written, self.closed, self.protocol = bytearray(), False, None
        self.half_close, self.eof = half_close, False  # (TLS transports cannot half close)

    def can_write_eof(self) -> bool:
        return self.half_close

    def write_eof(self) -> None:
        assert self.half_close and not self.eof
        self.eof = True

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 5555), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def write(self, data) -> None:
        assert not self.eof, "written after a half close"
        self.written += data

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    abort = close

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _connect(state: ServerState | None = None, half_close: bool = True,
             **limits) -> tuple[GatewayHttpProtocol, _Transport]:
    config = Config(app=_app, http=GatewayHttpProtocol, lifespan="off", log_config=None, timeout_keep_alive=5)
    protocol = GatewayHttpProtocol(config=config, server_state=state or ServerState(), app_state={},
                                   _loop=asyncio.get_running_loop())
    for name, value in {"header_timeout_s": T, "body_min_rate": 1000, "linger_s": T, **limits}.items():
        setattr(protocol, name, value)
    transport = _Transport(half_close)
    transport.protocol = protocol
    protocol.connection_made(transport)
    return protocol, transport


def _run(coro):
    return asyncio.run(coro)


async def _until(condition, limit: float = 10.0) -> None:
    """Wait for ``condition()`` (a generous limit: the loop may be slow on a busy machine)."""
    deadline = asyncio.get_running_loop().time() + limit
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "not in time"
        await asyncio.sleep(T / 5)


def _error(written: bytes, status: int, kind: str) -> dict:
    """The one answer in ``written``: ``status``, a JSON error ``kind``, closing; returns the error."""
    head, body = bytes(written).split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    assert lines[0].startswith(b"HTTP/1.1 %d " % status), lines[0]
    headers = dict(line.lower().split(b": ", 1) for line in lines[1:])
    assert headers[b"content-type"] == b"application/json" and headers[b"connection"] == b"close", headers
    assert int(headers[b"content-length"]) == len(body), (headers, body)
    error = json.loads(body)["error"]
    assert STATUS[error.get("gateway_type", error["type"])] == status
    if "gateway_type" in error:  # (OpenAI's shape, on /v1)
        assert error["gateway_type"] == kind and "request_id" not in error, error
    else:
        assert error["type"] == kind and set(error) - {"retry_after"} == {"type", "message"}, error
    assert NEXT_STEP.search(error["message"]), error["message"]  # says what to do
    assert SECRET not in body and b"/hea" not in body  # no request bytes echoed
    return error


def test_a_silent_connection_is_closed_at_the_head_deadline_without_a_word(caplog):
    async def go():
        protocol, transport = _connect()
        await asyncio.sleep(T * 3)
        assert transport.closed and transport.written == b""
        assert protocol._timer is None
    with caplog.at_level(logging.INFO, logger="gateway.server"):
        _run(go())
    assert [r.getMessage() for r in caplog.records] == [
        f"closed the connection of 127.0.0.1:5555: head deadline ({T:g} s): nothing sent"]


def test_a_partial_head_gets_408_at_its_deadline_then_a_half_close_and_a_linger():
    async def go():
        protocol, transport = _connect()
        protocol.data_received(b"GET /head HTTP/1.1\r\nX-Token: " + SECRET)
        await _until(lambda: transport.written)
        error = _error(transport.written, 408, "request_timeout")
        assert error["message"].startswith(f"the request line and headers did not all arrive within {T:g} s")
        assert transport.eof and not transport.closed  # half closed: what still comes is read and dropped
        protocol.data_received(b"\r\n\r\nGET / HTTP/1.1\r\n\r\n")
        await _until(lambda: transport.closed)  # at the linger's end
        assert protocol._timer is None and transport.written.count(b"HTTP/1.1") == 1
    _run(go())


def test_without_a_half_close_tls_answers_and_closes_at_once():
    async def go():
        protocol, transport = _connect(half_close=False)
        protocol.data_received(b"GET /hea")
        await _until(lambda: transport.closed)
        _error(transport.written, 408, "request_timeout")
        assert protocol._timer is None
    _run(go())


def test_on_v1_paths_the_answer_takes_openais_shape():
    import gateway.openai_compat  # noqa: F401  (the app loads it: its blueprint registers the /v1 shape)

    async def go():
        protocol, transport = _connect()
        protocol.data_received(b"POST /v1/chat/completions HTTP/1.1\r\nHost: h\r\nX-Token: " + SECRET)
        await _until(lambda: transport.written)
        error = _error(transport.written, 408, "request_timeout")
        assert (error["type"], error["code"], error["gateway_type"]) == ("invalid_request_error", "request_timeout",
                                                                          "request_timeout")
        other, other_transport = _connect()  # (the gateway's shape elsewhere, /v1 without its slash included)
        other.data_received(b"POST /v1x HTTP/1.1\r\nHost: h\r\n")
        await _until(lambda: other_transport.written)
        _error(other_transport.written, 408, "request_timeout")
    _run(go())


def test_an_answered_request_arms_the_next_heads_deadline_and_a_close_cancels_every_timer():
    async def go():
        protocol, transport = _connect(header_timeout_s=60)
        protocol.data_received(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc")
        await asyncio.sleep(0.01)
        assert transport.written.startswith(b"HTTP/1.1 200 ") and transport.written.endswith(b'{"received": 3}')
        assert protocol._timer is not None and protocol.timeout_keep_alive_task is not None
        transport.close()
        await asyncio.sleep(0)
        assert protocol._timer is None and protocol.timeout_keep_alive_task is None
    _run(go())


def test_a_head_too_large_over_several_reads_gets_431():
    async def go():
        protocol, transport = _connect(header_timeout_s=60)
        protocol.data_received(b"GET / HTTP/1.1\r\nX-Big: " + SECRET)
        for _ in range(5):
            protocol.data_received(SECRET * 1024)  # (dropped once answered)
        error = _error(transport.written, 431, "header_too_large")
        assert error["message"].startswith("the request head is over 64 KiB")
        await _until(lambda: transport.closed)
    _run(go())


def test_too_many_header_fields_get_431_whether_the_head_is_complete_or_not():
    async def go():
        fields = b"".join(b"X-F%d: %s\r\n" % (i, SECRET) for i in range(101))
        incomplete, incomplete_transport = _connect(header_timeout_s=60)
        incomplete.data_received(b"GET / HTTP/1.1\r\n")
        incomplete.data_received(fields + b"X-")  # (a field is counted once the next one begins)
        complete, complete_transport = _connect(header_timeout_s=60)
        complete.data_received(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n" + fields + b"\r\nabc")
        await _until(lambda: complete_transport.written)
        for transport in (incomplete_transport, complete_transport):
            error = _error(transport.written, 431, "header_too_large")
            assert error["message"] == "the request head has more than 100 header fields: send at most 100"
    _run(go())


def test_unparsable_http_gets_400_invalid_request_in_json():
    async def go():
        protocol, transport = _connect()
        protocol.data_received(b"GET / HTTP/1.1\r\nX-Token " + SECRET + b"\r\n\r\n")  # (no colon)
        error = _error(transport.written, 400, "invalid_request")
        assert "not valid HTTP/1.1" in error["message"]
        await _until(lambda: transport.closed)
    _run(go())


def test_a_body_below_the_least_rate_gets_408_and_one_above_it_is_answered():
    async def go():
        slow, slow_transport = _connect()
        slow.data_received(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\n0123456789")
        steady, steady_transport = _connect()
        steady.data_received(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 600\r\n\r\n")
        for _ in range(6):  # 600 bytes over 3 graces: ~4000 bytes/s
            await asyncio.sleep(T / 2)
            steady.data_received(b"x" * 100)
        await _until(lambda: slow_transport.closed and steady_transport.written)
        error = _error(slow_transport.written, 408, "request_timeout")  # (the app heard http.disconnect: nothing else)
        assert error["message"].startswith("the request body came slower than 1000 bytes/s")
        assert steady_transport.written.endswith(b'{"received": 600}')  # (then closed idle: the next head's deadline)
    _run(go())


def test_past_the_cap_only_health_checks_reach_the_app():
    async def go():
        state = ServerState()
        state.connections.update(object() for _ in range(3))
        answers = {}
        for path in ("/healthz", "/readyz", "/providers", "/healthz?x=1"):
            protocol, transport = _connect(state, max_connections=3, header_timeout_s=60)
            protocol.data_received(b"GET %s HTTP/1.1\r\nHost: h\r\n\r\n" % path.encode())
            await asyncio.sleep(0.01)
            answers[path] = bytes(transport.written)
        for path in ("/healthz", "/readyz", "/healthz?x=1"):
            assert answers[path].startswith(b"HTTP/1.1 200 "), answers[path]
        busy = answers["/providers"]
        assert b"retry-after: 1\r\n" in busy
        _error(busy, 503, "server_busy")
    _run(go())


def test_pipelined_requests_are_answered_in_turn_and_a_stalled_next_head_gets_408_after_the_answer():
    async def go():
        protocol, transport = _connect()
        protocol.data_received(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\nGET /c HT")
        await _until(lambda: transport.closed)
        assert [answer[:3] for answer in transport.written.split(b"HTTP/1.1 ")[1:]] == [b"200", b"200", b"408"]
        assert protocol._timer is None
    _run(go())
