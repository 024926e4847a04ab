"""A tiny ASGI app for tests/test_slow_clients.py: gunicorn serves it with ``gateway.server.GatewayWorker``,
so the worker's deadlines and cap are tested without Ray or the gateway's own app."""
from __future__ import annotations

import asyncio
import json
import logging

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    size = 0
    while True:  # the whole body, counted
        message = await receive()
        if message["type"] != "http.request":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    if scope["path"] == "/slow":
        await asyncio.sleep(float(scope["query_string"] or 1))
    body = json.dumps({"path": scope["path"], "received": size}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
