"""The ASGI front of a gateway process: chat calls on the worker's event loop, the rest in Flask.

``Front(app)`` is what gunicorn's worker serves (``app:app``; ``gateway.server.GatewayWorker``
runs it on uvicorn's loop). For each HTTP request:

- a ``POST`` whose route's view is a coroutine (the chat routes: ``/chat``, ``/<provider>/chat``,
  ``/chat/broadcast``, ``/v1/chat/completions``) runs here, on the loop, end to end: the body is
  read (up to ``GATEWAY_MAX_BODY_BYTES``), the Flask app's request context is pushed in the
  request's own task (Flask keeps it in context variables, which each task has its own copy of),
  then the app's ``before_request`` hooks (request id, doors, auth), the view (awaited: the
  Serve calls are awaited on this same loop), the app's error handlers and ``after_request``
  hooks, exactly as Flask would run them; the answer is written, a stream (``EventStream``) event
  by event. A call in flight costs a coroutine and its buffers, not a thread. When the client
  leaves before the end, the call is cancelled (its Serve call and upstream stream with it).
- anything else (deploy, undeploy, listings, the console, /metrics, /healthz) goes to the Flask
  app through a WSGI adapter (``a2wsgi``) on a pool of ``GATEWAY_THREADS`` threads: those routes
  block on Ray (a deploy waits for its replicas) and are few.

One router (the Flask app's URL map), one set of hooks and error handlers for both paths: the wire
contract of every route is the Flask app's. ``FrontClient`` (``app.test_client()``) drives the
same front from tests.

ASGI ``lifespan``: at startup the dispatcher adopts the server's loop (``EventLoop.adopt``), so
Serve's routers, the registry's answers and the chat calls share it.
"""
from __future__ import annotations

import asyncio
import inspect
import io
import logging
import queue
import sys
from http import HTTPStatus
from typing import Any, Optional

from a2wsgi import WSGIMiddleware
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.datastructures import Headers

from .chat_flow import EventStream
from .context import current, finish

log = logging.getLogger("gateway.front")

#: a chunked body past the size limit is read (and dropped) up to this many times the limit
_DRAIN_X = 8


class Front:
    """The ASGI application of a gateway process (see the module docstring)."""

    def __init__(self, app: Flask) -> None:
        self.flask = app
        #: the Flask app's (``worker.wsgi.extensions["gateway"]`` in gunicorn's hooks)
        self.extensions = app.extensions
        gateway = app.extensions["gateway"]
        self.loop = gateway.dispatcher.loop
        self.max_body = gateway.settings.max_body_bytes
        self._wsgi = WSGIMiddleware(app, workers=gateway.settings.threads)
        #: the paths whose POST view is a coroutine (fixed paths: no chat route has a variable part)
        self._chat_paths = frozenset(rule.rule for rule in app.url_map.iter_rules()
                                     if "POST" in (rule.methods or ()) and inspect.iscoroutinefunction(app.view_functions[rule.endpoint]))

    async def __call__(self, scope: dict, receive, send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            return await self._lifespan(receive, send)
        if kind != "http":  # (no websockets here)
            return
        if scope["method"] == "POST" and scope["path"] in self._chat_paths:  # (Flask's request context matches it)
            return await self._chat(scope, receive, send)
        await self._wsgi(scope, receive, send)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.loop.adopt(asyncio.get_running_loop())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- a chat call -----------------------------------------------------------------
    async def _chat(self, scope: dict, receive, send) -> None:
        body = await self._read_body(scope, receive)
        if body is None:  # the client left while sending it
            return
        state = {"finished": False}
        task = asyncio.ensure_future(self._respond(_environ(scope, body), send, state))
        watcher = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
            if not task.done() and not state["finished"]:  # the client left: the call is cancelled
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()

    async def _read_body(self, scope: dict, receive) -> Optional[bytes]:
        """The whole body, up to the size limit: a declared length past it is not read at all
        (Flask answers 413 for the length), an undeclared one is kept up to the limit (413 too, by
        ``bodies.request_bytes``) and the rest read and dropped, up to ``_DRAIN_X`` times the limit
        (so that the client, still sending, reads its 413 rather than a reset connection)."""
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            return b""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            if chunk and size < self.max_body:
                chunks.append(chunk)
            size += len(chunk)
            if not message.get("more_body") or size >= self.max_body * _DRAIN_X:
                return b"".join(chunks)

    async def _respond(self, environ: dict, send, state: dict) -> None:
        app = self.flask
        ctx = app.request_context(environ)
        ctx.push()
        try:
            response = await self._dispatch(ctx)
            streamed = isinstance(response, EventStream)
            try:
                try:
                    response = app.process_response(response)
                except Exception as exc:  # noqa: BLE001 - an after_request hook failed: the error handlers answer
                    response = app.process_response(app.make_response(app.handle_user_exception(exc)))
                headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.items()]
                await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
                if streamed:
                    async for text in response.events:
                        await send({"type": "http.response.body", "body": text.encode(), "more_body": True})
                    state["finished"] = True
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                else:
                    state["finished"] = True
                    await send({"type": "http.response.body", "body": response.get_data(), "more_body": False})
            finally:
                if streamed:
                    await response.aclose()
        except asyncio.CancelledError:  # the client left before the answer was written: 499, as proxies log it
            request = current()
            if request is not None:
                finish(request, 499, None)
            raise
        finally:
            ctx.pop()

    async def _dispatch(self, ctx) -> Any:
        """``before_request`` hooks, the view (awaited), the error handlers: Flask's own order."""
        app = self.flask
        request = ctx.request
        try:
            rv = app.preprocess_request()
            if rv is None:
                if request.routing_exception is not None:
                    raise request.routing_exception
                rv = app.view_functions[request.url_rule.endpoint](**request.view_args)
                if inspect.isawaitable(rv):  # (a view swapped for a plain function, as tests do, answers too)
                    rv = await rv
            return app.make_response(rv)
        except Exception as exc:  # noqa: BLE001 - the app's handlers answer every error (GatewayError, HTTP, the rest)
            return app.make_response(app.handle_user_exception(exc))


async def _disconnected(receive) -> None:
    """Returns once the client has gone (or the server says the response is complete)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _environ(scope: dict, body: bytes) -> dict:
    """The WSGI environ of an ASGI request whose body is ``body`` (what Flask's request reads)."""
    server = scope.get("server") or ("localhost", 80)
    client = scope.get("client") or ("", 0)
    environ = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": scope.get("root_path", "").encode().decode("latin-1"),
        "PATH_INFO": scope["path"].encode().decode("latin-1"),
        "QUERY_STRING": scope.get("query_string", b"").decode("latin-1"),
        "SERVER_NAME": str(server[0]), "SERVER_PORT": str(server[1] or 80),
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "REMOTE_ADDR": str(client[0]), "REMOTE_PORT": str(client[1]),
        "wsgi.version": (1, 0), "wsgi.url_scheme": scope.get("scheme", "http"), "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": True, "wsgi.run_once": False,
        "wsgi.input_terminated": True,  # (the body is all there: a chunked one has no Content-Length)
    }
    for raw_name, raw_value in scope["headers"]:
        name, value = raw_name.decode("latin-1").upper().replace("-", "_"), raw_value.decode("latin-1")
        if name == "CONTENT_LENGTH" and not value.isdigit():
            continue
        key = name if name in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + name
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ


# -- tests: ``app.test_client()`` drives the front ----------------------------------------
class FrontClient(FlaskClient):
    """Flask's test client, but each request goes through the app's ``Front`` on its event loop,
    as a served request does (chat routes on the loop, the rest through the WSGI adapter).

    ``buffered=False`` gives the body as it comes (``r.response``); ``r.close()`` is the client
    leaving: the front sees ``http.disconnect`` and cancels the call.
    """

    def run_wsgi_app(self, environ, buffered: bool = False):
        front: Front = self.application.extensions["front"]
        exchange = _Exchange(front, environ)
        status, headers = exchange.start()
        body = exchange.body()
        if buffered:
            body = [b"".join(body)]
        return body, status, Headers(headers)


class _Body:
    """The response body as it comes; ``close`` (also before the first read) is the client leaving."""

    def __init__(self, exchange: "_Exchange") -> None:
        self._exchange, self._done = exchange, False

    def __iter__(self) -> "_Body":
        return self

    def __next__(self) -> bytes:
        chunk = None if self._done else self._exchange.next_chunk()
        if chunk is None:
            self.close()
            raise StopIteration
        return chunk

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._exchange.leave()


class _Exchange:
    """One request through a ``Front``, run on its loop from a test's thread."""

    def __init__(self, front: Front, environ: dict) -> None:
        self.front, self.loop = front, front.loop.loop
        data = environ["wsgi.input"].read()
        headers = [(k[5:].replace("_", "-").lower().encode("latin-1"), v.encode("latin-1"))
                   for k, v in environ.items() if k.startswith("HTTP_")]
        for key, name in (("CONTENT_TYPE", b"content-type"), ("CONTENT_LENGTH", b"content-length")):
            if environ.get(key):
                headers.append((name, environ[key].encode("latin-1")))
        self.scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": environ["REQUEST_METHOD"],
            "scheme": environ.get("wsgi.url_scheme", "http"), "path": environ.get("PATH_INFO", "/"),
            "raw_path": environ.get("PATH_INFO", "/").encode("latin-1"),
            "query_string": environ.get("QUERY_STRING", "").encode("latin-1"), "root_path": "",
            "headers": headers, "client": (environ.get("REMOTE_ADDR", "127.0.0.1"), 50000),
            "server": (environ.get("SERVER_NAME", "localhost"), int(environ.get("SERVER_PORT") or 80)),
        }
        self._data = data
        self._sent: queue.Queue = queue.Queue()
        self._gone: Optional[asyncio.Event] = None
        self._future = None

    def start(self) -> tuple[str, list]:
        async def run() -> None:
            self._gone = asyncio.Event()
            await self.front(self.scope, self._receive, self._send)

        self._future = asyncio.run_coroutine_threadsafe(run(), self.loop)
        self._future.add_done_callback(lambda f: self._sent.put(("end", f)))
        kind, message = self._sent.get()
        if kind == "end":
            message.result()  # (raises what the front raised)
            raise AssertionError("the front ended without a response")
        status = message["status"]
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
        return f"{status} {phrase}", [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message["headers"]]

    def body(self) -> "_Body":
        return _Body(self)

    def next_chunk(self) -> Optional[bytes]:
        """The next piece of the body; None at its end."""
        while True:
            kind, message = self._sent.get()
            if kind == "end":
                message.result()
                return None
            if message.get("body"):
                return message["body"]
            if not message.get("more_body"):
                return None

    def leave(self) -> None:
        """The client leaves (or has read everything): the front sees ``http.disconnect``."""
        if self._gone is not None:
            self.loop.call_soon_threadsafe(self._gone.set)
        if self._future is not None:
            try:
                self._future.result(timeout=30)
            except Exception:  # noqa: BLE001 - (what it raised was raised to the reader already)
                pass

    async def _receive(self) -> dict:
        if self._data is not None:
            data, self._data = self._data, None
            return {"type": "http.request", "body": data, "more_body": False}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self._sent.put(("start", message))
        elif message["type"] == "http.response.body":
            self._sent.put(("body", message))
