"""Two gateway hosts against one: calls/s through two hosts of one cluster, and through one, in the same run.

    python -m bench hosts [--seconds 8] [--concurrency 32,128] [--repeats 2] [--path v1|chat] [--quick]

The question (issue 27, point 5): does a second gateway host, joined to the same Ray cluster,
carry more calls? What it does, all on this machine, bounded in time (``--quick``: 3 s runs, one
repeat, about 1 minute; the defaults about 2.5 minutes; more on a busy machine, as each run first waits up to
``--settle-limit`` s for the systems under test, then as long again for the whole machine, to be idle):

1. starts a fake OpenAI upstream (50 ms) in its own process (``bench.__main__.start_fake``);
2. starts **host 1** exactly as ``make start`` does: gunicorn + its embedded Ray head, every setting
   at its default (2 workers; the per-endpoint bulkhead at its default share); only
   where it listens (``GATEWAY_BIND``, ``GATEWAY_RAY_PORT``, ``GATEWAY_DASHBOARD_PORT``) is set, as
   ``python -m bench run`` does;
3. starts **host 2**: a second gunicorn master on another port, every setting at its default too,
   joined to host 1's embedded head with ``RAY_ADDRESS=127.0.0.1:<GATEWAY_RAY_PORT>`` (where
   ``gateway.head.EmbeddedHead`` puts it), ``RAY_AUTH_MODE=token`` (the head's token is in
   ``~/.ray/auth_token``, where the gateway's workers find it), nothing else (the gateway turns Ray's
   loopback switch off itself for a head on loopback); its gunicorn workers are Ray drivers of host 1's
   cluster, and it starts no Ray node of its own;
4. deploys ONE SaaS endpoint (provider openai, against the fake upstream, the default number of
   workers, ``max_retries: 0`` like the main bench) through host 1, and checks host 2 serves it;
5. at each concurrency C, measures three paths, interleaved per repeat (repeat 1 of every path, then
   repeat 2 in a rotated order, ...), each run preceded by a settle (CPU of the systems back near idle):
   - ``one host``: C connections to host 1;
   - ``two hosts``: the same C connections, half to host 1 and half to host 2, at the same time;
   - ``direct``: C connections to the upstream itself (the floor);
   every path's load comes from the same two load-generator processes (``bench.loadgen.load``: wrk if
   installed, else the asyncio client), each with half of C, started together: only where they send
   differs between paths;
6. reports per cell the median over the repeats of: calls/s (answers 200), answers/s (any status),
   p50 and p99 (ms, of every answer, errors included), errors (summed), the cores the machine was
   busy (with the share of processes not started here: other users' work) and two hosts / one host for
   calls/s; writes ``bench/results/hosts-latest.json`` (every run's raw numbers, both halves) and
   ``hosts-latest.md``; prints the table;
7. stops everything it started (host 2, host 1 and its Ray head, the upstream, the load generators)
   and lists any process of theirs still alive afterwards (there should be none).

Combining the two halves of a run: calls/s and errors are summed; p50 is the request-weighted mean of
the two halves' p50; p99 the larger of their p99 (an upper bound). Both hosts and everything else
share this machine's cores: with 2 cores, a second host adds no CPU, so it cannot double anything.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

import httpx

from .__main__ import (RESULTS, clean_env, cpu_s, free_port, interleaved, median_of, process_tree, settle,
                       start_fake, start_gateway, wait_until)
from .loadgen import have_wrk, load

PATHS = ("one host", "two hosts", "direct")
#: the fake upstream takes any key; this one is never printed nor written to the results
FAKE_KEY = "sk-bench-hosts-" + uuid.uuid4().hex[:8]


def _noop() -> int:
    return os.getpid()


def start_host(name: str, env_extra: dict) -> tuple[subprocess.Popen, str, Path]:
    """A gunicorn master as ``make start`` runs it (``gunicorn -c gunicorn.conf.py app:app``), in a session of its own."""
    port = free_port()
    env = {**clean_env(), "GATEWAY_BIND": f"127.0.0.1:{port}", **env_extra}
    log_path = RESULTS / f"hosts-{name}.log.tmp"
    proc = start_gateway(env, log_path)
    return proc, f"http://127.0.0.1:{port}", log_path


def wait_host(http: httpx.Client, base: str, proc: subprocess.Popen, log_path: Path, limit: float = 180) -> None:
    """Until ``base`` answers /readyz 200; stops early (with its log's last lines) if the master exits."""
    def ready() -> bool:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            raise SystemExit(f"gateway host at {base} exited (code {proc.returncode}):\n" + "\n".join(tail))
        try:
            return http.get(base + "/readyz").status_code == 200
        except httpx.HTTPError:
            return False
    wait_until(ready, limit, f"gateway host {base} ready")


def started_at(pid: int) -> Optional[int]:
    """When ``pid`` started (field 22 of /proc/<pid>/stat, clock ticks since boot): tells a process from a later one
    that reuses its pid. None: gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])


def note(seen: dict[int, Optional[int]], pids) -> None:
    for pid in pids:
        if pid not in seen and pid != os.getpid():
            seen[pid] = started_at(pid)


def still_alive(seen: dict[int, Optional[int]]) -> list[int]:
    """The processes of ``seen`` still running (the same ones: same start time)."""
    return sorted(p for p, t in seen.items() if t is not None and started_at(p) == t)


def machine_busy_ticks() -> tuple[int, int]:
    with open("/proc/stat") as fh:
        vals = [int(x) for x in fh.readline().split()[1:]]
    return sum(vals) - vals[3] - vals[4], sum(vals)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def groups(gw1: int, gw2: int, fake: int, loadgens: list[int]) -> dict[str, set[int]]:
    """Processes per role now: host 1's gunicorn (master + workers), host 1's Ray head (every Ray process:
    GCS, raylet, dashboard, Serve's controller, the replica), host 2's gunicorn, the upstream, the load generators."""
    tree1 = process_tree(gw1)
    gunicorn1 = {p for p in tree1 if p == gw1 or "gunicorn" in cmdline(p)}
    return {"host 1 gunicorn": gunicorn1, "ray (host 1's head, replica)": tree1 - gunicorn1,
            "host 2 gunicorn": process_tree(gw2), "upstream": process_tree(fake), "load generators": set(loadgens)}


def all_ticks() -> dict[int, tuple[str, int]]:
    """pid -> (name, user + system ticks) of every process on the machine."""
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            out[int(entry.name)] = (stat[stat.index("(") + 1:stat.rindex(")")], int(fields[11]) + int(fields[12]))
    return out


def cpu_sample(roles: dict[str, set[int]]) -> dict:
    return {"t": time.monotonic(), "cpu": {k: cpu_s(v) for k, v in roles.items()}, "machine": machine_busy_ticks(),
            "all": all_ticks(), "ours": set().union(*roles.values()) | {os.getpid()}}


def cores_between(a: dict, b: dict) -> dict[str, float]:
    wall = max(1e-6, b["t"] - a["t"])
    out = {k: (b["cpu"][k] - a["cpu"][k]) / wall for k in a["cpu"]}
    busy = (b["machine"][0] - a["machine"][0]) / os.sysconf("SC_CLK_TCK") / wall
    out["other processes"] = max(0.0, busy - sum(out.values()))  # not ours: other users' work on this machine
    out["machine busy"] = busy
    return {k: round(v, 2) for k, v in out.items()}


def others_top(a: dict, b: dict, top: int = 3) -> list[str]:
    """The processes not started here that used the most CPU between ``a`` and ``b`` (by name, summed)."""
    wall = max(1e-6, b["t"] - a["t"])
    by_name: dict[str, float] = {}
    for pid, (name, ticks) in b["all"].items():
        if pid in a["ours"] or pid in b["ours"]:
            continue
        used = (ticks - a["all"].get(pid, (name, 0))[1]) / os.sysconf("SC_CLK_TCK") / wall
        by_name[name] = by_name.get(name, 0.0) + used
    return [f"{n} {v:.2f}" for n, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:top] if v >= 0.02]


def quiet(limit: float, idle_cores: float = 0.5) -> float:
    """Wait (at most ``limit`` s) until the whole machine is busy less than ``idle_cores`` over half a second
    (other users' processes share it); returns the wait."""
    t0 = time.monotonic()
    last = machine_busy_ticks()[0]
    while time.monotonic() - t0 < limit:
        time.sleep(0.5)
        now = machine_busy_ticks()[0]
        if (now - last) / os.sysconf("SC_CLK_TCK") < idle_cores * 0.5:
            break
        last = now
    return time.monotonic() - t0


def ok_rps(res: dict) -> float:
    """Calls answered 200 per second (the load generators' req/s counts every answer)."""
    n = res["requests"]
    return res["rps"] * (n - res["errors"]) / n if n else 0.0


def combine(halves: list[dict]) -> dict:
    """One run from its two halves: rates and errors summed, p50 request-weighted, p90/p99/max the larger."""
    n = sum(h["requests"] for h in halves)
    weighted = lambda k: sum(h[k] * h["requests"] for h in halves) / n if n else None  # noqa: E731
    larger = lambda k: max((h[k] for h in halves if h.get(k) is not None), default=None)  # noqa: E731
    return {"rps": sum(h["rps"] for h in halves), "ok_rps": sum(ok_rps(h) for h in halves), "requests": n,
            "errors": sum(h["errors"] for h in halves), "p50": weighted("p50"), "p90": larger("p90"),
            "p99": larger("p99"), "max": larger("max"), "tool": halves[0]["tool"], "halves": halves}


def cell_of(runs: list[dict]) -> dict:
    cell = median_of(runs)
    cell["ok_rps"] = statistics.median(r["ok_rps"] for r in runs)
    cell["machine_busy_cores"] = statistics.median(r["cores"]["machine busy"] for r in runs)
    cell["other_processes_cores"] = statistics.median(r["cores"]["other processes"] for r in runs)
    return cell


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench hosts", description="calls/s through two gateway hosts "
                                 "against one, same cluster, same run (see bench/hosts.py)")
    ap.add_argument("--seconds", type=float, default=None, help="length of each load run (default 8; --quick 3)")
    ap.add_argument("--concurrency", default="32,128", help="total connections per level, comma-separated (default 32,128)")
    ap.add_argument("--repeats", type=int, default=None, help="runs of every cell, interleaved (default 2; --quick 1)")
    ap.add_argument("--latency", type=float, default=0.05, help="upstream latency (s)")
    ap.add_argument("--path", choices=["v1", "chat"], default="v1", help="gateway route: /v1/chat/completions or /chat")
    ap.add_argument("--settle-limit", type=float, default=10.0, help="most seconds to wait for idle CPU before a run")
    ap.add_argument("--quick", action="store_true", help="3 s runs, one repeat")
    args = ap.parse_args(argv)
    if args.seconds is None:
        args.seconds = 3.0 if args.quick else 8.0
    if args.repeats is None:
        args.repeats = 1 if args.quick else 2
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    levels = [int(c) for c in args.concurrency.split(",")]
    if min(levels) < 2:
        ap.error("each concurrency must be at least 2 (it is split over two load generators)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    RESULTS.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()

    out: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                 "command": " ".join(["python -m bench hosts"] + (sys.argv[2:] if argv is None else argv)),
                 "quick": args.quick, "load_tool": "wrk" if have_wrk() else "python asyncio client",
                 "seconds_per_run": args.seconds, "repeats": args.repeats, "settle_limit_s": args.settle_limit, "upstream_latency_ms": args.latency * 1000,
                 "gateway_route": "/v1/chat/completions" if args.path == "v1" else "/chat",
                 "gateway_settings": "defaults on both hosts (GATEWAY_WORKERS 2, GATEWAY_THREADS 32, "
                                     "GATEWAY_ENDPOINT_MAX_IN_FLIGHT unset = 24 per endpoint per worker, "
                                     "GATEWAY_SAAS_MAX_ONGOING_REQUESTS 256); only bind address and ports set"}
    fake, fake_url = start_fake(args.latency)
    ray_port = free_port()
    gw1 = gw2 = None
    pool: Optional[ProcessPoolExecutor] = None
    seen: dict[int, Optional[int]] = {}  # pid -> start time of every process of the systems started here (checked for strays after the stop)
    try:
        with httpx.Client(timeout=120) as http:
            t0 = time.perf_counter()
            gw1, base1, log1 = start_host("gateway1", {"GATEWAY_RAY_PORT": str(ray_port),
                                                       "GATEWAY_DASHBOARD_PORT": str(free_port())})
            wait_host(http, base1, gw1, log1)
            out["host1_start_to_ready_s"] = round(time.perf_counter() - t0, 2)
            print(f"host 1 ready in {out['host1_start_to_ready_s']:.1f} s (embedded Ray head at 127.0.0.1:{ray_port})", flush=True)

            t0 = time.perf_counter()
            head = f"127.0.0.1:{ray_port}"
            gw2, base2, log2 = start_host("gateway2", {"RAY_ADDRESS": head, "RAY_AUTH_MODE": "token"})
            wait_host(http, base2, gw2, log2)
            out["host2_start_to_ready_s"] = round(time.perf_counter() - t0, 2)
            out["host2_joined"] = f"RAY_ADDRESS={head} RAY_AUTH_MODE=token"
            print(f"host 2 ready in {out['host2_start_to_ready_s']:.1f} s, joined with {out['host2_joined']}", flush=True)

            chat_name = "bench_hosts_" + uuid.uuid4().hex[:6]
            t0 = time.perf_counter()
            r = http.post(base1 + "/openai/deploy", json={"api_key": FAKE_KEY, "chat_name": chat_name,
                                                           "model_name": "gpt-4o-mini", "base_url": fake_url,
                                                           "max_retries": 0})
            if r.status_code != 200:
                raise SystemExit(f"deploy through host 1 failed: {r.status_code} {r.text[:300]}")
            out["deploy_s"] = round(time.perf_counter() - t0, 2)
            out["endpoint"] = {"provider": "openai", "workers": "default (1)", "deployed_through": "host 1"}
            print(f"deployed {chat_name} through host 1 in {out['deploy_s']:.1f} s", flush=True)

            msgs = [{"role": "user", "content": "hi"}]
            if args.path == "v1":
                route, body = "/v1/chat/completions", {"model": chat_name, "messages": msgs}
            else:
                route, body = "/chat", {"chat_name": chat_name, "content": "hi"}
            direct = (fake_url + "/chat/completions", {"model": "gpt-4o-mini", "messages": msgs},
                      {"Authorization": f"Bearer {FAKE_KEY}"})
            one, two = (base1 + route, body, None), (base2 + route, body, None)
            for url, b, headers in (one, two, direct):  # warm every path, host 2's first calls included
                for _ in range(20):
                    resp = http.post(url, json=b, headers=headers or {})
                    if resp.status_code != 200:
                        raise SystemExit(f"warm-up call to {url.split('/', 3)[2]} answered {resp.status_code}: {resp.text[:300]}")

            # Two load-generator processes, the same for every path: only where their halves go differs.
            pool = ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"))
            loadgens = sorted({f.result() for f in [pool.submit(_noop) for _ in range(8)]})
            if len(loadgens) < 2:  # (spawned lazily; the futures above made both, or one of them twice)
                loadgens = sorted(pool._processes)  # noqa: SLF001
            halves_of = {"one host": (one, one), "two hosts": (one, two), "direct": (direct, direct)}
            c = levels[0]
            for label in PATHS:  # one warm run of 1 s per path at the first level (not measured)
                a, b_ = halves_of[label]
                for f in [pool.submit(load, t[0], t[1], n, 1.0, t[2]) for t, n in ((a, c // 2), (b_, c - c // 2))]:
                    f.result()

            roots = [fake.pid, gw1.pid, gw2.pid]
            out["levels"] = {}
            settled = 0.0
            for c in levels:
                runs: dict[str, list[dict]] = {label: [] for label in PATHS}
                for rep, label in interleaved(list(PATHS), args.repeats):
                    settled += settle(roots, limit=args.settle_limit)  # our systems idle, then the whole machine
                    waited = quiet(args.settle_limit)
                    settled += waited
                    roles = groups(gw1.pid, gw2.pid, fake.pid, loadgens)
                    note(seen, set().union(*roles.values()))
                    a, b_ = halves_of[label]
                    before = cpu_sample(roles)
                    futures = [pool.submit(load, t[0], t[1], n, args.seconds, t[2]) for t, n in ((a, c // 2), (b_, c - c // 2))]
                    halves = [f.result() for f in futures]
                    after = cpu_sample(roles)
                    for h, t in zip(halves, (a, b_)):
                        h["target"] = "upstream" if t is direct else ("host 1" if t is one else "host 2")
                        h["ok_rps"] = ok_rps(h)
                    res = combine(halves)
                    res["repeat"], res["cores"] = rep + 1, cores_between(before, after)
                    res["machine_quiet_wait_s"] = round(waited, 1)
                    res["other_processes_top"] = others_top(before, after)
                    runs[label].append(res)
                    print(f"  c={c} repeat {rep + 1} {label}: {res['ok_rps']:.0f} calls/s, p50 {res['p50']:.1f} ms, "
                          f"errors {res['errors']}, machine busy {res['cores']['machine busy']:.2f} cores "
                          f"(other processes {res['cores']['other processes']:.2f}"
                          + (f": {', '.join(res['other_processes_top'])}" if res["other_processes_top"] else "") + ")", flush=True)
                out["levels"][c] = {label: cell_of(runs[label]) for label in PATHS}
            out["settle_s_total"] = round(settled, 1)
            note(seen, process_tree(gw1.pid) | process_tree(gw2.pid) | process_tree(fake.pid) | set(loadgens))
    finally:
        stopping = time.monotonic()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for gw in (gw2, gw1):  # host 2 first: a driver of host 1's cluster
            if gw is None:
                continue
            note(seen, process_tree(gw.pid))
            if gw.poll() is None:
                gw.send_signal(signal.SIGTERM)
        for gw in (gw2, gw1):
            if gw is None:
                continue
            try:
                gw.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(gw.pid, signal.SIGKILL)
        note(seen, process_tree(fake.pid))
        fake.terminate()
        try:
            fake.wait(10)
        except subprocess.TimeoutExpired:
            fake.kill()
        deadline = time.monotonic() + 15  # (the head stops with host 1's gunicorn; Ray's workers exit after it)
        while still_alive(seen) and time.monotonic() < deadline:
            time.sleep(0.2)
        strays = still_alive(seen)
        out["left_after_stop"] = [f"{p} {cmdline(p)[:100]}" for p in strays]
        for pid in strays:  # whatever did not stop, now (the same processes only: pids are reused)
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        out["stop_s"] = round(time.monotonic() - stopping, 1)
    out["total_s"] = round(time.monotonic() - began, 1)
    report(out)


def report(out: dict) -> None:
    n = out["repeats"]
    lines = [f"Machine: {out['machine']}. BOTH gateway hosts, host 1's Ray head and replica, the fake upstream and "
             f"the load generators share this machine's {os.cpu_count()} cores: a second host adds no CPU here, so it "
             f"cannot double anything; this measures what a second host costs or gains on the same cores.", "",
             f"Load: {out['load_tool']} in two processes (half of the connections each, for every path), "
             f"{out['seconds_per_run']:g} s per run; upstream {out['upstream_latency_ms']:.0f} ms; gateway route "
             f"{out['gateway_route']}; {out['gateway_settings']}. One SaaS endpoint (openai, default workers) deployed "
             f"through host 1; host 2 joined host 1's embedded head ({out['host2_joined']}). Every cell measured {n} "
             f"time{'s' if n > 1 else ''}, interleaved across paths; values are medians over the repeats (errors: "
             f"summed). p50 / p99 are of every answer, errors included (p50: request-weighted over the two load "
             f"generators; p99: the larger of theirs). `{out['command']}`", "",
             f"Host 1 start to ready {out['host1_start_to_ready_s']:.1f} s; host 2 {out['host2_start_to_ready_s']:.1f} s; "
             f"deploy {out['deploy_s']:.1f} s; whole run {out['total_s']:.0f} s; stop {out['stop_s']:.1f} s; "
             f"processes left after the stop: {len(out['left_after_stop'])}.", "",
             "| concurrency | path | calls/s (200) | answers/s | p50 ms | p99 ms | errors | machine busy (cores) | x one host |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c, row in out["levels"].items():
        base = row["one host"]["ok_rps"]
        for label, r in row.items():
            x = f"{r['ok_rps'] / base:.2f}x" if label != "direct" and base else ""
            lines.append(f"| {c} | {label} | {r['ok_rps']:.0f} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | "
                         f"{r['errors']} | {r['machine_busy_cores']:.2f} | {x} |")
    lines += ["", "Two hosts / one host, calls/s (median of repeats), and each repeat's own ratio:", "",
              "| concurrency | two / one | per repeat | two hosts: host 1 / host 2 calls/s (median) |", "|---|---|---|---|"]
    for c, row in out["levels"].items():
        one, two = row["one host"], row["two hosts"]
        per = ", ".join(f"{t['ok_rps'] / o['ok_rps']:.2f}x" if o["ok_rps"] else "n/a" for o, t in zip(one["runs"], two["runs"]))
        h1 = statistics.median(run["halves"][0]["ok_rps"] for run in two["runs"])
        h2 = statistics.median(run["halves"][1]["ok_rps"] for run in two["runs"])
        ratio = f"{two['ok_rps'] / one['ok_rps']:.2f}x" if one["ok_rps"] else "n/a"
        lines.append(f"| {c} | {ratio} | {per} | {h1:.0f} / {h2:.0f} |")
    lines += ["", "Cores used per group of processes (median over the repeats):", "",
              "| concurrency | path | " + " | ".join(_role_names(out)) + " |", "|---|---|" + "---|" * len(_role_names(out))]
    for c, row in out["levels"].items():
        for label, r in row.items():
            vals = [statistics.median(run["cores"][k] for run in r["runs"]) for k in _role_names(out)]
            lines.append(f"| {c} | {label} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
    others = max(r["other_processes_cores"] for row in out["levels"].values() for r in row.values())
    names: dict[str, int] = {}
    for row in out["levels"].values():
        for r in row.values():
            for run in r["runs"]:
                for item in run.get("other_processes_top", []):
                    names[item.rsplit(" ", 1)[0]] = names.get(item.rsplit(" ", 1)[0], 0) + 1
    lines += ["", f"Other processes on this machine (not started by this bench: other users' work, and the kernel) "
                  f"used up to {others:.2f} cores (median over a cell's repeats) during the runs" + (
                  ": the numbers above are disturbed by them, though every path alike as far as interleaving spreads "
                  f"it; each run first waited (up to {out['settle_limit_s']:g} s) for the machine to be quiet." if others >= 0.2
                  else ".") + (" The busiest of them (runs they were among the top 3 in): "
                               + ", ".join(f"{n} ({k})" for n, k in sorted(names.items(), key=lambda kv: -kv[1])[:6]) + "."
                               if names else "")]
    if out["left_after_stop"]:
        lines += ["", "Left running after the stop (then killed): " + "; ".join(out["left_after_stop"])]
    table = "\n".join(lines)
    print(table)
    (RESULTS / "hosts-latest.json").write_text(json.dumps(out, indent=2))
    (RESULTS / "hosts-latest.md").write_text(table + "\n")


def _role_names(out: dict) -> list[str]:
    first = next(iter(out["levels"].values()))
    return list(first["one host"]["runs"][0]["cores"])


if __name__ == "__main__":
    main()
