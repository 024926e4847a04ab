"""How a Serve handle call costs, by the way it is made: ``python -m bench.serve_paths``.

One local Ray cluster, one echo deployment shaped like the gateway's replica (a ``ChatCall``
in, a ``ChatResult`` out, nothing upstream), called from this process in each of the ways
the gateway could call it, back to back:

- ``thread``: a thread per call waits on ``response.result()`` (the gateway before issue 17);
- ``loop``: threads hand the call to one event loop thread and wait on a future; the handle's
  router runs in its own loop (Serve's default);
- ``loop+router``: the same, with the router in the caller's loop (``_run_router_in_separate_loop=False``);
- ``loop+router+grpc``: and the call goes to the replica over gRPC (``_by_reference=False``).

Each is measured against a replica with user code in Serve's separate thread (the default)
and one with it in the replica's main loop (``RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0``).
Prints p50/p99 at concurrency 1, calls/s at concurrency 32, and CPU per call in this process
and in the replica (from /proc). No test asserts any of it.
"""
from __future__ import annotations

import asyncio
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from contract.calls import ChatCall, ChatResult, Message, Usage

from .__main__ import cpu_s


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=1000)
class Echo:
    async def chat(self, call: ChatCall) -> ChatResult:
        return ChatResult(output="pong", usage=Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2))

    async def pid(self) -> int:
        return os.getpid()


class Loop:
    """One event loop in its own thread; ``call`` runs a coroutine there and waits for it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()


def _measure(one, n1: int, seconds: float, pid: int) -> dict:
    for _ in range(50):  # warm up
        one()
    lat = []
    for _ in range(n1):
        t = time.perf_counter()
        one()
        lat.append((time.perf_counter() - t) * 1000)
    lat.sort()
    stop = time.monotonic() + seconds
    counts = [0] * 32

    def worker(i):
        while time.monotonic() < stop:
            one()
            counts[i] += 1

    cpu0, rcpu0, t0 = time.process_time(), cpu_s([pid]), time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(worker, range(32)))
    wall, calls = time.perf_counter() - t0, sum(counts)
    return {"p50": statistics.median(lat), "p99": lat[int(len(lat) * 0.99) - 1], "rps": calls / wall,
            "caller_ms": (time.process_time() - cpu0) / calls * 1000, "replica_ms": (cpu_s([pid]) - rcpu0) / calls * 1000}


def main() -> None:
    ray.init(address="local", num_cpus=2, object_store_memory=80 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    serve.start()
    same = {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}}
    serve.run(Echo.bind(), name="echo", route_prefix=None)
    serve.run(Echo.options(ray_actor_options={"num_cpus": 0.1, "runtime_env": same}).bind(), name="echo_same", route_prefix=None)
    call = ChatCall(request_id="r", messages=[Message(role="user", content="hi")])
    loop = Loop()
    rows = []
    for app in ("echo", "echo_same"):
        plain = serve.get_app_handle(app)
        pid = plain.pid.remote().result()

        async def make(separate: bool, grpc: bool):
            h = DeploymentHandle("Echo", app)  # (a handle of its own: get_app_handle's are shared and initialised)
            h._init(_run_router_in_separate_loop=separate)
            return h.options(_by_reference=not grpc)

        routed = loop.call(make(False, False))
        grpc = loop.call(make(False, True))

        async def via(h):
            return await h.chat.remote(call)

        ways = {
            "thread": lambda: plain.chat.remote(call).result(),
            "loop": lambda: loop.call(via(plain)),
            "loop+router": lambda: loop.call(via(routed)),
            "loop+router+grpc": lambda: loop.call(via(grpc)),
        }
        for way, one in ways.items():
            r = _measure(one, 300, 5.0, pid)
            rows.append((app, way, r))
            print(f"{app:10} {way:18} p50 {r['p50']:.2f} ms  p99 {r['p99']:.2f} ms  c=32 {r['rps']:.0f}/s  "
                  f"cpu/call caller {r['caller_ms']:.2f} ms replica {r['replica_ms']:.2f} ms", flush=True)
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
