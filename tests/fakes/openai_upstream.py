"""A fake OpenAI Chat Completions server that speaks the real wire protocol over HTTP.

It runs an aiohttp server on loopback in a background thread. Requests are recorded
(path, headers, JSON body). Answers follow a per-key script (``script(key, ...)``)
and otherwise echo the last user message with deterministic usage, the shape of
``provider-protocols.md`` section 1.3. Errors use OpenAI's error body and statuses.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Optional

from aiohttp import web


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # dict -> JSON; str -> raw text; None -> the default completion
    headers: dict = field(default_factory=dict)
    delay: float = 0.0


def openai_error(status: int, message: str, type_: str, code: Optional[str], headers: Optional[dict] = None) -> Reply:
    return Reply(status, {"error": {"message": message, "type": type_, "param": None, "code": code}}, headers or {})


def completion(model: str, content: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "id": "chatcmpl-" + uuid.uuid4().hex[:24],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": None, "annotations": []},
            "logprobs": None,
            "finish_reason": "stop",
        }],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
        "service_tier": "default",
    }


class FakeOpenAI:
    def __init__(self, latency: float = 0.0) -> None:
        self.latency = latency
        self.requests: list[dict] = []
        self._scripts: dict[str, deque] = defaultdict(deque)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._runner: Optional[web.AppRunner] = None
        self.port = 0
        self._thread = threading.Thread(target=self._serve, name="fake-openai", daemon=True)

    # -- control --------------------------------------------------------------
    def start(self) -> "FakeOpenAI":
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        async def _down():
            await self._runner.cleanup()
        asyncio.run_coroutine_threadsafe(_down(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, key: str, *replies: Reply) -> None:
        """Answer the next requests made with ``key`` with ``replies``, in order."""
        self._scripts[key].extend(replies)

    def requests_for(self, key: str) -> list[dict]:
        return [r for r in self.requests if r["headers"].get("Authorization") == f"Bearer {key}"]

    # -- server ---------------------------------------------------------------
    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        self.requests.append({"path": request.path, "headers": dict(request.headers), "json": body})
        auth = request.headers.get("Authorization", "")
        key = auth.removeprefix("Bearer ")
        if not key:
            return self._send(openai_error(401, "You didn't provide an API key.", "invalid_request_error", None))
        queue = self._scripts.get(key)
        reply = queue.popleft() if queue else Reply()
        await asyncio.sleep(reply.delay or self.latency)
        if reply.body is None and reply.status == 200:
            messages = (body or {}).get("messages") or [{"content": ""}]
            last = str(messages[-1].get("content") or "")
            prompt_tokens = sum(len(str(m.get("content") or "").split()) for m in messages) + 4
            text = "echo: " + last
            reply = Reply(200, completion(body.get("model", "?"), text, prompt_tokens, len(text.split())), reply.headers)
        return self._send(reply)

    @staticmethod
    def _send(reply: Reply) -> web.Response:
        headers = {"x-request-id": "req_" + uuid.uuid4().hex[:16], **reply.headers}
        if isinstance(reply.body, (dict, list)):
            return web.Response(status=reply.status, text=json.dumps(reply.body), content_type="application/json", headers=headers)
        return web.Response(status=reply.status, text=str(reply.body or ""), content_type="application/json", headers=headers)


if __name__ == "__main__":  # pragma: no cover - python -m tests.fakes.openai_upstream [--latency S]
    import argparse

    parser = argparse.ArgumentParser(description="fake OpenAI upstream on loopback")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    fake = FakeOpenAI(latency=parser.parse_args().latency).start()
    print(fake.base_url, flush=True)
    threading.Event().wait()
