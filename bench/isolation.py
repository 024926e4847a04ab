"""Isolation benchmark: a healthy endpoint's latency while 200 callers are stuck on a hanging one.

    python -m bench.isolation [--calls 100] [--concurrency 1,4] [--callers 200] [--quick]

The question (the per-endpoint bulkhead, ``GATEWAY_ENDPOINT_MAX_IN_FLIGHT``): with 200 callers
stuck on an endpoint whose upstream hangs, do calls to a healthy endpoint still all answer,
and does their median stay within 2x of the idle median?

What it does, all on this machine:
1. starts a fast fake OpenAI upstream (50 ms) in its own process, and the gateway exactly as
   ``make start`` does, with the DEFAULT settings (2 gunicorn workers, the per-endpoint bulkhead at
   its default: 24 seats per endpoint per worker with the gthread front of before issue 24, 3/4 of
   ``GATEWAY_MAX_CALLS`` since; embedded Ray head; only the bind address and ports are set);
2. deploys ``healthy`` on the fast upstream; then, for each variant, a stuck endpoint on a
   fresh hanging fake upstream (it answers after 600 s, longer than the run), and:
   - idle: N calls to ``healthy`` at each concurrency (default 1 and 4), a new connection per
     call (many callers, spread over the gunicorn workers), 10 s client timeout;
   - starts the stuck callers in a separate load-generator process (asyncio + aiohttp):
     ``retry``: each of the 200 loops: POST /chat to the stuck endpoint; on 503 it waits
     Retry-After and sends again; a call that got a seat hangs (the issue's scenario, and the
     one of tests/test_faults.py); ``once``: each sends ONE call and waits for its answer,
     whatever it is (stuck in the strict sense: a 503 ends that caller);
   - after a few seconds of settling, the same N healthy calls: median, p90, failures (status
     other than 200, or the 10 s client timeout);
   - stops the callers and the hanging upstream (so the calls held by the gateway fail out
     and free their threads before the next variant);
3. prints a table (idle median, under-hang median, ratio, failures, seats taken, 503
   endpoint_busy answers) and the CPU each group of processes used in each phase (from
   /proc: gunicorn workers, Ray processes, the load generator, the fakes, this client, and
   everything else on the machine), and writes ``bench/results/isolation.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import httpx

from .__main__ import RESULTS, ROOT, clean_env, free_port, gateway_env, start_fake, start_gateway, wait_ready, wait_until

VARIANTS = {
    "retry": "200 callers loop on the stuck endpoint: a 503 is retried after Retry-After; a seat hangs",
    "once": "200 callers send ONE call each to the stuck endpoint and wait (stuck in the strict sense)",
}
_CLK = os.sysconf("SC_CLK_TCK")


# -- the stuck callers: a child process --------------------------------------------------------
def callers_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.isolation _callers")
    ap.add_argument("--url", required=True)
    ap.add_argument("--chat-name", required=True)
    ap.add_argument("--callers", type=int, default=200)
    ap.add_argument("--mode", choices=sorted(VARIANTS), default="retry")
    ap.add_argument("--stats", required=True, help="file rewritten with the counts every 0.25 s")
    args = ap.parse_args(argv)
    asyncio.run(_callers(args))
    os._exit(0)  # connections still hanging: do not wait for them


async def _callers(args) -> None:
    import aiohttp

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    started_at: dict[int, float] = {}  # caller -> when its current call was sent
    answers: Counter = Counter()
    history: list[tuple[float, int]] = []  # (time, 503 endpoint_busy so far)
    sent = 0
    body = {"chat_name": args.chat_name, "content": "anyone?"}

    def write_stats(final: bool = False) -> None:
        now = time.time()
        busy = answers.get("503 endpoint_busy", 0)
        history.append((now, busy))
        stats = {"at": now, "mode": args.mode, "callers": args.callers, "sent": sent, "waiting": len(started_at),
                 "waiting_over_2s": sum(1 for t in started_at.values() if now - t > 2.0),
                 "answers": dict(answers), "busy": busy, "history": history[-2000:], "final": final}
        tmp = args.stats + ".part"
        with open(tmp, "w") as fh:
            json.dump(stats, fh)
        os.replace(tmp, args.stats)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:
        async def caller(i: int) -> None:
            nonlocal sent
            while True:
                sent += 1
                started_at[i] = time.time()
                wait = 1.0
                try:
                    async with session.post(args.url, json=body) as resp:
                        raw = await resp.read()
                        wait = float(resp.headers.get("Retry-After", "1") or 1)
                        kind = ""
                        if resp.status >= 400:
                            try:
                                kind = json.loads(raw)["error"]["type"]
                            except (ValueError, KeyError, TypeError):
                                kind = "?"
                        answers[f"{resp.status} {kind}".strip()] += 1
                except aiohttp.ClientError as exc:
                    answers[f"client error {type(exc).__name__}"] += 1
                finally:
                    started_at.pop(i, None)
                if args.mode == "once":
                    return
                await asyncio.sleep(wait)

        tasks = [asyncio.create_task(caller(i)) for i in range(args.callers)]
        while not stop.is_set():
            write_stats()
            try:
                await asyncio.wait_for(stop.wait(), 0.25)
            except asyncio.TimeoutError:
                pass
        write_stats(final=True)
        for t in tasks:
            t.cancel()


# -- CPU per group of processes, from /proc ----------------------------------------------------
def _procs() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, utime + stime ticks, name)."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                stat = fh.read()
            with open(f"/proc/{entry.name}/cmdline", "rb") as fh:
                cmd = fh.read().split(b"\0")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        comm = stat[stat.find("(") + 1:stat.rfind(")")]
        out[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]), _name(comm, cmd))
    return out


def _name(comm: str, cmd: list[bytes]) -> str:
    first = cmd[0].decode(errors="replace") if cmd and cmd[0] else comm
    if first.startswith("ray::"):  # Ray workers rename themselves: ray::ServeReplica:app:deployment
        return ":".join(first.split()[0].split(":")[:3])[:40] if "ServeReplica" not in first else "ray::ServeReplica"
    base = os.path.basename(first.split()[0]) if first else comm
    if base.startswith("python") and len(cmd) > 1:  # python [-u] -m module / python [-u] script.py
        args = [a.decode(errors="replace") for a in cmd[1:] if a]
        for j, arg in enumerate(args):
            if arg == "-c":
                return "python -c"
            if arg == "-m" and j + 1 < len(args):
                return args[j + 1][:40]
            if not arg.startswith("-"):
                return os.path.basename(arg)[:40]
    return base[:40]


class CpuMeter:
    """Ticks per group between two samples: our processes by role, and the rest of the machine."""

    def __init__(self, gw_pid: int, roles: dict[int, str]) -> None:
        self.gw_pid, self.roles = gw_pid, roles

    def _group(self, pid: int, procs: dict) -> Optional[str]:
        if pid in self.roles:
            return self.roles[pid]
        if pid == self.gw_pid:
            return "gunicorn master"
        chain, p = [], pid
        while p in procs and p not in (0, 1) and len(chain) < 64:
            chain.append(p)
            p = procs[p][0]
            if p == self.gw_pid:
                if len(chain) == 1 and "gunicorn" in procs[pid][2]:
                    return "gunicorn workers"
                return "ray: " + procs[pid][2]
        return None

    @staticmethod
    def _machine() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            vals = [int(x) for x in fh.readline().split()[1:]]
        return sum(vals) - vals[3] - vals[4], sum(vals)  # busy, total (idle and iowait excluded from busy)

    def sample(self) -> dict:
        procs = _procs()
        ticks: dict[int, tuple[str, int]] = {}
        for pid, (_, t, _) in procs.items():
            group = self._group(pid, procs)
            if group is not None:
                ticks[pid] = (group, t)
        return {"time": time.monotonic(), "ticks": ticks, "machine": self._machine()}

    @staticmethod
    def cores(a: dict, b: dict) -> dict:
        """Cores used per group between samples ``a`` and ``b`` (a process new in ``b`` counts from 0)."""
        wall = max(1e-6, b["time"] - a["time"])
        groups: dict[str, float] = defaultdict(float)
        for pid, (group, t) in b["ticks"].items():
            before = a["ticks"].get(pid, (group, 0))[1]
            groups[group] += max(0, t - before) / _CLK / wall
        ours = sum(groups.values())
        busy = (b["machine"][0] - a["machine"][0]) / _CLK / wall
        out = dict(sorted(groups.items(), key=lambda kv: -kv[1]))
        out["everything else on the machine"] = max(0.0, busy - ours)
        out["machine busy (of %d cores)" % (os.cpu_count() or 1)] = busy
        return {k: round(v, 3) for k, v in out.items()}


def cpu_groups_short(cores: dict, top: int = 6) -> str:
    items = [(k, v) for k, v in cores.items() if not k.startswith("machine busy")]
    merged: dict[str, float] = defaultdict(float)
    for k, v in items:
        merged["ray (all)" if k.startswith("ray: ") else k] += v
    parts = sorted(merged.items(), key=lambda kv: -kv[1])[:top]
    busy = next(v for k, v in cores.items() if k.startswith("machine busy"))
    return f"machine {busy:.2f} cores busy: " + ", ".join(f"{k} {v:.2f}" for k, v in parts)


# -- the healthy calls --------------------------------------------------------------------------
def healthy_calls(base: str, chat_name: str, n: int, concurrency: int, timeout_s: float) -> dict:
    """``n`` calls at ``concurrency``, each on a new connection; latency, status and the gateway's overhead."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    results: list[tuple[int, float, Optional[float]]] = []
    with httpx.Client(timeout=timeout_s, limits=limits) as client:
        def one(_) -> tuple[int, float, Optional[float]]:
            t = time.perf_counter()
            overhead = None
            try:
                r = client.post(base + "/chat", json={"chat_name": chat_name, "content": "hi"})
                status = r.status_code
                overhead = float(r.headers.get("X-Gateway-Overhead-Ms", "nan"))
            except httpx.HTTPError:
                status = 0  # the client timeout (or a broken connection)
            return status, (time.perf_counter() - t) * 1000, overhead

        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(one, range(n)))
        elapsed = time.perf_counter() - started
    ms = sorted(r[1] for r in results)
    pick = lambda q: ms[min(len(ms) - 1, int(q * (len(ms) - 1)))]  # noqa: E731
    overheads = [r[2] for r in results if r[2] is not None and r[2] == r[2]]
    statuses = Counter(str(r[0]) for r in results)
    return {"calls": n, "concurrency": concurrency, "median_ms": statistics.median(ms), "p90_ms": pick(0.9),
            "max_ms": ms[-1], "failures": sum(1 for r in results if r[0] != 200), "statuses": dict(statuses),
            "gateway_overhead_median_ms": statistics.median(overheads) if overheads else None,
            "seconds": elapsed}


# -- the gateway's own view (/metrics) ----------------------------------------------------------
def gateway_view(http: httpx.Client, base: str, stuck: str) -> dict:
    try:
        text = http.get(base + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    in_flight = sum(float(v) for v in re.findall(r'^gateway_in_flight_requests\{[^}]*route="/chat"[^}]*\}\s+(\S+)', text, re.M))
    busy = sum(float(v) for v in re.findall(
        r'^gateway_requests_total\{(?=[^}]*chat_name="%s")(?=[^}]*outcome="endpoint_busy")[^}]*\}\s+(\S+)' % re.escape(stuck), text, re.M))
    return {"chat_in_flight": int(in_flight), "endpoint_busy_total": int(busy)}


def read_stats(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def busy_between(stats: dict, t0: float, t1: float) -> int:
    """503 endpoint_busy answers the callers got between wall times ``t0`` and ``t1``."""
    hist = stats.get("history") or []
    at = lambda t: max([b for ts, b in hist if ts <= t], default=0)  # noqa: E731
    return at(t1) - at(t0)


def stop_proc(proc: Optional[subprocess.Popen], grace: float = 5.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# -- the run ------------------------------------------------------------------------------------
def main() -> None:
    if sys.argv[1:2] == ["_callers"]:
        return callers_main(sys.argv[2:])
    ap = argparse.ArgumentParser(prog="python -m bench.isolation", description="bulkhead isolation benchmark (see module doc)")
    ap.add_argument("--calls", type=int, default=100, help="healthy calls per measurement")
    ap.add_argument("--concurrency", default="1,4", help="concurrency levels of the healthy calls")
    ap.add_argument("--callers", type=int, default=200, help="callers stuck on the hanging endpoint")
    ap.add_argument("--variants", default="retry,once", help="which stuck-caller behaviours to run: " +
                    "; ".join(f"{k}: {v}" for k, v in VARIANTS.items()))
    ap.add_argument("--latency", type=float, default=0.05, help="healthy upstream latency (s)")
    ap.add_argument("--hang", type=float, default=600.0, help="hanging upstream latency (s): longer than the run")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds between starting the stuck callers and measuring")
    ap.add_argument("--timeout", type=float, default=10.0, help="healthy callers' client timeout (s)")
    ap.add_argument("--quick", action="store_true", help="30 calls, concurrency 1, 3 s settle: a smoke test of the harness")
    args = ap.parse_args()
    if args.quick:
        args.calls, args.concurrency, args.settle = 30, "1", 3.0
    levels = [int(c) for c in args.concurrency.split(",")]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}: one of {', '.join(VARIANTS)}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    RESULTS.mkdir(parents=True, exist_ok=True)

    fast, fast_url = start_fake(args.latency)
    fakes: dict[int, str] = {fast.pid: "fake upstreams"}
    procs: list[subprocess.Popen] = [fast]
    callers: Optional[subprocess.Popen] = None
    port = free_port()
    # The defaults: only where to listen.
    env = gateway_env(port)
    base = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    gw = start_gateway(env, RESULTS / "isolation-gateway.log.tmp")
    out: dict = {"machine": f"{os.uname().machine}, {os.cpu_count()} cores", "command": "python -m " + " ".join(
                 ["bench.isolation"] + sys.argv[1:]), "gateway": "defaults: 2 gunicorn workers, "
                 "GATEWAY_ENDPOINT_MAX_IN_FLIGHT unset, embedded Ray head",
                 "upstream_latency_ms": args.latency * 1000, "calls": args.calls, "callers": args.callers,
                 "client_timeout_s": args.timeout, "settle_s": args.settle, "variants": {}}
    meter = CpuMeter(gw.pid, {os.getpid(): "this client (healthy calls)"})
    suffix = uuid.uuid4().hex[:6]
    healthy = f"healthy_{suffix}"
    try:
        with httpx.Client(timeout=120) as http:
            wait_ready(http, base)
            out["start_to_ready_s"] = round(time.perf_counter() - t0, 2)
            print(f"gateway ready in {out['start_to_ready_s']:.1f} s at {base}", flush=True)

            def deploy(name: str, upstream: str) -> None:
                r = http.post(base + "/openai/deploy", json={"api_key": "sk-bench-isolation", "chat_name": name, "model_name": "m",
                                                              "base_url": upstream, "max_retries": 0, "timeout": 300})
                assert r.status_code == 200, r.text

            deploy(healthy, fast_url)
            for _ in range(20):  # warm both workers' handles and caches
                assert http.post(base + "/chat", json={"chat_name": healthy, "content": "hi"},
                                 headers={"Connection": "close"}).status_code == 200

            for variant in variants:
                hang, hang_url = start_fake(args.hang)
                procs.append(hang)
                fakes[hang.pid] = "fake upstreams"
                meter.roles.update(fakes)
                stuck = f"stuck_{variant}_{suffix}"
                deploy(stuck, hang_url)
                row: dict = {"what": VARIANTS[variant], "stuck_endpoint": stuck, "idle": {}, "under_hang": {}, "cpu_cores": {}}
                print(f"\n[{variant}] {VARIANTS[variant]}", flush=True)

                a = meter.sample()
                for c in levels:
                    row["idle"][c] = healthy_calls(base, healthy, args.calls, c, args.timeout)
                    print(f"  idle, c={c}: median {row['idle'][c]['median_ms']:.1f} ms, p90 {row['idle'][c]['p90_ms']:.1f} ms, "
                          f"failures {row['idle'][c]['failures']}", flush=True)
                row["cpu_cores"]["idle"] = CpuMeter.cores(a, meter.sample())

                stats_path = RESULTS / f"isolation-callers-{variant}.tmp"
                stats_path.unlink(missing_ok=True)
                callers = subprocess.Popen([sys.executable, "-m", "bench.isolation", "_callers", "--url", base + "/chat",
                                            "--chat-name", stuck, "--callers", str(args.callers), "--mode", variant,
                                            "--stats", str(stats_path)], cwd=ROOT, env=clean_env(), start_new_session=True)
                meter.roles[callers.pid] = "load generator (stuck callers)"
                a = meter.sample()
                wait_until(lambda: read_stats(stats_path).get("sent", 0) >= args.callers, 30, "stuck callers started")
                time.sleep(args.settle)
                settled = read_stats(stats_path)
                b = meter.sample()
                row["cpu_cores"]["stuck callers settling"] = CpuMeter.cores(a, b)
                row["settled"] = {k: settled.get(k) for k in ("sent", "waiting", "waiting_over_2s", "answers", "busy")}
                row["settled"]["gateway"] = gateway_view(http, base, stuck)
                print(f"  stuck callers after {args.settle:g} s: {settled['waiting_over_2s']} of {args.callers} waiting (they got a "
                      f"seat), {settled['busy']} answers 503 endpoint_busy so far; gateway: {row['settled']['gateway']}", flush=True)

                t_start = time.time()
                a = meter.sample()
                for c in levels:
                    row["under_hang"][c] = healthy_calls(base, healthy, args.calls, c, args.timeout)
                    u, i = row["under_hang"][c], row["idle"][c]
                    u["ratio_to_idle"] = u["median_ms"] / i["median_ms"]
                    print(f"  under hang, c={c}: median {u['median_ms']:.1f} ms, p90 {u['p90_ms']:.1f} ms, failures {u['failures']}, "
                          f"ratio {u['ratio_to_idle']:.2f}", flush=True)
                row["cpu_cores"]["under hang (healthy calls)"] = CpuMeter.cores(a, meter.sample())
                t_end = time.time()
                final = read_stats(stats_path)
                row["during_measurement"] = {"seconds": round(t_end - t_start, 2), "busy_answers": busy_between(final, t_start, t_end),
                                             "stuck_waiting": final.get("waiting_over_2s"), "answers_total": final.get("answers"),
                                             "gateway": gateway_view(http, base, stuck)}
                row["during_measurement"]["busy_per_s"] = round(row["during_measurement"]["busy_answers"] / max(1e-6, t_end - t_start), 1)
                print(f"  while measuring: {row['during_measurement']['busy_answers']} answers 503 endpoint_busy "
                      f"({row['during_measurement']['busy_per_s']}/s), {final.get('waiting_over_2s')} callers still hanging", flush=True)
                for phase, cores in row["cpu_cores"].items():
                    print(f"  CPU {phase}: {cpu_groups_short(cores)}", flush=True)

                # Let the held calls go: stop the callers, then the hanging upstream (its calls fail out).
                stop_proc(callers)
                callers = None
                stop_proc(hang)
                procs.remove(hang)
                try:
                    wait_until(lambda: gateway_view(http, base, stuck).get("chat_in_flight", 1) <= 0, 60, "held calls released")
                except SystemExit as exc:
                    print(f"  ({exc})", flush=True)
                http.post(base + "/openai/undeploy", json={"chat_name": stuck, "force": True})
                stats_path.unlink(missing_ok=True)
                out["variants"][variant] = row
    finally:
        stop_proc(callers)
        gw.send_signal(signal.SIGTERM)
        try:
            gw.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(gw.pid, signal.SIGKILL)
            gw.wait(10)
        for proc in procs:  # the hanging upstream never answers: kill, do not wait on it
            stop_proc(proc, grace=2)
    report(out, levels)


def report(out: dict, levels: list[int]) -> None:
    lines = [f"Machine: {out['machine']}; gateway {out['gateway']}; healthy upstream {out['upstream_latency_ms']:.0f} ms; "
             f"{out['calls']} healthy calls per measurement (a new connection each, {out['client_timeout_s']:g} s client timeout); "
             f"{out['callers']} callers on an endpoint whose upstream hangs.", "",
             "| stuck callers | c | idle median ms | under-hang median ms | ratio (under/idle) | idle p90 | under p90 | "
             "failures (idle / under) | stuck callers holding a seat | 503 endpoint_busy while measuring |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for variant, row in out["variants"].items():
        for c in levels:
            i, u = row["idle"][c], row["under_hang"][c]
            d = row["during_measurement"]
            lines.append(f"| {variant} | {c} | {i['median_ms']:.1f} | {u['median_ms']:.1f} | {u['ratio_to_idle']:.2f} | "
                         f"{i['p90_ms']:.1f} | {u['p90_ms']:.1f} | {i['failures']} / {u['failures']} | "
                         f"{row['settled']['waiting_over_2s']} | {d['busy_answers']} ({d['busy_per_s']}/s) |")
    lines += ["", "Stuck callers: " + "; ".join(f"**{k}**: {v['what']}" for k, v in out["variants"].items()) + ".", "",
              "CPU (cores) while the healthy calls ran under hang:", ""]
    for variant, row in out["variants"].items():
        lines.append(f"- {variant}: idle {cpu_groups_short(row['cpu_cores']['idle'])}; "
                     f"under hang {cpu_groups_short(row['cpu_cores']['under hang (healthy calls)'])}")
    table = "\n".join(lines)
    print("\n" + table)
    (RESULTS / "isolation.json").write_text(json.dumps(out, indent=2))
    (RESULTS / "isolation.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
