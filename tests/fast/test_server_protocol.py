"""gateway.server.GatewayHttpProtocol on a fake transport: each deadline, size and the cap, and no timer
left once a connection is closed (tests/test_slow_clients.py runs the same against a real gunicorn)."""
from __future__ import annotations

import asyncio
import json
import logging

from uvicorn.config import Config
from uvicorn.server import ServerState

from gateway.server import GatewayHttpProtocol

T = 0.05  # the head deadline (and the body's grace) of these tests


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
    def __init__(self) -> None:
        super().__init__()
        self.written, self.closed, self.protocol = bytearray(), False, None

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 5555), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def write(self, data) -> None:
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


def _connect(state: ServerState | None = None, **limits) -> tuple[GatewayHttpProtocol, _Transport]:
    config = Config(app=_app, http=GatewayHttpProtocol, lifespan="off", log_config=None, timeout_keep_alive=5)
    protocol = GatewayHttpProtocol(config=config, server_state=state or ServerState(), app_state={},
                                   _loop=asyncio.get_running_loop())
    for name, value in {"header_timeout_s": T, "body_min_rate": 1000, **limits}.items():
        setattr(protocol, name, value)
    transport = _Transport()
    transport.protocol = protocol
    protocol.connection_made(transport)
    return protocol, transport


def _run(coro):
    return asyncio.run(coro)


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


def test_a_partial_head_gets_408_at_its_deadline():
    async def go():
        protocol, transport = _connect()
        protocol.data_received(b"GET /hea")
        await asyncio.sleep(T * 3)
        assert transport.closed and transport.written.startswith(b"HTTP/1.1 408 ")
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
        protocol.data_received(b"GET / HTTP/1.1\r\nX-Big: ")
        for _ in range(5):
            if not transport.closed:
                protocol.data_received(b"a" * 16384)
        assert transport.closed and transport.written.startswith(b"HTTP/1.1 431 ")
    _run(go())


def test_a_body_below_the_least_rate_is_closed_unanswered_and_one_above_it_is_answered():
    async def go():
        slow, slow_transport = _connect()
        slow.data_received(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\n0123456789")
        steady, steady_transport = _connect()
        steady.data_received(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 600\r\n\r\n")
        for _ in range(6):  # 600 bytes over 3 graces: ~4000 bytes/s
            await asyncio.sleep(T / 2)
            steady.data_received(b"x" * 100)
        await asyncio.sleep(T * 2)
        assert slow_transport.closed and slow_transport.written == b""
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
        assert busy.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1\r\n" in busy and b"connection: close\r\n" in busy
        assert json.loads(busy.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "server_busy"
    _run(go())


def test_pipelined_requests_are_answered_in_turn_and_a_stalled_next_head_gets_408_after_the_answer():
    async def go():
        protocol, transport = _connect()
        protocol.data_received(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\nGET /c HT")
        await asyncio.sleep(T * 3)
        assert [answer[:3] for answer in transport.written.split(b"HTTP/1.1 ")[1:]] == [b"200", b"200", b"408"]
        assert transport.closed and protocol._timer is None
    _run(go())
