"""Benchmarks: the gateway against direct calls (and LiteLLM's proxy), side by side in one run.

    python -m bench run [--seconds 8] [--concurrency 1,8,32,128,512] [--repeats 3] [--peer litellm] [--quick]
    python -m bench hosts ...   two gateway hosts against one (bench/hosts.py)
    python -m bench hold ...    thousands of callers held: issue 24's scenarios (bench/hold.py)

What it does, all on this machine, bounded in time (about 15 minutes with ``--peer litellm``;
``--quick``: 2 s runs, concurrency 1 and 32, one repeat, 200 in flight against a 2 s upstream):
1. starts fake OpenAI upstreams in their own processes (50 ms, and 5 s for the in-flight test;
   streams with 20 ms between tokens; ``bench/fake_upstream.py``: a deep accept queue) and the
   gateway exactly as ``make start`` does (gunicorn + embedded Ray head) on its DEFAULT settings:
   only where it listens is set (``GATEWAY_BIND``, ``GATEWAY_RAY_PORT``, ``GATEWAY_DASHBOARD_PORT``),
   no tuning; timing start to ready;
2. times deploy and undeploy of a SaaS endpoint, and measures the whole machine's memory (PSS)
   each extra SaaS endpoint costs;
3. measures the memory (PSS) of each gateway-side system at rest: the gateway's process tree
   (gunicorn, its workers, the embedded Ray head and everything Ray starts) and, with
   ``--peer litellm``, LiteLLM's (its proxy and workers, in a virtual environment of its own);
4. at each concurrency level runs every path: direct calls (the floor), gateway ``/chat``,
   gateway ``/v1/chat/completions`` and LiteLLM's proxy, all on the same upstream. Every cell
   (level x path) is measured ``--repeats`` times, interleaved: repeat 1 of every path, then
   repeat 2 of every path (in a rotated order), ... so that drift of the machine hits all paths
   alike; before each run the systems are let settle (their CPU back near idle). A cell reports
   the median over its repeats of req/s, p50, p90, p99 and max, and the sum of its errors; each
   repeat's own numbers stay in the JSON. "Added" latency is a path's median p50 (p99) minus
   direct's at the same level; gateway paths also get their req/s as a multiple of LiteLLM's;
5. measures streaming time to first token, direct and through the gateway;
6. holds ``--inflight`` (1 000) requests in flight against the 5 s upstream (one endpoint with
   2 workers), per path (direct, gateway ``/chat``, gateway ``/v1``, LiteLLM), repeated and
   interleaved the same way, while a sampler thread reads each system's PSS every 0.5 s (the
   "under load" memory is the largest sample of a run, median over the repeats), then reads it
   once more 10 s after that last run;
7. checks the numbers against the targets of issue 24 (added p50 <= 5 ms and added p99 <= 10 ms at
   concurrency 1; >= 3x LiteLLM's req/s at 32, 128, 512; in flight: no failure and none longer
   than the slow upstream + 2 s, i.e. 7 s).

Load comes from wrk when installed (``apt-get install wrk``), else from an asyncio client.
Writes ``bench/results/latest.json`` (with every repeat's raw numbers), ``latest.md`` and ``latest.png``.
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
import threading
import time
from pathlib import Path
from typing import Optional

import httpx

from .loadgen import have_wrk, load

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
GATEWAY_PATHS = ("gateway /chat", "gateway /v1")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_") and k != "RAY_ADDRESS"}


def start_fake(latency: float, piece_delay: float = 0.0) -> tuple[subprocess.Popen, str]:
    """A fake OpenAI upstream in its own process (tests/fakes/upstreams.py, with a deep accept queue:
    bench/fake_upstream.py); returns it and its base URL."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.fake_upstream", "--provider", "openai", "--latency", str(latency),
                             "--piece-delay", str(piece_delay)], cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def gateway_env(port: int) -> dict:
    """The gateway's environment in a bench: its DEFAULT settings, only where it listens set
    (GATEWAY_BIND, and the embedded head's GCS and dashboard ports, free ones)."""
    return {**clean_env(), "GATEWAY_BIND": f"127.0.0.1:{port}", "GATEWAY_RAY_PORT": str(free_port()),
            "GATEWAY_DASHBOARD_PORT": str(free_port())}


def start_gateway(env: dict, log_path: Path, tree: Path = ROOT) -> subprocess.Popen:
    """The gateway exactly as ``make start`` runs it (``gunicorn -c gunicorn.conf.py app:app``, which starts the
    embedded Ray head), from the checkout ``tree`` with this virtual environment, in a session of its own."""
    log = open(log_path, "wb")
    return subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"], cwd=tree, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop_gateway(gw: subprocess.Popen, pids: set[int] = frozenset()) -> None:
    """SIGTERM to gunicorn (in-flight calls get its graceful time; the embedded head stops with it), then
    SIGKILL to whatever is left of its processes (``pids`` and its tree now)."""
    pids = set(pids) | process_tree(gw.pid)
    gw.send_signal(signal.SIGTERM)
    try:
        gw.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(gw.pid, signal.SIGKILL)
    stop_tree(gw, pids)


def deploy_openai(http: httpx.Client, base: str, name: str, upstream: str, workers: int = 1, **fields) -> float:
    """Deploys ``name`` (provider openai, on the fake ``upstream``, no retries); returns the seconds it took."""
    t = time.perf_counter()
    r = http.post(base + "/openai/deploy", json={"api_key": "sk-bench", "chat_name": name, "model_name": "gpt-4o-mini",
                                                  "base_url": upstream, "workers": workers, "max_retries": 0, **fields})
    assert r.status_code == 200, r.text
    return time.perf_counter() - t


def pss_kib(pid: int) -> int:
    """Proportional set size of one process (0 if it is gone or unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def total_pss_mib() -> float:
    """Proportional set size of every process on the machine (a delta of it isolates what we add)."""
    return sum(pss_kib(int(e.name)) for e in Path("/proc").iterdir() if e.name.isdigit()) / 1024


def process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, session id) of every process, from /proc/<pid>/stat (fields 4 and 6)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
        table[int(entry.name)] = (int(fields[1]), int(fields[3]))
    return table


def process_tree(root: int) -> set[int]:
    """Every process of the system started as ``root``.

    Walks parent pids down from ``root``, and adds every process of a session that a process of
    the tree leads (one reparented to init when its parent exited still counts). Not the session of
    ``root`` alone: gunicorn is started in a session of its own, but the embedded Ray head is not in
    it - gateway/head.py starts ``ray start --head --block`` with start_new_session=True, so
    gcs_server, raylet, the dashboard and its agents, Serve's controller and the replicas (all
    children of ``ray start`` or of the raylet) are in the session of that ``ray start``, a child of
    gunicorn's master. LiteLLM (bench/peer.py) is started in a session of its own too.
    """
    table = process_table()
    children: dict[int, list[int]] = {}
    by_session: dict[int, list[int]] = {}
    for pid, (ppid, sid) in table.items():
        children.setdefault(ppid, []).append(pid)
        by_session.setdefault(sid, []).append(pid)
    if root not in table:
        return set()
    tree: set[int] = set()
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in tree:
            continue
        tree.add(pid)
        todo += children.get(pid, [])
        if table.get(pid, (0, 0))[1] == pid:  # a session leader in the tree: its whole session
            todo += by_session.get(pid, [])
    return tree


def tree_pss_mib(root: int) -> float:
    return sum(pss_kib(p) for p in process_tree(root)) / 1024


def process_names(pids: set[int]) -> list[str]:
    """What each process is (the first word of its command line, as Ray's setproctitle writes it)."""
    names = []
    for pid in sorted(pids):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [w.decode(errors="replace") for w in cmd if w]
        if not words:
            continue
        first = os.path.basename(words[0].split(" ")[0])  # a setproctitle title is one word with spaces
        if first.startswith("python") and len(words) > 1:  # "python -m gunicorn", "python .../dashboard.py"
            first = " ".join(os.path.basename(w) for w in words[1:3])
        names.append(first[:60])
    return names


def cpu_s(pids) -> float:
    """User + system CPU seconds of the processes ``pids`` (fields 14 and 15 of /proc/<pid>/stat; gone ones count 0)."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def tree_cpu_s(roots: list[int]) -> float:
    """User + system CPU seconds of the process trees of ``roots``."""
    return cpu_s(set().union(*(process_tree(r) for r in roots)))


def settle(roots: list[int], limit: float = 30.0, idle_cores: float = 0.25) -> float:
    """Wait (at most ``limit`` s) until the systems under test use less than ``idle_cores`` of CPU
    over half a second: what one run left queued must not be charged to the next. Returns the wait."""
    t0 = time.monotonic()
    last = tree_cpu_s(roots)
    while time.monotonic() - t0 < limit:
        time.sleep(0.5)
        now = tree_cpu_s(roots)
        if now - last < idle_cores * 0.5:
            break
        last = now
    return time.monotonic() - t0


class PssSampler(threading.Thread):
    """Reads the PSS of each system's process tree every ``every`` s; keeps each one's largest sample."""

    def __init__(self, roots: dict[str, int], every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.roots, self.every = roots, every
        self.peak_mib = {name: 0.0 for name in roots}
        self.samples = 0
        self._halt = threading.Event()  # (not _stop: Thread has a method of that name)

    def run(self) -> None:
        while True:
            for name, root in self.roots.items():
                self.peak_mib[name] = max(self.peak_mib[name], tree_pss_mib(root))
            self.samples += 1
            if self._halt.wait(self.every):
                return

    def stop(self) -> dict[str, float]:
        self._halt.set()
        self.join()
        return self.peak_mib


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


def median_of(runs: list[dict]) -> dict:
    """One cell: the median over its repeats of each measure, errors summed, the repeats kept."""
    cell: dict = {}
    for key in ("rps", "p50", "p90", "p99", "max"):
        values = [r[key] for r in runs if r.get(key) is not None]
        cell[key] = statistics.median(values) if values else None
    cell["errors"] = sum(r["errors"] for r in runs)
    cell["requests"] = sum(r["requests"] for r in runs)
    cell["runs"] = runs
    return cell


def interleaved(labels: list[str], repeats: int):
    """(repeat, label) in the order run: repeat 1 of every label, then repeat 2 (order rotated by one), ..."""
    for r in range(repeats):
        k = r % len(labels)
        for label in labels[k:] + labels[:k]:
            yield r, label


def stop_tree(root: Optional[subprocess.Popen], pids: set[int], grace: float = 15.0) -> None:
    """After ``root`` was asked to stop: SIGKILL what is left of the processes it had (``pids``)."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.2)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def main() -> None:
    if sys.argv[1:2] == ["hosts"]:  # two gateway hosts against one: its own options (bench/hosts.py)
        from .hosts import main as hosts_main

        return hosts_main(sys.argv[2:])
    if sys.argv[1:2] == ["hold"]:  # issue 24's scenarios: thousands of callers held (bench/hold.py)
        from .hold import main as hold_main

        return hold_main(sys.argv[2:])
    ap = argparse.ArgumentParser(prog="python -m bench", description="gateway benchmarks (see module doc; "
                                 "python -m bench hosts --help: two gateway hosts against one; "
                                 "python -m bench hold --help: thousands of callers held)")
    ap.add_argument("command", nargs="?", default="run", choices=["run", "hosts", "hold"])
    ap.add_argument("--seconds", type=float, default=None, help="length of each load run (default 8; --quick 2)")
    ap.add_argument("--concurrency", default=None, help="levels, comma-separated (default 1,8,32,128,512; --quick 1,32)")
    ap.add_argument("--repeats", type=int, default=None, help="runs of every cell, interleaved (default 3; --quick 1)")
    ap.add_argument("--inflight", type=int, default=None, help="requests held in flight (default 1000; --quick 200)")
    ap.add_argument("--latency", type=float, default=0.05, help="fast upstream latency (s)")
    ap.add_argument("--slow", type=float, default=None, help="slow upstream latency for the in-flight test (default 5 s; --quick 2)")
    ap.add_argument("--extra-endpoints", type=int, default=None, help="endpoints deployed to measure memory per endpoint (4; --quick 2)")
    ap.add_argument("--peer", choices=["litellm"], default=None)
    ap.add_argument("--quick", action="store_true", help="short runs, fewer levels, one repeat: a smoke test of the harness")
    args = ap.parse_args()
    defaults = ({"seconds": 2.0, "concurrency": "1,32", "repeats": 1, "inflight": 200, "slow": 2.0, "extra_endpoints": 2}
                if args.quick else
                {"seconds": 8.0, "concurrency": "1,8,32,128,512", "repeats": 3, "inflight": 1000, "slow": 5.0, "extra_endpoints": 4})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    levels = [int(c) for c in args.concurrency.split(",")]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    RESULTS.mkdir(parents=True, exist_ok=True)

    fast, fast_url = start_fake(args.latency, piece_delay=0.02)
    slow, slow_url = start_fake(args.slow)
    procs = [fast, slow]
    port = free_port()
    env = gateway_env(port)  # the gateway's defaults: no tuning (issue 24: a bench that needs special settings hides the gap)
    base = f"http://127.0.0.1:{port}"
    out: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                 "command": " ".join(["python -m bench"] + sys.argv[1:]), "quick": args.quick,
                 "load_tool": "wrk" if have_wrk() else "python asyncio client", "seconds_per_run": args.seconds,
                 "repeats": args.repeats, "upstream_latency_ms": args.latency * 1000}
    pss_before_start = total_pss_mib()
    t0 = time.perf_counter()
    gw = start_gateway(env, RESULTS / "gateway.log.tmp")
    peer = None
    gw_pids: set[int] = set()
    try:
        with httpx.Client(timeout=120) as http:
            wait_ready(http, base)
            out["start_to_ready_s"] = time.perf_counter() - t0

            def deploy(name: str, upstream: str, workers: int = 1) -> float:
                return deploy_openai(http, base, name, upstream, workers)

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

            # Memory of each gateway-side system, as the PSS of its process tree (see process_tree).
            systems = {"gateway": gw.pid, **({"litellm": peer.pid} if peer is not None else {})}
            time.sleep(3)
            out["memory"] = {name: {"at_rest_mib": tree_pss_mib(root)} for name, root in systems.items()}
            for name, root in systems.items():
                tree = process_tree(root)
                out["memory"][name]["processes_at_rest"] = len(tree)
                out["memory"][name]["process_names_at_rest"] = process_names(tree)
            settle_roots = [fast.pid, slow.pid, *systems.values()]

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
            settled = 0.0
            for c in levels:
                runs: dict[str, list[dict]] = {label: [] for label in targets}
                for r, label in interleaved(list(targets), args.repeats):
                    settled += settle(settle_roots)
                    url, body, headers = targets[label]
                    res = load(url, body, c, args.seconds, headers)
                    res["repeat"] = r + 1
                    runs[label].append(res)
                out["levels"][c] = {label: median_of(runs[label]) for label in targets}
                print(f"c={c}: " + ", ".join(f"{k} {v['rps']:.0f} req/s p50 {v['p50']:.1f} ms"
                                             for k, v in out["levels"][c].items()), flush=True)

            stream_body = {"chat_name": "bench_chat", "content": "one two three four five", "stream": True}
            ttfts: dict[str, list[float]] = {"direct": [], "gateway /chat": [], "gateway /v1": []}
            for _ in range(10 if args.quick else 30):
                ttfts["direct"].append(ttft_ms(http, fast_url + "/chat/completions",
                                               {"model": "m", "messages": msgs, "stream": True}, {"Authorization": "Bearer sk-bench"}))
                ttfts["gateway /chat"].append(ttft_ms(http, base + "/chat", stream_body))
                ttfts["gateway /v1"].append(ttft_ms(http, base + "/v1/chat/completions",
                                                    {"model": "bench_chat", "messages": msgs, "stream": True}))
            out["ttft_ms_median"] = {k: statistics.median(v) for k, v in ttfts.items()}

            slow_targets = {
                "direct": (slow_url + "/chat/completions", {"model": "m", "messages": msgs}, {"Authorization": "Bearer sk-bench"}),
                "gateway /chat": (base + "/chat", {"chat_name": "bench_slow", "content": "hi"}, None),
                "gateway /v1": (base + "/v1/chat/completions", {"model": "bench_slow", "messages": msgs}, None),
            }
            if peer is not None:
                slow_targets["litellm"] = (peer_url + "/v1/chat/completions", {"model": "bench-slow", "messages": msgs},
                                           {"Authorization": "Bearer sk-bench-master"})
            system_of = {"gateway /chat": "gateway", "gateway /v1": "gateway", "litellm": "litellm"}
            seconds = max(3 * args.slow, 10.0)
            out["inflight_concurrency"], out["slow_upstream_s"], out["inflight_seconds_per_run"] = args.inflight, args.slow, seconds
            inflight_runs: dict[str, list[dict]] = {label: [] for label in slow_targets}
            for r, label in interleaved(list(slow_targets), args.repeats):
                settled += settle(settle_roots)
                url, body, headers = slow_targets[label]
                sampler = PssSampler(systems)  # every system, in every run: the sampler's cost is alike for all
                sampler.start()
                try:
                    res = load(url, body, args.inflight, seconds, headers, timeout_s=args.slow + 30)
                finally:
                    peaks = sampler.stop()
                res["repeat"] = r + 1
                res["pss_peak_mib"] = peaks
                res["pss_samples"] = sampler.samples
                inflight_runs[label].append(res)
            last_load_ended = time.monotonic()
            out["inflight"] = {label: median_of(runs) for label, runs in inflight_runs.items()}
            for label, cell in out["inflight"].items():
                name = system_of.get(label)
                if name in systems:
                    cell["pss_under_load_mib"] = statistics.median(run["pss_peak_mib"][name] for run in cell["runs"])
                    out["memory"][name].setdefault("under_load_mib", {})[label] = cell["pss_under_load_mib"]
            out["settle_s_total"] = settled

            time.sleep(max(0.0, 10.0 - (time.monotonic() - last_load_ended)))
            for name, root in systems.items():
                out["memory"][name]["after_mib"] = tree_pss_mib(root)
            gw_pids = process_tree(gw.pid)
    finally:
        stop_gateway(gw, gw_pids)  # the embedded Ray head stops with gunicorn; whatever did not, now
        if peer is not None:
            from .peer import stop_litellm

            stop_litellm(peer)
        for proc in procs:
            if proc is not peer:
                proc.terminate()
    report(out)


def _ms(v: Optional[float], fmt: str = ".1f", sign: bool = False) -> str:
    return "n/a" if v is None else format(v, ("+" if sign else "") + fmt)


#: issue 24's targets: added p50 and p99 at concurrency 1 (ms), calls/s as a multiple of LiteLLM's at these
#: levels, and the longest call of the in-flight test past the slow upstream's latency (s)
ADDED_P50_MS, ADDED_P99_MS = 5.0, 10.0
TIMES_PEER, TIMES_PEER_LEVELS = 3.0, (32, 128, 512)
INFLIGHT_SLACK_S = 2.0


def targets_met(out: dict) -> list[tuple[str, str, str, str]]:
    """(target, path, measured, met) for each target of issue 24 this run can speak to."""
    rows = []
    levels = {int(c): row for c, row in out["levels"].items()}
    row1 = levels.get(1)
    for label in GATEWAY_PATHS:
        for key, limit in (("p50", ADDED_P50_MS), ("p99", ADDED_P99_MS)):
            target = f"added {key} at concurrency 1 <= {limit:g} ms"
            if row1 is None or label not in row1:
                rows.append((target, label, "not measured", "n/a"))
                continue
            added = row1[label][key] - row1["direct"][key]
            rows.append((target, label, f"{added:+.1f} ms", "yes" if added <= limit else "no"))
    for c in TIMES_PEER_LEVELS:
        target = f"req/s >= {TIMES_PEER:g}x LiteLLM's at concurrency {c}"
        for label in GATEWAY_PATHS:
            row = levels.get(c)
            if row is None or "litellm" not in row:
                why = "not measured" if row is None else "no LiteLLM in this run"
                rows.append((target, label, why, "n/a"))
                continue
            x = row[label]["rps"] / row["litellm"]["rps"]
            rows.append((target, label, f"{x:.2f}x ({row[label]['rps']:.0f} vs {row['litellm']['rps']:.0f})",
                         "yes" if x >= TIMES_PEER else "no"))
    n, slow = out["inflight_concurrency"], out["slow_upstream_s"]
    limit_s = slow + INFLIGHT_SLACK_S
    for label in GATEWAY_PATHS:
        cell = out["inflight"].get(label)
        if cell is None:
            continue
        fails = cell["errors"]
        rows.append((f"{n} in flight against {slow:g} s: 0 failures", label,
                     f"{fails} in {len(cell['runs'])} run(s)", "yes" if fails == 0 else "no"))
        worst = max((r["max"] for r in cell["runs"] if r.get("max") is not None), default=None)
        rows.append((f"{n} in flight against {slow:g} s: max <= {limit_s:g} s", label,
                     "n/a" if worst is None else f"{worst / 1000:.2f} s (worst run; median {cell['max'] / 1000:.2f} s)",
                     "n/a" if worst is None else ("yes" if worst <= limit_s * 1000 else "no")))
    return rows


def report(out: dict) -> None:
    n = out["repeats"]
    lines = [f"Machine: {out['machine']}; load: {out['load_tool']}, {out['seconds_per_run']:g} s per run; "
             f"upstream {out['upstream_latency_ms']:.0f} ms. Every cell was measured {n} time{'s' if n > 1 else ''}, "
             f"interleaved across paths; values are the medians of the {n} repeat{'s' if n > 1 else ''} "
             f"(errors: summed over them). `{out['command']}`", "",
             "| measure | value |", "|---|---|",
             f"| start to ready (gunicorn + embedded Ray head) | {out['start_to_ready_s']:.2f} s |",
             f"| deploy a SaaS endpoint (median) | {out['deploy_s_median']:.2f} s |",
             f"| undeploy (median) | {out['undeploy_s_median']:.2f} s |",
             f"| cluster memory (PSS, whole machine) per extra SaaS endpoint | {out['pss_per_endpoint_mib']:.0f} MiB |",
             f"| gateway + embedded cluster at rest (PSS, whole machine) | {out['pss_gateway_and_cluster_mib']:.0f} MiB |"]
    ttft = out["ttft_ms_median"]
    lines.append(f"| streaming time to first token added (p50, /chat; /v1) | {ttft['gateway /chat'] - ttft['direct']:+.1f} ms; "
                 f"{ttft['gateway /v1'] - ttft['direct']:+.1f} ms |")
    lines += ["", "| concurrency | path | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | x LiteLLM req/s | errors |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c, row in out["levels"].items():
        direct, peer = row["direct"], row.get("litellm")
        for label, r in row.items():
            x = f"{r['rps'] / peer['rps']:.2f}x" if peer and label in GATEWAY_PATHS and peer["rps"] else ""
            lines.append(f"| {c} | {label} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | "
                         f"{r['p50'] - direct['p50']:+.1f} | {r['p99'] - direct['p99']:+.1f} | {x} | {r['errors']} |")
    lines += ["", f"{out['inflight_concurrency']} requests held in flight against a {out['slow_upstream_s']:g} s upstream "
                  f"({out['inflight_seconds_per_run']:g} s per run):", "",
              "| path | req/s | p50 ms | p99 ms | max ms | errors |", "|---|---|---|---|---|---|"]
    for label, r in out["inflight"].items():
        lines.append(f"| {label} | {r['rps']:.0f} | {_ms(r['p50'], '.0f')} | {_ms(r['p99'], '.0f')} | {_ms(r['max'], '.0f')} | {r['errors']} |")
    lines += ["", "Memory (PSS) of each system's process tree: at rest (before any load), under load (largest of the "
                  "samples taken every 0.5 s during that path's in-flight run; median over the repeats), and 10 s after "
                  "the last load run:", "",
              "| system | processes at rest | at rest MiB | under load (path) MiB | after MiB |", "|---|---|---|---|---|"]
    for name, mem in out["memory"].items():
        under = "; ".join(f"{v:.0f} ({k})" for k, v in mem.get("under_load_mib", {}).items()) or "n/a"
        after = f"{mem['after_mib']:.0f}" if "after_mib" in mem else "n/a"
        lines.append(f"| {name} | {mem['processes_at_rest']} | {mem['at_rest_mib']:.0f} | {under} | {after} |")
    lines += ["", "TARGETS (issue 24; the gateway on its default settings):", "", "| target | path | measured | met |", "|---|---|---|---|"]
    lines += [f"| {t} | {p} | {m} | {ok} |" for t, p, m, ok in targets_met(out)]
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
    for ax, title in ((ax1, "p50 latency (ms), median of repeats"), (ax2, "throughput (req/s), median of repeats")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrency")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    ax1.legend()
    fig.suptitle(f"LLM gateway vs direct, {out['upstream_latency_ms']:.0f} ms upstream, {out['repeats']} repeat(s) "
                 f"({out['machine']})")
    fig.tight_layout()
    fig.savefig(RESULTS / "latest.png", dpi=110)


if __name__ == "__main__":
    main()
