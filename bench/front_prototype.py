"""Measured prototype of an asyncio HTTP front end for ``POST /chat`` (issue 17: the gateway's own cost).

    python -m bench.front_prototype [--fronts 2] [--seconds 8] [--levels 1,32,128,512]

Today a gunicorn gthread worker runs each Flask view in a thread of its own and hands the
Serve call to the process's one event loop (``gateway.aio``); profiles show gthread and
Flask/werkzeug take about half a worker's CPU per call. The proposal: an ASGI front end
(uvicorn, asyncio loop, httptools parser, no thread per request) whose chat route runs
on the same loop as the Serve calls. This script builds that next to the floor, on a
local Ray cluster of its own and the fake OpenAI upstream (50 ms), and measures with wrk:

- the floor: wrk straight to the fake upstream;
- the prototype: wrk -> ``--fronts`` uvicorn processes sharing one port (SO_REUSEPORT, as
  gunicorn's workers share theirs), each a Ray driver (``ray.init(address=...)`` like a
  gunicorn worker) -> the gateway's real replica (``bind_endpoint``) -> the fake.

Per call the front end does what ``/chat`` does in steady state, in the async style: read
the body (``gateway.bodies.read``), validate it (``schemas.validate(ChatRequest)`` then
``to_call``), the provider's ``check_call``, a bulkhead seat, the real
``ReplicaClient.chat`` (handles from ``replica_client.new_handles``: router in this loop, gRPC),
the request's ``metrics.RequestRecord`` (in-process registry, not gunicorn's multiprocess
files) and the ``GatewayRenderer.answer`` JSON with the ``X-Request-Id`` and
``X-Gateway-Overhead-Ms`` headers. Left out: auth (off by default), the Host/Origin doors,
fallbacks and cooldowns (nothing fails here), and the registry lookup (resolved once at
start; the gateway's is a per-process cache hit too, but its refresh is a blocking
``ray.get`` that would have to leave the loop).

It prints, per concurrency: req/s, p50 and p99, what the prototype adds to the floor, and
the CPU per call of the front-end processes and of the replica processes (utime+stime
from /proc before and after each run; in brackets net of their idle CPU, measured while
wrk runs against the floor, which at concurrency 1 is most of it). Nothing here is used by
the gateway; it is a measurement to decide on. Numbers on a shared 2-core machine are
noisy: wrk, the fake, the fronts and the replicas all share those cores.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Optional
from pathlib import Path

from .__main__ import cpu_s

ROOT = Path(__file__).resolve().parent.parent
APP, PROVIDER, KEY = "proto", "openai", "sk-proto"


# -- the front end (a child process: python -m bench.front_prototype --front ADDRESS PORT) ----------
class Front:
    """A raw ASGI app: ``POST /chat`` only."""

    def __init__(self) -> None:
        self.dispatcher = self.endpoint = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        if scope["path"] != "/chat" or scope["method"] != "POST":
            return await _send_json(send, 404, {"error": {"type": "not_found"}}, [])
        await self._chat(scope, receive, send)

    async def _lifespan(self, receive, send) -> None:
        from gateway.cluster import Cluster
        from gateway.config import Settings
        from gateway.dispatch import Dispatcher
        from gateway.endpoint_cache import Endpoint
        from gateway.records import EndpointRecord
        from gateway.replica_client import new_handles
        from contract.calls import ChatCall

        await receive()  # lifespan.startup
        # no thread per call: the bulkhead's seats are not threads here (the default, 3/4 of 32
        # threads, would answer endpoint_busy at concurrency 512)
        settings = Settings(endpoint_max_in_flight=4096)
        self.dispatcher = Dispatcher(Cluster(settings), settings)
        record = {"chat_name": APP, "provider": PROVIDER, "model": "gpt-4o-mini", "timeout": 60}
        self.endpoint = Endpoint(EndpointRecord.from_dict(record), await new_handles(PROVIDER, APP))  # (in this loop: uvicorn's)
        warm = ChatCall(request_id="warm", messages=[{"role": "user", "content": "hi"}])
        await self.dispatcher.replicas.chat(self.endpoint, warm, 65.0)
        await send({"type": "lifespan.startup.complete"})
        print("ready", flush=True)
        await receive()  # lifespan.shutdown
        await send({"type": "lifespan.shutdown.complete"})

    async def _chat(self, scope, receive, send) -> None:
        import providers
        from gateway import bodies, metrics
        from gateway.context import finish_record
        from contract.errors import GatewayError
        from gateway.schemas import ChatRequest, validate

        started = time.perf_counter()
        headers = dict(scope["headers"])
        rid = uuid.uuid4().hex
        record = metrics.RequestRecord("/chat", rid)
        metrics.IN_FLIGHT.labels("/chat").inc()
        raw, more = b"", True
        while more:
            message = await receive()
            raw += message.get("body", b"")
            more = message.get("more_body", False)
        upstream_ms, error_type = 0.0, None
        try:
            req = validate(ChatRequest, bodies.read(raw, headers.get(b"content-type", b"").decode("latin-1"), forms=True).data)
            call = req.to_call(rid)
            endpoint, dispatcher = self.endpoint, self.dispatcher
            if req.chat_name != endpoint.name:
                raise GatewayError("not_found", f"no endpoint named '{req.chat_name}' in this prototype")
            record.endpoint(endpoint.name, endpoint.provider)
            providers.get(endpoint.provider).check_call(call)
            if not await dispatcher._bulkhead.take(endpoint.name):
                raise GatewayError("endpoint_busy", "too many calls in flight", retry_after=1)
            try:
                reply = await dispatcher.replicas.chat(endpoint, call, endpoint.deadline)
            finally:
                dispatcher._bulkhead.give_back(endpoint.name)
            upstream_ms = reply.upstream_ms
            record.served(endpoint.name, endpoint.provider, reply.attempts, reply.usage.model_dump(), upstream_ms, [])
            status, body = 200, {  # GatewayRenderer.answer (web._result_body)
                "chat_name": req.chat_name, "provider": endpoint.provider, "model": endpoint.record.get("model"),
                "output": reply.output, "finish_reason": reply.finish_reason, "usage": reply.usage.model_dump(),
                "attempts": reply.attempts, "latency_ms": round((time.perf_counter() - started) * 1000, 1),
                "request_id": rid, "served_by": endpoint.name, "tried": [],
                **({"tool_calls": reply.tool_calls} if reply.tool_calls else {}),
            }
        except GatewayError as err:
            status, body, error_type = err.status, err.body(rid), err.type
        overhead = max(0.0, (time.perf_counter() - started) * 1000 - upstream_ms)
        await _send_json(send, status, body, [(b"x-request-id", rid.encode()),
                                              (b"x-gateway-overhead-ms", f"{overhead:.2f}".encode())])
        finish_record(record, status, error_type)


async def _send_json(send, status: int, body: dict, extra: list) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *extra]})
    await send({"type": "http.response.body", "body": data})


def serve_front(address: str, port: int) -> None:
    import logging

    import ray
    import uvicorn

    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, configure_logging=False)
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and without
    # it the body (uvicorn writes it after the headers) waits for the client's delayed ACK (~40 ms)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # the kernel spreads connections over the fronts
    sock.bind(("127.0.0.1", port))
    sock.listen(4096)
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    config = uvicorn.Config(Front(), loop="asyncio", http=http, lifespan="on", access_log=False, log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])


# -- the measurement (the parent) ----------------------------------------------------------------
def _env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_") and k != "RAY_ADDRESS"}


def _replica_pids(raylet: int | None) -> list[int]:
    """This cluster's replicas of the app: processes titled ``ServeReplica:proto`` (children of our raylet)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if f"ServeReplica:{APP}" in cmd and (raylet is None or ppid == raylet):
            out.append(int(entry.name))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.front_prototype")
    ap.add_argument("--fronts", type=int, default=2, help="uvicorn processes sharing the port (gunicorn's workers)")
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--levels", default="1,32,128,512")
    ap.add_argument("--front", nargs=2, metavar=("ADDRESS", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.front:
        return serve_front(args.front[0], int(args.front[1]))

    import httpx
    import ray
    from ray import serve

    import providers
    from gateway.config import Settings
    from gateway.serve_apps import bind_endpoint
    from gateway.schemas import validate

    from .loadgen import wrk

    procs: list[subprocess.Popen] = []
    log_path = Path(tempfile.gettempdir()) / f"front_prototype-{os.getpid()}.log"
    log = log_path.open("w")
    fake = subprocess.Popen([sys.executable, "-m", "tests.fakes.upstreams", "--provider", "openai", "--latency", "0.05"],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
    procs.append(fake)
    try:
        url = fake.stdout.readline().strip()
        address, raylet = local_cluster()
        provider = providers.get(PROVIDER)
        spec = validate(provider.spec_class, {"chat_name": APP, "model_name": "gpt-4o-mini", "api_key": KEY,
                                              "base_url": url, "workers": 2, "max_retries": 0})  # a deploy body
        serve.run(bind_endpoint(provider, spec, Settings()), name=APP, route_prefix=None)
        replicas = _replica_pids(raylet)

        port = _free_port()
        fronts = [subprocess.Popen([sys.executable, "-m", "bench.front_prototype", "--front", address, str(port)],
                                   cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=log, text=True)
                  for _ in range(args.fronts)]
        procs += fronts
        for front in fronts:
            if front.stdout.readline().strip() != "ready":
                raise SystemExit(f"a front end did not start; see {log_path}")
        front_pids = [f.pid for f in fronts]

        msgs = [{"role": "user", "content": "hi"}]
        targets = {
            "direct": (url + "/chat/completions", {"model": "gpt-4o-mini", "messages": msgs}, {"Authorization": f"Bearer {KEY}"}),
            "prototype": (f"http://127.0.0.1:{port}/chat", {"chat_name": APP, "content": "hi"}, None),
        }
        with httpx.Client(timeout=30) as http:
            for target, body, headers in targets.values():
                for _ in range(50):
                    resp = http.post(target, json=body, headers=headers or {})
                    assert resp.status_code == 200, resp.text
            shape = http.post(targets["prototype"][0], json=targets["prototype"][1]).json()
        print(f"fronts: {args.fronts} uvicorn process(es) (pids {front_pids}), replicas: pids {replicas}; "
              f"an answer's fields: {sorted(shape)}", flush=True)

        rows = []
        for c in [int(x) for x in args.levels.split(",")]:
            floor, idle = None, (0.0, 0.0)
            for label, (target, body, headers) in targets.items():
                time.sleep(1)  # let the last run's connections close
                f0, r0, t0 = cpu_s(front_pids), cpu_s(replicas), time.monotonic()
                res = wrk(target, body, c, args.seconds, headers)
                f1, r1, t1 = cpu_s(front_pids), cpu_s(replicas), time.monotonic()
                n = max(1, res["requests"])
                if label == "direct":  # no traffic through the fronts and replicas: their idle CPU (ms/s)
                    floor, idle = res, ((f1 - f0) * 1000 / (t1 - t0), (r1 - r0) * 1000 / (t1 - t0))
                    cells = f"| | idle {idle[0]:.0f} ms/s | idle {idle[1]:.0f} ms/s"
                else:
                    front, replica = (f1 - f0) * 1000, (r1 - r0) * 1000
                    cells = (f"+{res['p50'] - floor['p50']:.2f} | +{res['p99'] - floor['p99']:.2f} | "
                             f"{front / n:.2f} ({(front - idle[0] * (t1 - t0)) / n:.2f}) | "
                             f"{replica / n:.2f} ({(replica - idle[1] * (t1 - t0)) / n:.2f})")
                row = (f"| {c} | {label} | {res['rps']:.0f} | {res['p50']:.2f} | {res['p99']:.2f} | {cells} | "
                       f"{res['errors']} | {os.getloadavg()[0]:.1f} |")
                rows.append(row)
                print(row, flush=True)
        print("\n| concurrency | target | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | front CPU ms/call "
              "(net of idle) | replica CPU ms/call (net of idle) | errors | load avg |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    finally:
        stop_all(procs, log)


def local_cluster() -> tuple[str, Optional[int]]:
    """A local Ray cluster for a run (2 CPUs, the checkout on the replicas' path: they import gateway,
    providers): (its GCS address, its raylet's pid, or None when Ray's private layout hides it)."""
    import ray

    ctx = ray.init(address="local", num_cpus=2, object_store_memory=80 * 1024 * 1024, include_dashboard=False,
                   log_to_driver=False, logging_level="ERROR", runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    except Exception:  # noqa: BLE001 - private API: then every ServeReplica:proto on the machine counts
        raylet = None
    return ctx.address_info["gcs_address"], raylet


def stop_all(procs: list, log) -> None:
    """Stop what a run started: the fronts first (they are drivers of the cluster), the fake last; then
    Serve and this driver's Ray; close the run's log."""
    import ray
    from ray import serve

    for proc in reversed(procs):
        proc.terminate()
    for proc in reversed(procs):
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    log.close()


if __name__ == "__main__":
    main()
