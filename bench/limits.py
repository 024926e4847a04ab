"""What a client key's limits cost per call: the check ``Dispatcher._walk`` makes before each upstream call.

    python -m bench.limits [--calls 20000] [--unleased-calls 2000]

The question (``gateway/limits.py``): limits kept for the whole cluster by one actor would
put an actor round trip on every call; leases (about a second of the rate, spent in the
process) should keep it off the hot path. Measured, per call, the median, mean and p99 of
``caller.admit()`` + ``caller.settle(...)``, exactly as the dispatcher makes them, for:

- (a) a key without limits;
- (b) a key with ``rate_per_minute`` (60 000, so a lease is 1 000 calls), with leases;
- (c) the same without leases (lease size 1: every call asks the keeper actor, which writes
  the bucket through to the GCS);
- (d) (b) plus ``tokens_per_minute``: the call's tokens are reserved before it and settled after it
  (``caller.reserve`` + ``Reservation.settle``: two keeper round trips, the settle written to the
  ledger, SQLite, before it returns), as for every key with token limits or budgets;
- (e) a key with ``tokens_per_day`` (and no rate): the same reservation and settle.

All on this machine: an embedded Ray head started as the gateway starts it (token auth), one
driver (this process) as a gateway worker is one; calls back to back on one thread, after a
warm-up. The rates are high enough that nothing is refused: this is the cost of admitting.
Writes ``bench/results/limits.json``.
"""
from __future__ import annotations

import os

os.environ["RAY_AUTH_MODE"] = "token"  # before Ray is imported: the embedded head runs with token auth
os.environ.pop("RAY_ADDRESS", None)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from .__main__ import RESULTS, free_port  # noqa: E402

VARIANTS = {
    "a_no_limit": "a key without limits",
    "b_rate_with_leases": "rate_per_minute 60000 (a lease: 1000 calls)",
    "c_rate_without_leases": "rate_per_minute 60000, lease size 1 (an actor call per call)",
    "d_rate_and_tokens_with_leases": "rate_per_minute 60000 (leases) and tokens_per_minute 1e9: reserve + settle a call",
    "e_tokens_per_day": "tokens_per_day 1e12: reserve before + settle after each call (two keeper round trips)",
}


def _endpoint():
    """What ``caller.reserve`` reads of an endpoint (``endpoint_cache.Endpoint``): its name, record and deadline."""
    from gateway.endpoint_cache import Endpoint
    from gateway.records import EndpointRecord

    record = EndpointRecord.from_dict({"chat_name": "bench_endpoint", "provider": "openai", "timeout": 60.0,
                                       "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}})
    return Endpoint(record, handle=None)


def measure(caller, calls: int, tokens: int, warmup: int = 200) -> dict:
    """Per-call cost of admit (+ reserve) + settle, in microseconds (on an event loop, as the dispatcher makes them)."""
    return asyncio.run(_measure(caller, calls, tokens, warmup))


async def _one(caller, endpoint, call, usage) -> None:
    await caller.admit()
    held = await caller.reserve(endpoint, call)
    caller.settle(1)
    if held is not None:
        await held.settle(usage)


async def _measure(caller, calls: int, tokens: int, warmup: int) -> dict:
    from contract.calls import ChatCall, Message, Usage

    call = ChatCall(request_id="bench", messages=[Message(role="user", content="hello there")])
    usage = Usage(prompt_tokens=tokens // 2, completion_tokens=tokens - tokens // 2, total_tokens=tokens)
    endpoint = _endpoint()
    for _ in range(warmup):
        await _one(caller, endpoint, call, usage)
    times = []
    clock = time.perf_counter_ns
    for _ in range(calls):
        t = clock()
        await _one(caller, endpoint, call, usage)
        times.append(clock() - t)
    times.sort()
    us = [t / 1000 for t in times]
    return {"calls": calls, "median_us": round(statistics.median(us), 2), "mean_us": round(statistics.fmean(us), 2),
            "p99_us": round(us[int(len(us) * 0.99) - 1], 2), "max_us": round(us[-1], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.limits", description="cost of the client-key limits check (see module doc)")
    ap.add_argument("--calls", type=int, default=20000, help="calls per leased variant")
    ap.add_argument("--unleased-calls", type=int, default=2000, help="calls without leases (each is an actor round trip)")
    args = ap.parse_args()

    from gateway import Settings
    from gateway.auth import ClientKey, _digest
    from gateway.cluster import Cluster
    from gateway.head import EmbeddedHead, export_embedded_env
    from gateway.limits import Limits
    from gateway.rate_leases import FLUSH_S

    settings = Settings.from_env({}, ray_port=free_port(), dashboard_port=free_port(), object_store_mb=100, ray_num_cpus=2,
                                 ship_code=False, state_dir=tempfile.mkdtemp(prefix="bench-limits-"))  # (a ledger of its own)
    head = EmbeddedHead(settings)
    t0 = time.perf_counter()
    export_embedded_env(head.start())
    out: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                 "command": "python -m bench.limits", "what": "median per-call cost of caller.admit() (+ caller.reserve()) + caller.settle() "
                 "(+ the reservation's settle): what Dispatcher._walk and chat make around each upstream call, one "
                 "thread, back to back"}
    try:
        cluster = Cluster(settings.model_copy(update={"ray_address": head.address}))
        cluster.ensure_up()
        out["head_up_s"] = round(time.perf_counter() - t0, 2)
        leased, unleased = Limits(cluster, settings), Limits(cluster, settings, lease_size=1)

        def key(label: str, **limits) -> ClientKey:
            return ClientKey(_digest(f"bench-{label}-{time.time_ns()}"), label, None, **limits)

        runs = {
            "a_no_limit": (leased.caller(key("a")), args.calls, 0),
            "b_rate_with_leases": (leased.caller(key("b", rate_per_minute=60000)), args.calls, 0),
            "c_rate_without_leases": (unleased.caller(key("c", rate_per_minute=60000)), args.unleased_calls, 0),
            "d_rate_and_tokens_with_leases": (leased.caller(key("d", rate_per_minute=60000, tokens_per_minute=1e9)),
                                              args.unleased_calls, 20),
            "e_tokens_per_day": (leased.caller(key("e", tokens_per_day=1e12)), args.unleased_calls, 20),
        }
        out["variants"] = {}
        for label, (caller, calls, tokens) in runs.items():
            row = {"what": VARIANTS[label], **measure(caller, calls, tokens)}
            out["variants"][label] = row
            print(f"{label:32s} median {row['median_us']:8.2f} us  mean {row['mean_us']:8.2f} us  "
                  f"p99 {row['p99_us']:8.2f} us  ({calls} calls)", flush=True)
        time.sleep(FLUSH_S + 0.5)  # the last deferred charge goes out before the cluster does
        out["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    finally:
        import ray

        ray.shutdown()
        head.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "limits.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"written: {RESULTS / 'limits.json'}")


if __name__ == "__main__":
    main()
