"""Benchmarks: the gateway against direct calls (and LiteLLM's proxy), side by side in one run.

    python -m bench run [--seconds 8] [--peer litellm] [--quick]

What it does, all on this machine, bounded in time:
1. starts fake OpenAI upstreams in their own processes (50 ms, and 5 s for the in-flight test;
   streams with 20 ms between tokens) and the gateway exactly as ``make start`` does
   (gunicorn + embedded Ray head), timing start to ready;
2. times deploy and undeploy of a SaaS endpoint;
3. at concurrency 1, 8, 32, 128 runs, back to back: direct calls (the floor), gateway
   ``/chat``, gateway ``/v1/chat/completions`` and, with ``--peer litellm``, LiteLLM's proxy
   (installed into its own virtual environment) on the same upstream;
4. holds 1 000 requests in flight against the 5 s upstream;
5. measures streaming time to first token, direct and through the gateway;
6. measures the cluster memory (PSS) each extra SaaS endpoint costs.

Load comes from wrk when installed (``apt-get install wrk``), else from an asyncio client.
Writes ``bench/results/latest.json``, ``latest.md`` and ``latest.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from .loadgen import have_wrk, load

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_") and k != "RAY_ADDRESS"}


def start_fake(latency: float, piece_delay: float = 0.0) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakes.upstreams", "--provider", "openai", "--latency", str(latency),
                             "--piece-delay", str(piece_delay)], cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def total_pss_mib() -> float:
    """Proportional set size of every process on the machine (a delta of it isolates what we add)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for line in (entry / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
    return total / 1024


def wait_until(predicate, limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise SystemExit(f"{what} did not happen within {limit:.0f}s")


def wait_ready(http: httpx.Client, base: str, limit: float = 180) -> None:
    """Until the gateway at ``base`` answers /readyz 200 (its endpoints file applied)."""
    def ready() -> bool:
        try:
            return http.get(base + "/readyz").status_code == 200
        except httpx.HTTPError:
            return False
    wait_until(ready, limit, "gateway ready")


def ttft_ms(http: httpx.Client, url: str, body: dict, headers: dict | None = None) -> float:
    t = time.perf_counter()
    with http.stream("POST", url, json=body, headers=headers or {}) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: ") and ('"content"' in line or '"delta"' in line) and '"content":""' not in line:
                return (time.perf_counter() - t) * 1000
    raise RuntimeError(f"no token from {url}")


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench", description="gateway benchmarks (see module doc)")
    ap.add_argument("command", nargs="?", default="run", choices=["run"])
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each load run")
    ap.add_argument("--concurrency", default="1,8,32,128")
    ap.add_argument("--inflight", type=int, default=1000)
    ap.add_argument("--latency", type=float, default=0.05, help="fast upstream latency (s)")
    ap.add_argument("--slow", type=float, default=5.0, help="slow upstream latency for the in-flight test (s)")
    ap.add_argument("--extra-endpoints", type=int, default=4, help="endpoints deployed to measure memory per endpoint")
    ap.add_argument("--peer", choices=["litellm"], default=None)
    ap.add_argument("--quick", action="store_true", help="short runs (2 s), fewer levels: a smoke test of the harness")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.concurrency, args.inflight, args.slow, args.extra_endpoints = 2.0, "1,32", 200, 2.0, 2
    levels = [int(c) for c in args.concurrency.split(",")]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    RESULTS.mkdir(parents=True, exist_ok=True)

    fast, fast_url = start_fake(args.latency, piece_delay=0.02)
    slow, slow_url = start_fake(args.slow)
    procs = [fast, slow]
    port = free_port()
    env = {**clean_env(), "GATEWAY_BIND": f"127.0.0.1:{port}", "GATEWAY_RAY_PORT": str(free_port()),
           "GATEWAY_DASHBOARD_PORT": str(free_port()), "GATEWAY_THREADS": "512",
           "GATEWAY_SAAS_MAX_ONGOING_REQUESTS": "1024",
           # raw capacity of ONE endpoint: lift the per-endpoint bulkhead (default 3/4 of the
           # threads) past the 1 000 in flight; the bulkhead itself is measured by bench/isolation.py
           "GATEWAY_ENDPOINT_MAX_IN_FLIGHT": "1024"}
    log = open(RESULTS / "gateway.log.tmp", "wb")
    base = f"http://127.0.0.1:{port}"
    out: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                 "load_tool": "wrk" if have_wrk() else "python asyncio client", "seconds_per_run": args.seconds,
                 "upstream_latency_ms": args.latency * 1000}
    pss_before_start = total_pss_mib()
    t0 = time.perf_counter()
    gw = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"], cwd=ROOT, env=env,
                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    peer = None
    try:
        with httpx.Client(timeout=120) as http:
            wait_ready(http, base)
            out["start_to_ready_s"] = time.perf_counter() - t0

            def deploy(name: str, upstream: str, workers: int = 1) -> float:
                t = time.perf_counter()
                r = http.post(base + "/openai/deploy", json={"api_key": "sk-bench", "chat_name": name, "model_name": "gpt-4o-mini",
                                                              "base_url": upstream, "workers": workers, "max_retries": 0})
                assert r.status_code == 200, r.text
                return time.perf_counter() - t

            def undeploy(name: str) -> float:
                t = time.perf_counter()
                assert http.post(base + "/openai/undeploy", json={"chat_name": name}).status_code == 200
                return time.perf_counter() - t

            deploys, undeploys = [], []
            for i in range(3 if args.quick else 5):
                deploys.append(deploy(f"cycle_{i}", fast_url))
                undeploys.append(undeploy(f"cycle_{i}"))
            out["deploy_s_median"], out["undeploy_s_median"] = statistics.median(deploys), statistics.median(undeploys)

            # Memory per extra endpoint: PSS of the whole machine before and after.
            time.sleep(2)
            before = total_pss_mib()
            for i in range(args.extra_endpoints):
                deploy(f"mem_{i}", fast_url)
            time.sleep(3)
            out["pss_per_endpoint_mib"] = (total_pss_mib() - before) / args.extra_endpoints
            for i in range(args.extra_endpoints):
                undeploy(f"mem_{i}")
            out["pss_gateway_and_cluster_mib"] = before - pss_before_start

            deploy("bench_chat", fast_url, workers=2)
            deploy("bench_slow", slow_url, workers=2)
            if args.peer == "litellm":
                from .peer import start_litellm

                peer, peer_url = start_litellm(fast_url, slow_url, RESULTS)
                procs.append(peer)

            msgs = [{"role": "user", "content": "hi"}]
            targets = {
                "direct": (fast_url + "/chat/completions", {"model": "gpt-4o-mini", "messages": msgs}, {"Authorization": "Bearer sk-bench"}),
                "gateway /chat": (base + "/chat", {"chat_name": "bench_chat", "content": "hi"}, None),
                "gateway /v1": (base + "/v1/chat/completions", {"model": "bench_chat", "messages": msgs}, None),
            }
            if peer is not None:
                targets["litellm"] = (peer_url + "/v1/chat/completions", {"model": "bench", "messages": msgs},
                                      {"Authorization": "Bearer sk-bench-master"})
            for url, body, headers in targets.values():  # warm every path
                for _ in range(20):
                    assert http.post(url, json=body, headers=headers or {}).status_code == 200
            out["levels"] = {}
            for c in levels:
                out["levels"][c] = {label: load(url, body, c, args.seconds, headers) for label, (url, body, headers) in targets.items()}
                print(f"c={c}: " + ", ".join(f"{k} {v['rps']:.0f} req/s p50 {v['p50']:.1f} ms" for k, v in out["levels"][c].items()), flush=True)

            slow_targets = {
                "direct": (slow_url + "/chat/completions", {"model": "m", "messages": msgs}, {"Authorization": "Bearer sk-bench"}),
                "gateway /chat": (base + "/chat", {"chat_name": "bench_slow", "content": "hi"}, None),
            }
            if peer is not None:
                slow_targets["litellm"] = (peer_url + "/v1/chat/completions", {"model": "bench-slow", "messages": msgs},
                                           {"Authorization": "Bearer sk-bench-master"})
            seconds = max(3 * args.slow, 10.0)
            out["inflight_concurrency"], out["slow_upstream_s"] = args.inflight, args.slow
            out["inflight"] = {label: load(url, body, args.inflight, seconds, headers, timeout_s=args.slow + 30)
                               for label, (url, body, headers) in slow_targets.items()}

            stream_body = {"chat_name": "bench_chat", "content": "one two three four five", "stream": True}
            ttfts: dict[str, list[float]] = {"direct": [], "gateway /chat": [], "gateway /v1": []}
            for _ in range(10 if args.quick else 30):
                ttfts["direct"].append(ttft_ms(http, fast_url + "/chat/completions",
                                               {"model": "m", "messages": msgs, "stream": True}, {"Authorization": "Bearer sk-bench"}))
                ttfts["gateway /chat"].append(ttft_ms(http, base + "/chat", stream_body))
                ttfts["gateway /v1"].append(ttft_ms(http, base + "/v1/chat/completions",
                                                    {"model": "bench_chat", "messages": msgs, "stream": True}))
            out["ttft_ms_median"] = {k: statistics.median(v) for k, v in ttfts.items()}
    finally:
        gw.send_signal(signal.SIGTERM)
        try:
            gw.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(gw.pid, signal.SIGKILL)
        for proc in procs:
            proc.terminate()
    report(out)


def report(out: dict) -> None:
    lines = [f"Machine: {out['machine']}; load: {out['load_tool']}, {out['seconds_per_run']:g} s per run; "
             f"upstream {out['upstream_latency_ms']:.0f} ms.", "",
             "| measure | value |", "|---|---|",
             f"| start to ready (gunicorn + embedded Ray head) | {out['start_to_ready_s']:.2f} s |",
             f"| deploy a SaaS endpoint (median) | {out['deploy_s_median']:.2f} s |",
             f"| undeploy (median) | {out['undeploy_s_median']:.2f} s |",
             f"| cluster memory (PSS) per extra SaaS endpoint | {out['pss_per_endpoint_mib']:.0f} MiB |",
             f"| gateway + embedded cluster at rest (PSS) | {out['pss_gateway_and_cluster_mib']:.0f} MiB |"]
    ttft = out["ttft_ms_median"]
    lines.append(f"| streaming time to first token added (p50, /chat; /v1) | {ttft['gateway /chat'] - ttft['direct']:+.1f} ms; "
                 f"{ttft['gateway /v1'] - ttft['direct']:+.1f} ms |")
    lines += ["", "| concurrency | path | req/s | p50 ms | p90 ms | p99 ms | added p50 ms | % of direct req/s | errors |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c, row in out["levels"].items():
        direct = row["direct"]
        for label, r in row.items():
            lines.append(f"| {c} | {label} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p90']:.1f} | {r['p99']:.1f} | "
                         f"{r['p50'] - direct['p50']:+.1f} | {100 * r['rps'] / direct['rps']:.0f}% | {r['errors']} |")
    lines += ["", f"{out['inflight_concurrency']} requests held in flight against a {out['slow_upstream_s']:g} s upstream:", "",
              "| path | req/s | p50 ms | p99 ms | max ms | errors |", "|---|---|---|---|---|---|"]
    for label, r in out["inflight"].items():
        lines.append(f"| {label} | {r['rps']:.0f} | {r['p50']:.0f} | {r['p99']:.0f} | {(r['max'] or 0):.0f} | {r['errors']} |")
    table = "\n".join(lines)
    print(table)
    (RESULTS / "latest.json").write_text(json.dumps(out, indent=2))
    (RESULTS / "latest.md").write_text(table + "\n")
    try:
        plot(out)
    except ImportError:
        print("(matplotlib not installed: no plot)")


def plot(out: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {int(c): row for c, row in out["levels"].items()}
    levels = sorted(rows)
    labels = list(rows[levels[0]])
    get = lambda c, label, k: rows[c][label][k]  # noqa: E731
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label in labels:
        ax1.plot(levels, [get(c, label, "p50") for c in levels], marker="o", label=label)
        ax2.plot(levels, [get(c, label, "rps") for c in levels], marker="o", label=label)
    for ax, title in ((ax1, "p50 latency (ms)"), (ax2, "throughput (req/s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    ax1.legend()
    fig.suptitle(f"LLM gateway vs direct, {out['upstream_latency_ms']:.0f} ms upstream ({out['machine']})")
    fig.tight_layout()
    fig.savefig(RESULTS / "latest.png", dpi=110)


if __name__ == "__main__":
    main()
