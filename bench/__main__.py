"""Core numbers of the gateway, side by side with direct calls, in one bounded run.

    python -m bench [--requests 300] [--latency 0.05] [--cycles 5]

Starts a fake OpenAI upstream (its own process), then the gateway exactly as
``make start`` does (gunicorn + embedded Ray head), and measures: start to ready,
deploy and undeploy of a SaaS endpoint, and the latency of ``/chat`` and
``/openai/chat`` against the same request sent straight to the upstream, one call at a
time, interleaved so machine drift hits all three alike. Prints a table and writes
``bench/results/core.json`` and ``core.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=300, help="calls per path (bounded run)")
    ap.add_argument("--latency", type=float, default=0.05, help="fake upstream latency, seconds")
    ap.add_argument("--cycles", type=int, default=5, help="deploy/undeploy cycles to time")
    args = ap.parse_args()

    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_") and k != "RAY_ADDRESS"}
    fake = subprocess.Popen([sys.executable, "-m", "tests.fakes.upstreams", "--provider", "openai", "--latency", str(args.latency)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    upstream = fake.stdout.readline().strip()
    port = free_port()
    env.update(GATEWAY_BIND=f"127.0.0.1:{port}", GATEWAY_RAY_PORT=str(free_port()), GATEWAY_DASHBOARD_PORT=str(free_port()))
    log = open(RESULTS / "gateway.log.tmp", "wb")
    t0 = time.perf_counter()
    gw = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"], cwd=ROOT, env=env,
                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    results: dict = {"machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
                     "upstream_latency_s": args.latency, "requests": args.requests}
    try:
        with httpx.Client(timeout=120) as http:
            while True:
                try:
                    if http.get(base + "/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if gw.poll() is not None or time.perf_counter() - t0 > 180:
                    raise SystemExit("gateway did not become ready; see bench/results/gateway.log.tmp")
                time.sleep(0.05)
            results["start_to_ready_s"] = time.perf_counter() - t0

            def deploy(name: str) -> float:
                t = time.perf_counter()
                r = http.post(base + "/openai/deploy", json={"api_key": "sk-bench", "chat_name": name,
                                                              "model_name": "gpt-4o-mini", "base_url": upstream})
                assert r.status_code == 200, r.text
                return time.perf_counter() - t

            def undeploy(name: str) -> float:
                t = time.perf_counter()
                assert http.post(base + "/openai/undeploy", json={"chat_name": name}).status_code == 200
                return time.perf_counter() - t

            deploys, undeploys = [], []
            for i in range(args.cycles):
                deploys.append(deploy(f"cycle_{i}"))
                undeploys.append(undeploy(f"cycle_{i}"))
            results["deploy_s_median"] = statistics.median(deploys)
            results["undeploy_s_median"] = statistics.median(undeploys)
            deploy("bench_chat")

            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
            calls = {
                "direct": lambda: http.post(upstream + "/chat/completions", json=body,
                                            headers={"Authorization": "Bearer sk-bench"}),
                "gateway /chat": lambda: http.post(base + "/chat", json={"chat_name": "bench_chat", "content": "hi"}),
                "gateway /openai/chat": lambda: http.post(base + "/openai/chat", json={"chat_name": "bench_chat", "content": "hi"}),
            }
            for call in calls.values():  # warm connections and replicas
                for _ in range(20):
                    assert call().status_code == 200
            lat: dict[str, list[float]] = {k: [] for k in calls}
            for _ in range(args.requests):
                for label, call in calls.items():
                    t = time.perf_counter()
                    r = call()
                    lat[label].append((time.perf_counter() - t) * 1000)
                    assert r.status_code == 200, r.text
            direct_p50 = statistics.median(lat["direct"])
            results["latency_ms"] = {
                k: {"p50": statistics.median(v), "p90": pct(v, 0.9), "p99": pct(v, 0.99),
                    "added_p50": statistics.median(v) - direct_p50}
                for k, v in lat.items()
            }
    finally:
        gw.send_signal(signal.SIGTERM)
        try:
            gw.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(gw.pid, signal.SIGKILL)
        fake.terminate()

    lines = [
        f"Machine: {results['machine']}; fake upstream latency {args.latency * 1000:.0f} ms; "
        f"{args.requests} sequential calls per path (concurrency 1), interleaved.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| start to ready (gunicorn + embedded Ray head) | {results['start_to_ready_s']:.2f} s |",
        f"| deploy SaaS endpoint (median of {args.cycles}) | {results['deploy_s_median']:.2f} s |",
        f"| undeploy (median of {args.cycles}) | {results['undeploy_s_median']:.2f} s |",
        "",
        "| path | p50 ms | p90 ms | p99 ms | added p50 ms |",
        "|---|---|---|---|---|",
    ]
    for k, v in results["latency_ms"].items():
        lines.append(f"| {k} | {v['p50']:.2f} | {v['p90']:.2f} | {v['p99']:.2f} | {v['added_p50']:+.2f} |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "core.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "core.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
