"""Where a call's CPU goes: ``python -m bench.cpu [--concurrency 32] [--seconds 10] [--profile worker|replica] [--direct] [--tree DIR]``.

Starts the fake OpenAI upstream (50 ms) and the gateway as ``make start`` does (gunicorn + embedded
Ray head, its default settings), deploys one endpoint with 2 workers, loads ``POST /chat`` with wrk,
and prints the CPU (utime + stime from /proc) each kind of process spent per call served: the
gunicorn workers, the endpoint's replicas, and everything else of the gateway's (the master, Ray's
head processes). ``--profile worker`` (or ``replica``) also records one such process with py-spy
(``--gil``: only time holding the GIL) and prints the functions it spent it in; py-spy slows the
process it watches, so its run's req/s and CPU are not the plain run's. ``--direct`` also loads the fake
upstream itself at the same concurrency, before and after the gateway's run, and prints the latency the
gateway adds (p50, p99) over the better of the two. ``--tree DIR`` runs the gateway from another checkout
(``git archive HEAD | tar -x -C DIR``: a before-and-after with this same harness). No test asserts any of it.
"""
from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from .__main__ import cpu_s, free_port, gateway_env, process_tree, start_fake, start_gateway, stop_gateway, wait_ready
from .loadgen import load


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def summarize(raw: Path, top: int = 25) -> list[str]:
    """py-spy's raw (collapsed) stacks: the share of samples each function is on the stack (inclusive), a line each,
    leaving out the frames on (nearly) every stack (the process's and its event loop's own: they say nothing); then
    the functions most often at the top of the stack (self)."""
    inclusive: collections.Counter = collections.Counter()
    leaf: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        total += int(count)
        frames = [frame.split(" (")[0] + " " + frame.rsplit("(", 1)[-1].split(":")[0].rsplit("/", 1)[-1]
                  for frame in stack.split(";")]
        for name in set(frames):
            inclusive[name] += int(count)
        leaf[frames[-1]] += int(count)
    busiest = max(inclusive.values(), default=0)
    shown = [(name, n) for name, n in inclusive.most_common() if n < 0.97 * busiest][:top]
    lines = [f"  {n / max(total, 1) * 100:5.1f}%  {name}" for name, n in shown]
    lines.append("  self (top of the stack):")
    return lines + [f"  {n / max(total, 1) * 100:5.1f}%  {name}" for name, n in leaf.most_common(max(5, top // 3))]


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--profile", choices=["worker", "replica"], default=None)
    ap.add_argument("--direct", action="store_true", help="also load the fake upstream directly: the latency the gateway adds")
    ap.add_argument("--top", type=int, default=25, help="functions listed by the profile")
    ap.add_argument("--tree", type=Path, default=None, help="run the gateway from this checkout (default: this one)")
    args = ap.parse_args()
    fake, fake_url = start_fake(0.05)
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="bench-cpu-", suffix=".log", delete=False)
    gw = start_gateway(gateway_env(port), Path(log.name), **({"tree": args.tree.resolve()} if args.tree else {}))
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=120) as http:
            wait_ready(http, base)
            r = http.post(base + "/openai/deploy", json={"api_key": "sk-bench", "chat_name": "cpu", "model_name": "gpt-4o-mini",
                                                         "base_url": fake_url, "workers": 2, "max_retries": 0})
            assert r.status_code == 200, r.text
            body = {"chat_name": "cpu", "content": "hi"}
            load(base + "/chat", body, args.concurrency, 3.0)  # warm every path
        tree = process_tree(gw.pid)
        workers = [p for p in tree if "gunicorn" in cmdline(p) and p != gw.pid]
        replicas = [p for p in tree if "ServeReplica:cpu" in cmdline(p)]
        others = [p for p in tree if p not in workers and p not in replicas]
        spy = None
        if args.profile:
            raw = Path(tempfile.mkstemp(prefix="bench-cpu-", suffix=".raw")[1])
            target = (workers if args.profile == "worker" else replicas)[0]
            spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--gil", "-r", "100", "-d",
                                    f"{args.seconds:g}", "-f", "raw", "-o", str(raw), "--pid", str(target)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        direct_args = (fake_url + "/chat/completions", {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                       args.concurrency, args.seconds, {"Authorization": "Bearer sk-bench"})
        directs = [load(*direct_args)] if args.direct and not spy else []
        before = [cpu_s(group) for group in (workers, replicas, others)]
        res = load(base + "/chat", body, args.concurrency, args.seconds)
        after = [cpu_s(group) for group in (workers, replicas, others)]
        if directs:
            directs.append(load(*direct_args))
        calls = max(res["requests"], 1)
        print(f"concurrency {args.concurrency}, {args.seconds:g} s: {res['rps']:.0f} calls/s, p50 {res['p50']:.1f} ms, "
              f"p99 {res['p99']:.1f} ms, {res['errors']} errors")
        for label, b, a, n in zip(("gunicorn workers", "replicas", "the rest (master, Ray head)"), before, after,
                                  (len(workers), len(replicas), len(others))):
            print(f"  {label} ({n} processes): {(a - b) / calls * 1000:.2f} ms CPU per call")
        if directs:
            d50, d99 = min(d["p50"] for d in directs), min(d["p99"] for d in directs)
            print(f"direct to the fake upstream: p50 {d50:.1f} ms, p99 {d99:.1f} ms; the gateway adds "
                  f"p50 {res['p50'] - d50:+.1f} ms, p99 {res['p99'] - d99:+.1f} ms")
        if spy is not None:
            spy.wait(args.seconds + 30)
            print(f"py-spy --gil, one {args.profile} process, share of samples per function (inclusive):")
            print("\n".join(summarize(raw, args.top)))
            raw.unlink()
    finally:
        stop_gateway(gw)
        fake.terminate()
        time.sleep(1)


if __name__ == "__main__":
    main()
