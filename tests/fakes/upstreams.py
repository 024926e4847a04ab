"""Fake provider servers that speak each provider's real wire protocol over HTTP.

Each runs an aiohttp server on loopback in a background thread, records every request
(path, headers, JSON body) and answers from a per-key script (``script(key, Reply...)``),
or by default echoes the last user message with deterministic usage. Shapes, paths, error
bodies and statuses follow ``shared/reference/provider-protocols.md``:

- ``FakeOpenAI``: ``POST /v1/chat/completions``, errors ``{"error": {message, type, param, code}}``
- ``FakeZhipu``: ``POST /api/paas/v4/chat/completions``, errors ``{"error": {code, message}}`` (+ ``contentFilter``)
- ``FakeDashScope``: ``POST /api/v1/services/aigc/text-generation/generation``, errors ``{code, message, request_id}``

Each also answers the free model list the gateway checks a key with at deploy
(``GET {prefix}/models``: OpenAI's and Zhipu's ``{"object": "list", "data": [...]}``, DashScope's
``{"output": {"models": [...]}, ...}``). Any key is accepted unless ``reject(key)`` was called (then
the model list and chat answer the provider's own invalid-key error), or ``script_models(key, ...)``
scripted that key's model-list answers (e.g. ``Reply(404)`` for a relay without the route).
``exhaust(key)`` spends a key's balance: its chat calls get the provider's own quota error (OpenAI's
``insufficient_quota`` 429, Zhipu's 1113, DashScope's ``Arrearage``) while its model list still answers,
as the providers' do; ``accept(key)`` makes a rejected or spent key good again.
Model-list requests are kept apart (``model_requests``): ``requests`` holds chat calls only.
A request without a key gets the provider's missing-key error, unless the fake was made with
``allow_no_key=True`` (a local server started without a key: Ollama, vLLM ...; its script key is ``""``).
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
from multidict import CIMultiDict


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # dict -> JSON; str -> raw text; None -> the default completion
    headers: dict = field(default_factory=dict)
    delay: float = 0.0
    #: streams only: the text pieces (default: the echo text word by word), the pause
    #: between them, and where to cut the connection without finishing the stream
    pieces: Optional[list] = None
    piece_delay: float = 0.0
    cut_after: Optional[int] = None
    #: drop the connection instead of answering (a reset)
    reset: bool = False


def openai_error(status: int, message: str, type_: str, code: Optional[str], headers: Optional[dict] = None) -> Reply:
    return Reply(status, {"error": {"message": message, "type": type_, "param": None, "code": code}}, headers or {})


def zhipu_error(status: int, code: str, message: str, content_filter: Optional[list] = None) -> Reply:
    body: dict = {"error": {"code": code, "message": message}}
    if content_filter is not None:
        body = {"contentFilter": content_filter, **body}
    return Reply(status, body)


def dashscope_error(status: int, code: str, message: str) -> Reply:
    return Reply(status, {"code": code, "message": message, "request_id": str(uuid.uuid4())})


class FakeUpstream:
    """Server thread, recording and scripting; subclasses give the protocol."""

    path = ""
    prefix = ""

    def __init__(self, latency: float = 0.0, allow_no_key: bool = False) -> None:
        self.latency = latency
        #: answer requests without a key (a server started without one) instead of the missing-key error
        self.allow_no_key = allow_no_key
        #: default pause between the pieces of a stream (a script's Reply can set its own)
        self.piece_delay = 0.0
        #: keep a record of each request (off for load benchmarks: memory)
        self.record = True
        self.requests: list[dict] = []
        #: streams whose client went away before the end: (key, pieces sent)
        self.abandoned: list[tuple[str, int]] = []
        self._scripts: dict[str, deque] = defaultdict(deque)
        self._model_scripts: dict[str, deque] = defaultdict(deque)
        #: keys the provider refuses everywhere (``reject``)
        self.rejected: set[str] = set()
        #: keys whose balance is spent (``exhaust``): chat calls only
        self.spent: set[str] = set()
        #: ``GET /models`` requests: path, headers, query
        self.model_requests: list[dict] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._runner: Optional[web.AppRunner] = None
        self.port = 0
        self._thread = threading.Thread(target=self._serve, name=type(self).__name__, daemon=True)

    def start(self) -> "FakeUpstream":
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
        return f"http://127.0.0.1:{self.port}{self.prefix}"

    def script(self, key: str, *replies: Reply) -> None:
        """Answer the next requests made with ``key`` with ``replies``, in order."""
        self._scripts[key].extend(replies)

    def reject(self, key: str) -> None:
        """Refuse ``key`` from now on, as the provider refuses a wrong key (model list and chat)."""
        self.rejected.add(key)

    def exhaust(self, key: str) -> None:
        """Spend ``key``'s balance from now on: its chat calls get the provider's quota error."""
        self.spent.add(key)

    def accept(self, key: str) -> None:
        """Make a rejected (``reject``) or spent (``exhaust``) key good again."""
        self.rejected.discard(key)
        self.spent.discard(key)

    def script_models(self, key: str, *replies: Reply) -> None:
        """Answer the next model-list requests made with ``key`` with ``replies``, in order."""
        self._model_scripts[key].extend(replies)

    def requests_for(self, key: str) -> list[dict]:
        return [r for r in self.requests if r["headers"].get("Authorization") == f"Bearer {key}"]

    def abandoned_after(self, key: str, limit: float = 10.0) -> Optional[int]:
        """Wait up to ``limit`` s for a stream made with ``key`` to be abandoned; the pieces it had sent, or None."""
        deadline = time.monotonic() + limit
        while True:
            sent = [n for k, n in self.abandoned if k == key]
            if sent or time.monotonic() > deadline:
                return sent[0] if sent else None
            time.sleep(0.1)

    def keys_seen(self) -> set[str]:
        return {r["headers"].get("Authorization", "").removeprefix("Bearer ") for r in self.requests}

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post(self.path, self._handle)
        app.router.add_get(self.prefix + "/models", self._models)
        # stop() waits at most a second for requests still running (a hanging upstream's), then
        # cancels them and closes their connections, as a dying server would
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if self.record:
            self.requests.append({"path": request.path, "headers": CIMultiDict(request.headers), "json": body,
                                  "at": time.monotonic()})
        key, refusal = self._authenticate(request)
        if refusal is not None:
            return refusal
        if key in self.spent:
            return self._send(self.quota_spent())
        queue = self._scripts.get(key)
        reply = queue.popleft() if queue else Reply()
        await asyncio.sleep(reply.delay or self.latency)
        if reply.reset:
            request.transport.close()
            return web.Response(status=500)
        messages = self.messages_of(body or {}) or [{"content": ""}]
        text = "echo: " + str(messages[-1].get("content") or "")
        tools = self.tools_of(body or {})
        if reply.status == 200 and reply.body is None and tools:
            # A tool loop: a user turn asks for the first tool; a tool result is answered in words.
            if messages[-1].get("role") == "tool":
                text = "tool said: " + str(messages[-1].get("content") or "")
            else:
                name = tools[0]["function"]["name"]
                args = json.dumps({"q": str(messages[-1].get("content") or "")})
                return self._send(Reply(200, self.tool_completion(body, name, args), reply.headers))
        prompt_tokens = sum(len(str(m.get("content") or "").split()) for m in messages) + 4
        if reply.status == 200 and reply.body is None and self.is_stream(request, body or {}):
            pieces = reply.pieces if reply.pieces is not None else [w + " " for w in text.split(" ")[:-1]] + [text.split(" ")[-1]]
            return await self._stream(request, body or {}, key, reply, pieces, prompt_tokens)
        if reply.body is None and reply.status == 200:
            reply = Reply(200, self.completion(body or {}, text, prompt_tokens, len(text.split())), reply.headers)
        return self._send(reply)

    def _authenticate(self, request: web.Request) -> tuple[str, Optional[web.Response]]:
        """The request's key, and the provider's answer when there is none or it is rejected."""
        key = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if not key and not self.allow_no_key:
            return key, self._send(self.missing_key())
        if key in self.rejected:
            return key, self._send(self.invalid_key(key))
        return key, None

    async def _models(self, request: web.Request) -> web.Response:
        """The free model list (no default latency: that knob is for chat calls)."""
        if self.record:
            self.model_requests.append({"path": request.path, "headers": CIMultiDict(request.headers),
                                        "query": dict(request.query), "at": time.monotonic()})
        key, refusal = self._authenticate(request)
        if refusal is not None:
            return refusal
        queue = self._model_scripts.get(key)
        reply = queue.popleft() if queue else Reply(200, self.model_list(request))
        await asyncio.sleep(reply.delay)
        if reply.reset:
            request.transport.close()
            return web.Response(status=500)
        if isinstance(reply.body, str):  # e.g. a relay's own 404 page: as a web server sends it
            return web.Response(status=reply.status, text=reply.body, content_type="text/plain", headers=reply.headers)
        return self._send(reply)

    async def _stream(self, request, body, key, reply, pieces, prompt_tokens) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={**self.reply_headers(), **reply.headers})
        resp.content_type = "text/event-stream"
        await resp.prepare(request)
        sent = 0
        try:
            for index, piece in enumerate(pieces):
                if reply.cut_after is not None and index >= reply.cut_after:
                    request.transport.close()  # the connection drops mid-stream
                    return resp
                await resp.write(self.stream_event(body, index, piece, None, None).encode())
                sent += 1
                if reply.piece_delay or self.piece_delay:
                    await asyncio.sleep(reply.piece_delay or self.piece_delay)
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(pieces)}
            for event in self.stream_end(body, len(pieces), usage):
                await resp.write(event.encode())
            await resp.write_eof()
        except asyncio.CancelledError:
            self.abandoned.append((key, sent))
            raise
        except (ConnectionResetError, RuntimeError):  # the client went away: that is all this records
            self.abandoned.append((key, sent))
        return resp

    def tools_of(self, body: dict) -> list:
        return body.get("tools") or []

    def tool_completion(self, body: dict, name: str, arguments: str) -> dict:
        """OpenAI's (and Zhipu's) shape of an answer that calls a tool."""
        return {
            "id": "chatcmpl-tool", "object": "chat.completion", "created": int(time.time()), "model": body.get("model", "?"),
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": None,
                "tool_calls": [{"id": "call_" + uuid.uuid4().hex[:12], "type": "function",
                                "function": {"name": name, "arguments": arguments}}]}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        }

    # -- streaming protocol (OpenAI's framing; DashScope overrides) --------------------
    def is_stream(self, request, body: dict) -> bool:
        return bool(body.get("stream"))

    def stream_event(self, body, index, piece, finish, usage) -> str:
        raise NotImplementedError

    def stream_end(self, body, count, usage) -> list[str]:
        raise NotImplementedError

    def _send(self, reply: Reply) -> web.Response:
        headers = {**self.reply_headers(), **reply.headers}
        text = json.dumps(reply.body) if isinstance(reply.body, (dict, list)) else str(reply.body or "")
        return web.Response(status=reply.status, text=text, content_type="application/json", headers=headers)

    # -- protocol ---------------------------------------------------------------
    def messages_of(self, body: dict) -> list:
        return body.get("messages") or []

    def reply_headers(self) -> dict:
        return {}

    def missing_key(self) -> Reply:
        raise NotImplementedError

    def invalid_key(self, key: str) -> Reply:
        raise NotImplementedError

    def quota_spent(self) -> Reply:
        raise NotImplementedError

    def model_list(self, request) -> dict:
        """OpenAI's (and Zhipu's) model list; DashScope overrides."""
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 1715367049, "owned_by": self.owner}
                                           for m in self.models]}

    owner = "system"
    models: tuple = ()

    def completion(self, body: dict, text: str, prompt_tokens: int, completion_tokens: int) -> dict:
        raise NotImplementedError


class FakeOpenAI(FakeUpstream):
    path = "/v1/chat/completions"
    prefix = "/v1"

    def reply_headers(self) -> dict:
        return {"x-request-id": "req_" + uuid.uuid4().hex[:16]}

    models = ("gpt-4o-mini", "gpt-4o")

    def missing_key(self) -> Reply:
        return openai_error(401, "You didn't provide an API key.", "invalid_request_error", None)

    def invalid_key(self, key: str) -> Reply:
        # OpenAI shows the wrong key masked: its first 3 and last 4 characters
        masked = key[:3] + "*" * max(0, len(key) - 7) + key[-4:] if len(key) > 7 else "*" * len(key)
        return openai_error(401, f"Incorrect API key provided: {masked}. You can find your API key at "
                                 "https://platform.openai.com/account/api-keys.", "invalid_request_error", "invalid_api_key",
                            self.reply_headers())

    def quota_spent(self) -> Reply:
        return openai_error(429, "You exceeded your current quota, please check your plan and billing details.",
                            "insufficient_quota", "insufficient_quota", self.reply_headers())

    def completion(self, body, text, prompt_tokens, completion_tokens):
        return {
            "id": "chatcmpl-" + uuid.uuid4().hex[:24],
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "?"),
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": "stop",
            }],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "service_tier": "default",
        }


    def _chunk(self, body, choices, usage=None, with_usage_field=False):
        chunk = {"id": "chatcmpl-stream", "object": "chat.completion.chunk", "created": int(time.time()),
                 "model": body.get("model", "?"), "system_fingerprint": "fp_fake", "choices": choices}
        if with_usage_field:
            chunk["usage"] = usage
        return "data: " + json.dumps(chunk) + "\n\n"

    def stream_event(self, body, index, piece, finish, usage):
        include = bool((body.get("stream_options") or {}).get("include_usage"))
        delta = {"role": "assistant", "content": piece} if index == 0 else {"content": piece}
        return self._chunk(body, [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}], None, include)

    def stream_end(self, body, count, usage):
        include = bool((body.get("stream_options") or {}).get("include_usage"))
        usage = {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
        events = [self._chunk(body, [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}], None, include)]
        if include:
            events.append(self._chunk(body, [], usage, True))
        return events + ["data: [DONE]\n\n"]


class FakeZhipu(FakeUpstream):
    path = "/api/paas/v4/chat/completions"
    prefix = "/api/paas/v4"

    models = ("glm-4-plus", "glm-4-flash")
    owner = "zhipuai"  # (an assumption: the field's value is not documented)

    def missing_key(self) -> Reply:
        return zhipu_error(401, "1001", "Header中未收到Authorization参数，无法进行身份验证。")

    def invalid_key(self, key: str) -> Reply:
        return zhipu_error(401, "1002", "Authorization Token非法，请确认Authorization Token正确传递。")

    def quota_spent(self) -> Reply:
        return zhipu_error(429, "1113", "余额不足或无可用资源包，请充值后重试。")

    def completion(self, body, text, prompt_tokens, completion_tokens):
        rid = str(int(time.time() * 1e6))
        return {
            "created": int(time.time()),
            "id": rid,
            "model": body.get("model", "?"),
            "request_id": rid,
            "choices": [{"finish_reason": "stop", "index": 0, "message": {"content": text, "role": "assistant"}}],
            "usage": {"completion_tokens": completion_tokens, "prompt_tokens": prompt_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }


    def stream_event(self, body, index, piece, finish, usage):
        chunk = {"id": "8313807536837492492", "created": int(time.time()), "model": body.get("model", "?"),
                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": piece}}]}
        return "data: " + json.dumps(chunk, ensure_ascii=False) + "\n\n"

    def stream_end(self, body, count, usage):
        usage = {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
        chunk = {"id": "8313807536837492492", "created": int(time.time()), "model": body.get("model", "?"),
                 "choices": [{"index": 0, "finish_reason": "stop", "delta": {"role": "assistant", "content": ""}}],
                 "usage": usage}
        return ["data: " + json.dumps(chunk, ensure_ascii=False) + "\n\n", "data: [DONE]\n\n"]


class FakeDashScope(FakeUpstream):
    path = "/api/v1/services/aigc/text-generation/generation"
    prefix = "/api/v1"

    def messages_of(self, body: dict) -> list:
        return (body.get("input") or {}).get("messages") or []

    def missing_key(self) -> Reply:
        return dashscope_error(401, "InvalidApiKey", "No API-key provided.")

    def invalid_key(self, key: str) -> Reply:
        return dashscope_error(401, "InvalidApiKey", "Invalid API-key provided.")

    def quota_spent(self) -> Reply:
        return dashscope_error(400, "Arrearage", "Access denied, please make sure your account is in good standing.")

    def model_list(self, request) -> dict:
        """``GET /api/v1/models?page_no=&page_size=``: a page of the native model list."""
        models = ["qwen-plus", "qwen-turbo", "qwen-max"]
        page, size = int(request.query.get("page_no", 1)), int(request.query.get("page_size", 10))
        return {"request_id": str(uuid.uuid4()),
                "output": {"models": [{"model": m} for m in models[(page - 1) * size: page * size]],
                           "page_no": page, "page_size": size, "total": len(models)}}

    def completion(self, body, text, prompt_tokens, completion_tokens):
        return {
            "output": {"choices": [{"finish_reason": "stop", "message": {"role": "assistant", "content": text}}]},
            "usage": {"input_tokens": prompt_tokens, "output_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "request_id": str(uuid.uuid4()),
        }


    def is_stream(self, request, body: dict) -> bool:
        return request.headers.get("X-DashScope-SSE", "").lower() == "enable"

    def tools_of(self, body: dict) -> list:
        return (body.get("parameters") or {}).get("tools") or []

    def tool_completion(self, body: dict, name: str, arguments: str) -> dict:
        return {
            "output": {"choices": [{"finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": "",
                "tool_calls": [{"function": {"name": name, "arguments": arguments}, "index": 0,
                                "id": "call_" + uuid.uuid4().hex[:12], "type": "function"}]}}]},
            "usage": {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15},
            "request_id": str(uuid.uuid4()),
        }

    def _event(self, index, content, finish, usage) -> str:
        data = {"output": {"choices": [{"message": {"content": content, "role": "assistant"}, "finish_reason": finish}]},
                "usage": usage, "request_id": "d30a9914-ac97-9102-b746-ce0cb35e3fa2"}
        return f"id:{index + 1}\nevent:result\n:HTTP_STATUS/200\ndata:{json.dumps(data, ensure_ascii=False)}\n\n"

    def stream_event(self, body, index, piece, finish, usage):
        prompt = sum(len(str(m.get("content") or "").split()) for m in self.messages_of(body)) + 4
        return self._event(index, piece, "null", {"input_tokens": prompt, "output_tokens": index + 1,
                                                  "total_tokens": prompt + index + 1})

    def stream_end(self, body, count, usage):
        return [self._event(count, "", "stop", {"input_tokens": usage["prompt_tokens"], "output_tokens": count,
                                               "total_tokens": usage["prompt_tokens"] + count})]


def dashscope_stream_error(code: str, message: str) -> str:
    """An in-stream DashScope error event (the SDK wants ``event:error`` without a space)."""
    data = {"code": code, "message": message, "request_id": "0cbe6006-faec-9854-bf8b-c906d75c3bd8"}
    return f"event:error\n:HTTP_STATUS/400\ndata:{json.dumps(data)}\n\n"


FAKES = {"openai": FakeOpenAI, "zhipu": FakeZhipu, "qwen": FakeDashScope}


if __name__ == "__main__":  # pragma: no cover - python -m tests.fakes.upstreams [--provider P] [--latency S]
    import argparse

    parser = argparse.ArgumentParser(description="a fake provider upstream on loopback; prints its base URL")
    parser.add_argument("--provider", choices=sorted(FAKES), default="openai")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--piece-delay", type=float, default=0.0, help="streams: seconds between pieces")
    args = parser.parse_args()
    fake = FAKES[args.provider](latency=args.latency)
    fake.piece_delay = args.piece_delay
    fake.record = False
    fake.start()
    print(fake.base_url, flush=True)
    threading.Event().wait()
