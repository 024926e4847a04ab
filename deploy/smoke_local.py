"""Smoke-test a local model endpoint on a real machine (a GPU box, typically).

Against a running gateway (deploys, waits for RUNNING, chats, streams, undeploys)::

    python -m deploy.smoke_local --url http://127.0.0.1:8099 --provider vllm \\
        --model-path /models/Qwen2.5-0.5B-Instruct --gpus 1

Or the engine alone, in this process, without Ray or the gateway (what a machine
with torch and a GPU but no Ray can run)::

    python -m deploy.smoke_local --direct --provider hf --model-path /models/Qwen2.5-0.5B-Instruct --gpus 1

With ``--model-path tiny`` a tiny random-weight model is built first (``tests/tiny_model.py``).
Prints one JSON report; exits 1 when a check fails.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid


def _checks_on(answers: dict) -> list[str]:
    problems = []
    chat, streamed = answers["chat"], answers["stream_text"]
    if not isinstance(chat.get("output"), str):
        problems.append("chat answered no text")
    usage = chat.get("usage") or {}
    if not usage.get("prompt_tokens") or usage.get("total_tokens") != usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0):
        problems.append(f"usage does not add up: {usage}")
    if answers.get("temperature") == 0 and streamed != chat.get("output"):
        problems.append("the streamed text differs from the answer to the same greedy request")
    return problems


def over_http(args, messages) -> dict:
    import httpx

    name = f"smoke_{uuid.uuid4().hex[:6]}"
    body = {"chat_name": name, "model_path": args.model_path, "gpus_per_worker": args.gpus, "workers": 1}
    if args.max_model_len:
        body["max_model_len"] = args.max_model_len
    report: dict = {"mode": "gateway", "provider": args.provider, "chat_name": name}
    with httpx.Client(base_url=args.url, timeout=600) as http:
        started = time.monotonic()
        r = http.post(f"/{args.provider}/deploy", json=body)
        report["deploy_status"] = r.status_code
        if r.status_code not in (200, 202):
            report["error"] = r.json()
            return report
        seen = []
        while True:
            view = http.get(f"/deployments/{name}").json()
            if not seen or seen[-1] != view["status"]:
                seen.append(view["status"])
            if view["status"] in ("RUNNING", "DEPLOY_FAILED") or time.monotonic() - started > args.deploy_timeout:
                break
            time.sleep(1)
        report.update(states=seen, deploy_s=round(time.monotonic() - started, 1))
        try:
            if view["status"] != "RUNNING":
                report["error"] = view.get("failure") or view
                return report
            request = {"chat_name": name, "messages": messages, "temperature": 0, "max_tokens": args.max_tokens}
            t = time.monotonic()
            chat = http.post("/chat", json=request).json()
            report["chat_s"] = round(time.monotonic() - t, 3)
            text, first = [], None
            t = time.monotonic()
            with http.stream("POST", "/chat", json={**request, "stream": True}) as stream:
                for line in stream.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        event = json.loads(line[6:])
                        if event.get("delta"):
                            first = first or time.monotonic() - t
                            text.append(event["delta"])
            report.update(chat=chat, stream_text="".join(text), first_token_s=round(first or 0, 3), temperature=0)
        finally:
            http.post(f"/{args.provider}/undeploy", json={"chat_name": name})
    return report


def direct(args, messages) -> dict:
    import providers
    from contract.calls import ChatCall, Message, SamplingParams

    provider = providers.get(args.provider)
    spec = provider.spec_class(chat_name="smoke", model_path=args.model_path, gpus_per_worker=args.gpus,
                               **({"max_model_len": args.max_model_len} if args.max_model_len else {}))
    started = time.monotonic()
    adapter = provider.create_adapter(spec)
    report: dict = {"mode": "direct", "provider": args.provider, "load_s": round(time.monotonic() - started, 1)}
    call = ChatCall(request_id="smoke", messages=[Message(**m) for m in messages],
                    params=SamplingParams(temperature=0, max_tokens=args.max_tokens))

    async def run() -> None:
        t = time.monotonic()
        result = await adapter.chat(call)
        report["chat_s"] = round(time.monotonic() - t, 3)
        text, first = [], None
        t = time.monotonic()
        async for event in adapter.stream(call):
            if "delta" in event:
                first = first or time.monotonic() - t
                text.append(event["delta"])
        report.update(chat=result.model_dump(include={"output", "finish_reason", "usage"}), stream_text="".join(text),
                      first_token_s=round(first or 0, 3), temperature=0)
        await adapter.aclose()

    asyncio.run(run())
    try:
        import torch

        if torch.cuda.is_available():
            report["device"] = torch.cuda.get_device_name(0)
            report["gpu_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    except ImportError:
        pass
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--provider", choices=["hf", "vllm"], default="vllm")
    p.add_argument("--model-path", required=True, help="a model folder, a hub id, or 'tiny'")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--deploy-timeout", type=float, default=1800)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", default="http://127.0.0.1:8099")
    where.add_argument("--direct", action="store_true", help="the engine in this process: no Ray, no gateway")
    args = p.parse_args(argv)
    if args.model_path == "tiny":
        from tests.tiny_model import build

        args.model_path = str(build(tempfile.mkdtemp(prefix="tiny-model-")))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好，你是谁"}]
    report = direct(args, messages) if args.direct else over_http(args, messages)
    problems = report.get("error") and [f"failed: {report['error']}"] or _checks_on(report)
    report["ok"] = not problems
    report["problems"] = problems
    print(json.dumps(report, ensure_ascii=False, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
