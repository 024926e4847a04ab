"""Hold every caller (issue 24): thousands of concurrent, stuck and trickling callers, the gateway on its defaults.

    python -m bench hold [--quick] [--tree PATH] [--scenarios a,c,b] [--calls 2000] [--endpoints 10]
                         [--hang-callers 2000] [--trickle 500] [--repeats 2] [--profile] [--name hold]

Everything on this machine, about 5 minutes (10 against the gthread front: its queued calls time out;
``--quick``: about 3, 300 calls, 3 endpoints, 300 stuck callers, 100 trickling sockets, short phases: a smoke
test of the harness):

1. starts fake OpenAI upstreams in their own processes (``bench.__main__.start_fake``): 5 s (``--upstream``),
   50 ms (the healthy endpoint) and one that hangs (``--hang``, 600 s: longer than the run);
2. starts the gateway exactly as ``make start`` does (``gunicorn -c gunicorn.conf.py app:app`` and its embedded
   Ray head) on its DEFAULT settings: only where it listens is set (``bench.__main__.gateway_env``). ``--tree PATH``
   runs gunicorn from another checkout (e.g. the previous commit, ``git archive 7339c14``) with this virtual
   environment, for "before" numbers; the fakes and this harness stay this checkout's;
3. deploys (provider openai, default workers, ``max_retries: 0``) ``--endpoints`` endpoints on the 5 s upstream,
   ``healthy`` on the 50 ms one and ``stuck`` on the hanging one (``timeout: 300``), and warms them: three rounds of
   a plain and a streamed call to each at once (``stuck``'s given up after 1 s, just before (b): the issue's
   endpoint hangs after it served, not from its first call);
4. (a) **concurrent**: ``--calls`` (2 000) calls sent at once, each on its own connection, half of them streamed
   (``"stream": true``, read to ``data: [DONE]``), to ``POST /chat`` of one endpoint, then spread over
   ``--endpoints`` (every endpoint gets as many streamed as plain calls), and the same load sent to the upstream
   itself (``direct``: the floor); ``--repeats`` passes of each, interleaved. Per pass: answers 2xx (a stream only
   when it ended with ``[DONE]``), refused (503 ``endpoint_busy``), other failures by kind, p50/p99/max latency,
   the gateway's process tree PSS just before and the largest sample during (every 0.5 s,
   ``bench.__main__.PssSampler``), the cores each group of processes used (``bench.isolation.CpuMeter``), and
   where the plain answers' time went: outside the gateway's hooks (accept, read, write: the front's loop),
   the gateway's own overhead (``X-Gateway-Overhead-Ms``: hooks, dispatch, Serve's router, the call to the
   replica and back) and the replica's upstream call (the answer's ``latency_ms`` less that overhead: the SDK, its
   connection pool, the upstream). ``--profile``: one more pass of each gateway layout, not counted, with py-spy
   (``--gil``) on the gunicorn workers and the first endpoint's replica;
5. (c) **trickle**: ``--trickle`` (500) sockets each send one byte of a request head every ``--trickle-every``
   (5 s); one the server closes is replaced at once, so that as many trickle all along. Meanwhile, every second,
   ``GET /healthz`` and a ``POST /chat`` to ``healthy`` (a new connection each, 10 s client timeout): their latency
   and status; and when the server closed each trickling socket (seconds after it opened; what it sent first);
6. (b) **hanging endpoint**: ``healthy`` called at concurrency 4 (a new connection a call) for ``--healthy-s``/2 s
   (idle), then ``--hang-callers`` (2 000) callers each send ONE call to ``stuck`` and wait for it; after they are
   all sent and ``--settle`` s, ``healthy`` again for ``--healthy-s`` (20 s): idle median, median under the hang,
   their ratio, failures; how many stuck callers are still waiting (held) and what the others got (``--profile``:
   py-spy on the gunicorn workers and the stuck endpoint's replica all along).

Before each measured phase the calls the gateway still has in flight (``/metrics``) end, its processes and then
the whole machine settle (other users' work shares it; the cores it took are reported as "other processes").

The callers are an asyncio client (aiohttp, uvloop when installed) in a process of its own
(``python -m bench.hold _client``), with RLIMIT_NOFILE raised: it holds every connection itself.
Writes ``bench/results/<name>.json`` and ``<name>.md`` (name: ``hold``; ``hold-before`` with ``--tree``;
``hold-quick`` with ``--quick``) and prints the table, with issue 24's targets: (a) 0 refused, 0 failed,
max <= 7 s, PSS grown by <= 300 MiB; (b) healthy median <= 1.5x idle, 0 failures; (c) /healthz and chat
within 1 s all along, and the trickling connections closed by the server.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import httpx

from .__main__ import (RESULTS, ROOT, PssSampler, clean_env, deploy_openai, free_port, gateway_env, process_tree,
                       settle, start_fake, start_gateway, stop_gateway, tree_pss_mib, wait_until)
from .hosts import quiet, wait_host
from .isolation import CpuMeter, cpu_groups_short, gateway_view, stop_proc

#: issue 24's targets
MAX_LATENCY_S = 7.0
PSS_GROWTH_MIB = 300.0
HANG_RATIO = 1.5
PROBE_S = 1.0


# -- the callers: a process of their own ---------------------------------------------------------
def _percentile(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1)))]


def summarize(records: list[dict]) -> dict:
    """Counts and latency (ms) of call records ``{"status", "kind", "ms", "stream"}``: ``ok`` is a 2xx answer read
    to its end, ``refused`` a 503 endpoint_busy, ``failed`` anything else (``kinds`` says what)."""
    kinds = Counter(r["kind"] for r in records if r["kind"] != "ok")
    ms = [r["ms"] for r in records]
    return {"calls": len(records), "ok": sum(1 for r in records if r["kind"] == "ok"),
            "refused": kinds.get("503 endpoint_busy", 0),
            "failed": sum(n for k, n in kinds.items() if k != "503 endpoint_busy"), "kinds": dict(kinds),
            "median_ms": statistics.median(ms) if ms else None, "p90_ms": _percentile(ms, 0.9),
            "p99_ms": _percentile(ms, 0.99), "max_ms": max(ms) if ms else None,
            "max_ms_stream": max((r["ms"] for r in records if r.get("stream")), default=None),
            "max_ms_plain": max((r["ms"] for r in records if not r.get("stream")), default=None)}


async def call(session, url: str, body: dict, headers: Optional[dict], timeout_s: Optional[float]) -> dict:
    """One POST; a stream (``body["stream"]``) is read until ``data: [DONE]``. Its record: status, kind, ms; and for
    a plain answer of the gateway's ``/chat`` where its time went: ``gw_ms`` (the answer's ``latency_ms``: from the
    gateway's first hook to the answer) and ``overhead_ms`` (``X-Gateway-Overhead-Ms``: that less the replica's
    upstream call, SDK connection pool wait included)."""
    import aiohttp

    stream = bool(body.get("stream"))
    t = time.perf_counter()
    status, kind = 0, "ok"
    extra: dict = {}
    try:
        async with session.post(url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            status = resp.status
            extra["headers_ms"] = (time.perf_counter() - t) * 1000
            if status < 300 and stream:
                kind = "stream ended without [DONE]"
                async for line in resp.content:
                    if line.startswith(b"data: [DONE]"):
                        kind = "ok" if kind != "stream error event" else kind
                        break
                    if line.startswith(b"event: error"):
                        kind = "stream error event"
            else:
                raw = await resp.read()
                if status >= 300:
                    try:
                        kind = f"{status} {json.loads(raw)['error']['type']}"
                    except (ValueError, KeyError, TypeError):
                        kind = f"{status} ?"
                elif "x-gateway-overhead-ms" in resp.headers:
                    try:
                        extra["gw_ms"] = float(json.loads(raw)["latency_ms"])
                        extra["overhead_ms"] = float(resp.headers["x-gateway-overhead-ms"])
                    except (ValueError, KeyError, TypeError):
                        pass
    except asyncio.TimeoutError:
        kind = "client timeout"
    except aiohttp.ClientError as exc:
        kind = f"client error {type(exc).__name__}"
    return {"status": status, "kind": kind, "ms": (time.perf_counter() - t) * 1000, "stream": stream, **extra}


def breakdown(records: list[dict]) -> Optional[dict]:
    """Where the plain answers' time went (median and max, ms): ``outside`` the gateway's hooks (the connection
    accepted, the head and body read, the answer written and read: the front's loop and the client),
    the gateway's ``overhead`` (hooks, dispatch, the Serve router and the call to the replica and back),
    the replica's ``upstream`` call (the SDK, its connection pool, the upstream itself)."""
    rows = [r for r in records if "gw_ms" in r and r["kind"] == "ok"]
    if not rows:
        return None
    parts = {"outside": [r["ms"] - r["gw_ms"] for r in rows], "overhead": [r["overhead_ms"] for r in rows],
             "upstream": [r["gw_ms"] - r["overhead_ms"] for r in rows]}
    streams = [r["headers_ms"] for r in records if r["stream"] and "headers_ms" in r]
    if streams:
        parts["stream headers (client)"] = streams
    return {k: {"median": round(statistics.median(v), 1), "max": round(max(v), 1)} for k, v in parts.items()}


async def wave(spec: dict) -> dict:
    """``spec["calls"]`` calls at once, each on its own connection, call i to target (i // 2) % len(targets),
    every other one streamed (``spec["streamed"]``: "half", or "none" or "all")."""
    import aiohttp

    targets, n = spec["targets"], spec["calls"]
    streamed = {"half": lambda i: i % 2 == 1, "none": lambda i: False, "all": lambda i: True}[spec.get("streamed", "half")]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.perf_counter()
        records = await asyncio.gather(*(
            call(session, targets[(i // 2) % len(targets)]["url"],
                 {**targets[(i // 2) % len(targets)]["body"], "stream": streamed(i)},
                 targets[(i // 2) % len(targets)].get("headers"), spec.get("timeout_s", 120))
            for i in range(n)))
        out = summarize(records)
        out["seconds"] = time.perf_counter() - t0
        out["breakdown_ms"] = breakdown(records)
    return out


async def closed_loop(target: dict, concurrency: int, seconds: float, timeout_s: float = 10.0) -> list[dict]:
    """``concurrency`` callers, each sending its next call when the last one answered, a new connection a call."""
    import aiohttp

    records: list[dict] = []
    stop_at = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as session:
        async def caller() -> None:
            while time.perf_counter() < stop_at:
                records.append(await call(session, target["url"], target["body"], target.get("headers"), timeout_s))
        await asyncio.gather(*(caller() for _ in range(concurrency)))
    return records


async def hang(spec: dict) -> dict:
    """The healthy endpoint idle, then ``spec["callers"]`` callers each sending ONE call to the stuck endpoint
    and waiting, then the healthy endpoint again."""
    import aiohttp

    healthy, c = spec["healthy"], spec["concurrency"]
    out: dict = {"idle": summarize(await closed_loop(healthy, c, spec["idle_s"]))}
    answers: Counter = Counter()
    waiting = 0

    async def stuck_caller(session) -> None:
        nonlocal waiting
        waiting += 1
        try:
            record = await call(session, spec["stuck"]["url"], spec["stuck"]["body"], None, None)
            answers[record["kind"]] += 1
        finally:
            waiting -= 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(stuck_caller(session)) for _ in range(spec["callers"])]
        await asyncio.sleep(spec["settle_s"])
        out["settled"] = {"after_s": time.perf_counter() - t0, "waiting": waiting, "answers": dict(answers)}
        out["under_hang"] = summarize(await closed_loop(healthy, c, spec["under_s"]))
        out["after"] = {"waiting": waiting, "answers": dict(answers)}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    i, u = out["idle"]["median_ms"], out["under_hang"]["median_ms"]
    out["ratio"] = u / i if i and u else None
    return out


async def trickle(spec: dict) -> dict:
    """``spec["sockets"]`` sockets trickling a request head, one byte every ``spec["every_s"]``, replaced when the
    server closes one; /healthz and a chat call every second (``spec["probes"]``) for ``spec["seconds"]``."""
    import aiohttp

    host, port = spec["host"], spec["port"]
    head = (f"POST /chat HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            "Content-Length: 40\r\n\r\n").encode()
    t0 = time.perf_counter()
    stop_at = t0 + spec["seconds"]
    closed: list[dict] = []  # {"opened_at", "after_s", "how", "first_bytes"}
    open_now = 0
    peak_open = 0
    still_open: list[float] = []
    failed_opens: Counter = Counter()

    async def one_socket() -> None:
        nonlocal open_now, peak_open
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as exc:
            failed_opens[type(exc).__name__] += 1
            await asyncio.sleep(0.5)
            return
        opened = time.perf_counter()
        open_now += 1
        peak_open = max(peak_open, open_now)

        async def feed() -> None:
            for i in range(len(head)):
                writer.write(head[i:i + 1])
                await writer.drain()
                await asyncio.sleep(spec["every_s"])

        feeder = asyncio.create_task(feed())
        first, how = b"", "eof"
        try:
            while True:
                chunk = await asyncio.wait_for(reader.read(4096), max(0.01, stop_at - time.perf_counter()))
                if not chunk:
                    break
                first = first or chunk[:60]
        except asyncio.TimeoutError:  # the run ended with it open
            how = None
        except OSError as exc:  # a reset
            how = type(exc).__name__
        feeder.cancel()
        await asyncio.gather(feeder, return_exceptions=True)
        open_now -= 1
        now = time.perf_counter()
        if how is None:
            still_open.append(now - opened)
        else:
            closed.append({"opened_at": round(opened - t0, 2), "after_s": round(now - opened, 2), "how": how,
                           "first_bytes": first.decode(errors="replace")})
        writer.close()

    async def keeper() -> None:  # one trickling socket at all times in this seat
        while time.perf_counter() < stop_at - 0.5:
            await one_socket()

    probes: dict[str, list[dict]] = {name: [] for name in spec["probes"]}

    async def probe(session, name: str, target: dict, at: float) -> None:
        if target.get("body") is None:
            t = time.perf_counter()
            try:
                async with session.get(target["url"], timeout=aiohttp.ClientTimeout(total=10)) as resp:
                    await resp.read()
                    record = {"status": resp.status, "kind": "ok" if resp.status == 200 else str(resp.status)}
            except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
                record = {"status": 0, "kind": type(exc).__name__}
            record["ms"] = (time.perf_counter() - t) * 1000
        else:
            record = await call(session, target["url"], target["body"], None, 10)
        record["at"] = round(at, 2)
        probes[name].append(record)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as session:
        keepers = [asyncio.create_task(keeper()) for _ in range(spec["sockets"])]
        await asyncio.sleep(1.0)  # the sockets open first
        running = []
        while time.perf_counter() < stop_at - 1.0:
            at = time.perf_counter() - t0
            running += [asyncio.create_task(probe(session, name, target, at)) for name, target in spec["probes"].items()]
            await asyncio.sleep(1.0)
        await asyncio.gather(*running)
        await asyncio.gather(*keepers)
    after = [c["after_s"] for c in closed]
    return {"seconds": spec["seconds"], "sockets": spec["sockets"], "every_s": spec["every_s"], "peak_open": peak_open,
            "opened": len(closed) + len(still_open), "closed_by_server": len(closed),
            "closed_after_s": {"min": min(after, default=None), "median": statistics.median(after) if after else None,
                               "max": max(after, default=None)},
            "closed_how": dict(Counter(c["how"] for c in closed)),
            "server_said": dict(Counter(c["first_bytes"].split("\r\n")[0] or "(nothing)" for c in closed)),
            "still_open_at_end": len(still_open), "still_open_age_s_max": max(still_open, default=None),
            "failed_opens": dict(failed_opens), "closed": closed[:50],
            "probes": {name: {**summarize(records), "over_1s": sum(1 for r in records if r["ms"] > PROBE_S * 1000),
                              "records": records} for name, records in probes.items()}}


def client_main(argv: list[str]) -> None:
    """``python -m bench.hold _client SPEC OUT``: runs the spec's scenario, writes its result to OUT."""
    spec = json.loads(Path(argv[0]).read_text())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run({"wave": wave, "hang": hang, "trickle": trickle}[spec["scenario"]](spec))
    times = os.times()
    result["client_cpu_s"] = times.user + times.system  # (it is gone when the harness reads /proc again)
    Path(argv[1]).write_text(json.dumps(result))
    os._exit(0)  # connections still held (the stuck calls): do not wait on them


# -- the run ---------------------------------------------------------------------------------------
class Profiler:
    """py-spy recording one process (``--gil``: the samples where a thread of it holds the GIL, i.e. runs Python;
    ``--nonblocking``: never pausing it) until stopped; ``stop()`` gives the functions it was in (bench.cpu.summarize)."""

    def __init__(self, pid: int, rate: int = 50) -> None:
        from .cpu import cmdline

        self.raw = RESULTS / f"hold-profile-{pid}.raw.tmp"
        self.what = cmdline(pid)[:80]
        self.proc = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--gil", "--nonblocking",
                                      "-r", str(rate), "-f", "raw", "-o", str(self.raw), "--pid", str(pid)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> dict:
        from .cpu import summarize

        self.proc.send_signal(signal.SIGINT)  # py-spy writes what it recorded, then exits
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if not self.raw.exists():
            return {"process": self.what, "top": ["(py-spy wrote nothing)"]}
        samples = sum(int(line.rpartition(" ")[2]) for line in self.raw.read_text().splitlines() if line.strip())
        return {"process": self.what, "samples_holding_gil": samples, "top": summarize(self.raw, top=24),
                "raw": str(self.raw.relative_to(ROOT))}  # (kept: git ignores bench/results/*.tmp)


class Client:
    """The callers' process: started on a spec, measured (CPU, the gateway's PSS) while it runs, its result read."""

    def __init__(self, name: str, spec: dict) -> None:
        self.spec_path, self.out_path = RESULTS / f"hold-{name}.spec.tmp", RESULTS / f"hold-{name}.out.tmp"
        self.spec_path.write_text(json.dumps(spec))
        self.out_path.unlink(missing_ok=True)
        self.proc: Optional[subprocess.Popen] = None

    def run(self, meter: CpuMeter, gw_pid: int, limit_s: float,
            profile: Optional[dict[str, int]] = None) -> tuple[dict, dict, float, float]:
        """Result, cores per group, gateway PSS before and its largest sample while it ran (MiB). ``profile``
        (label -> pid): py-spy records each of those processes while the callers run (result["profile"])."""
        spies = {label: Profiler(pid) for label, pid in (profile or {}).items()}
        pss_before = tree_pss_mib(gw_pid)
        sampler = PssSampler({"gateway": gw_pid})
        sampler.start()
        a = meter.sample()
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.hold", "_client", str(self.spec_path), str(self.out_path)],
                                     cwd=ROOT, env=clean_env(), start_new_session=True)
        meter.roles[self.proc.pid] = "load client"
        try:
            self.proc.wait(limit_s)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"the callers did not finish within {limit_s:.0f} s")
        finally:
            stop_proc(self.proc)  # (gone already, unless it ran out of time or we were interrupted)
            b = meter.sample()
            peak = sampler.stop()["gateway"]
            profiled = {label: spy.stop() for label, spy in spies.items()}
        if self.proc.returncode != 0 or not self.out_path.exists():
            raise SystemExit(f"the callers failed (exit {self.proc.returncode})")
        result = json.loads(self.out_path.read_text())
        cores = CpuMeter.cores(a, b)
        client = round(result.pop("client_cpu_s") / max(1e-6, b["time"] - a["time"]), 3)
        cores["load client"] = client
        cores["everything else on the machine"] = round(max(0.0, cores["everything else on the machine"] - client), 3)
        if profiled:
            result["profile"] = profiled
        self.spec_path.unlink(missing_ok=True)
        self.out_path.unlink(missing_ok=True)
        return result, cores, pss_before, max(peak, pss_before)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench hold", description="issue 24's scenarios (see bench/hold.py's doc)")
    ap.add_argument("--tree", default=None, help="run gunicorn from this checkout (e.g. /tmp/before), with this .venv")
    ap.add_argument("--name", default=None, help="results file name (default hold; hold-before with --tree; hold-quick)")
    ap.add_argument("--scenarios", default="a,c,b", help="which: a (concurrent), c (trickle), b (hanging endpoint)")
    ap.add_argument("--calls", type=int, default=None, help="concurrent calls in (a) (2000; --quick 300)")
    ap.add_argument("--endpoints", type=int, default=None, help="endpoints the calls spread over in (a) (10; --quick 3)")
    ap.add_argument("--repeats", type=int, default=None, help="passes of each layout in (a), interleaved (2; --quick 1)")
    ap.add_argument("--upstream", type=float, default=5.0, help="the slow upstream's latency in (a) (s)")
    ap.add_argument("--hang", type=float, default=600.0, help="the hanging upstream's latency (s): longer than the run")
    ap.add_argument("--hang-callers", type=int, default=None, help="callers stuck in (b) (2000; --quick 300)")
    ap.add_argument("--healthy-s", type=float, default=None, help="healthy calls under the hang in (b) (20 s; --quick 6)")
    ap.add_argument("--settle", type=float, default=None, help="(b): seconds after the stuck calls are sent (8; --quick 4)")
    ap.add_argument("--trickle", type=int, default=None, help="trickling sockets in (c) (500; --quick 100)")
    ap.add_argument("--trickle-every", type=float, default=5.0, help="(c): seconds between a socket's bytes")
    ap.add_argument("--trickle-s", type=float, default=None, help="(c): how long (30 s; --quick 15)")
    ap.add_argument("--profile", action="store_true", help="py-spy (--gil) on the gunicorn workers and a replica: (a) in "
                    "one more pass of each gateway layout, not counted; (b) all along (its numbers then are not plain ones)")
    ap.add_argument("--quick", action="store_true", help="smaller and shorter: a smoke test of the harness")
    args = ap.parse_args(argv)
    defaults = ({"calls": 300, "endpoints": 3, "repeats": 1, "hang_callers": 300, "healthy_s": 6.0, "settle": 4.0,
                 "trickle": 100, "trickle_s": 15.0} if args.quick else
                {"calls": 2000, "endpoints": 10, "repeats": 2, "hang_callers": 2000, "healthy_s": 20.0, "settle": 8.0,
                 "trickle": 500, "trickle_s": 30.0})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not set(scenarios) <= {"a", "b", "c"}:
        ap.error("--scenarios: a, b and/or c")
    tree = Path(args.tree).resolve() if args.tree else ROOT
    if not (tree / "gunicorn.conf.py").exists():
        ap.error(f"--tree {tree}: no gunicorn.conf.py there")
    name = args.name or ("hold-quick" if args.quick else "hold-before" if args.tree else "hold")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    RESULTS.mkdir(parents=True, exist_ok=True)

    conf = (tree / "gunicorn.conf.py").read_text().splitlines()
    worker_class = next((line.split("=", 1)[1].split("#")[0].strip().strip("'\"") for line in conf
                         if line.startswith("worker_class")), "(none in gunicorn.conf.py)")
    out: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                 "command": " ".join(["python -m bench hold"] + argv), "tree": str(tree), "worker_class": worker_class,
                 "gateway": "defaults: only GATEWAY_BIND, GATEWAY_RAY_PORT and GATEWAY_DASHBOARD_PORT set",
                 "at": time.strftime("%Y-%m-%d %H:%M"), "quick": args.quick, "scenarios": {}}
    slow, slow_url = start_fake(args.upstream)
    fast, fast_url = start_fake(0.05)
    hanging, hang_url = start_fake(args.hang)
    fakes = [slow, fast, hanging]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = RESULTS / f"{name}-gateway.log.tmp"
    t0 = time.perf_counter()
    gw = start_gateway(gateway_env(port), log_path, tree)
    gw_pids: set[int] = set()
    try:
        with httpx.Client(timeout=120) as http:
            wait_host(http, base, gw, log_path)
            out["start_to_ready_s"] = round(time.perf_counter() - t0, 2)
            print(f"gateway ({worker_class}, {tree}) ready in {out['start_to_ready_s']:.1f} s at {base}", flush=True)
            names = [f"hold_{i}" for i in range(args.endpoints)]
            for n in names:
                deploy_openai(http, base, n, slow_url)
            deploy_openai(http, base, "healthy", fast_url)
            deploy_openai(http, base, "stuck", hang_url, timeout=300)
            gw_pids = process_tree(gw.pid)
            meter = CpuMeter(gw.pid, {p.pid: "fake upstreams" for p in fakes})
            settle_roots = [gw.pid] + [p.pid for p in fakes]
            chat = base + "/chat"
            healthy = {"url": chat, "body": {"chat_name": "healthy", "content": "hi"}}

            def run(label: str, spec: dict, limit_s: float, profile: Optional[dict[str, int]] = None,
                    drain: bool = True) -> tuple:
                # calls a pass left queued in the gateway (its client gave up on them) must not load the next one
                t = time.monotonic()
                try:
                    if drain:
                        wait_until(lambda: gateway_view(http, base, "").get("chat_in_flight", 1) <= 0, 240, "/chat drained")
                except SystemExit as exc:
                    print(f"  ({exc}: measuring anyway)", flush=True)
                if time.monotonic() - t > 2:
                    print(f"  (waited {time.monotonic() - t:.0f} s for the gateway's /chat calls in flight to end)", flush=True)
                settle(settle_roots)
                quiet(60)  # and the whole machine (other users' work shares it), up to a minute
                return Client(label, spec).run(meter, gw.pid, limit_s, profile)

            # warm: both workers' handles of every endpoint, with a plain and a streamed call at a time (a burst of first
            # calls to an endpoint a worker has no handle for yet makes a handle, and a Serve router, per call)
            for _ in range(3):
                run("warm", {"scenario": "wave", "calls": 2 * (args.endpoints + 1),
                             "targets": [{"url": chat, "body": {"chat_name": n, "content": "hi"}} for n in names + ["healthy"]]},
                    args.upstream + 60)

            if "a" in scenarios:
                out["scenarios"]["a"] = scenario_a(args, run, chat, names, slow_url, gw.pid)
            if "c" in scenarios:
                out["scenarios"]["c"] = scenario_c(args, run, port, healthy)
            if "b" in scenarios:
                out["scenarios"]["b"] = scenario_b(args, run, chat, healthy, gw.pid)
            gw_pids |= process_tree(gw.pid)
    finally:
        stop_proc(hanging, grace=2)  # the calls it holds fail out: gunicorn need not wait on them
        stop_gateway(gw, gw_pids)
        for proc in fakes:
            stop_proc(proc, grace=2)
    report(out, name)


def scenario_a(args, run, chat: str, names: list[str], slow_url: str, gw_pid: int) -> dict:
    """(a) ``args.calls`` at once, half streamed: direct, one endpoint, spread over ``args.endpoints``; with
    ``--profile``, one more pass of each gateway layout, py-spy on the gunicorn workers and the first endpoint's replica."""
    msgs = [{"role": "user", "content": "hi"}]
    layouts = {
        "direct": [{"url": slow_url + "/chat/completions", "body": {"model": "gpt-4o-mini", "messages": msgs},
                    "headers": {"Authorization": "Bearer sk-bench"}}],
        "1 endpoint": [{"url": chat, "body": {"chat_name": names[0], "content": "hi"}}],
        f"{len(names)} endpoints": [{"url": chat, "body": {"chat_name": n, "content": "hi"}} for n in names],
    }
    rows = []
    for r in range(args.repeats):
        order = list(layouts)[r % len(layouts):] + list(layouts)[:r % len(layouts)]
        for layout in order:
            spec = {"scenario": "wave", "calls": args.calls, "targets": layouts[layout], "timeout_s": args.upstream + 60}
            result, cores, before, peak = run("a", spec, args.upstream + 120)
            row = {"layout": layout, "repeat": r + 1, **result, "pss_before_mib": round(before), "pss_max_mib": round(peak),
                   "pss_growth_mib": round(peak - before), "cpu_cores": cores}
            rows.append(row)
            print(f"(a) {layout}, pass {r + 1}: {row['ok']} ok, {row['refused']} refused, {row['failed']} failed "
                  f"{row['kinds'] or ''}; p50 {row['median_ms'] / 1000:.2f} s, max {row['max_ms'] / 1000:.2f} s; gateway PSS "
                  f"{before:.0f} -> {peak:.0f} MiB; {cpu_groups_short(cores)}", flush=True)
            if row.get("breakdown_ms"):
                print("    plain answers, median (max) ms: " + ", ".join(
                    f"{k} {v['median']:.0f} ({v['max']:.0f})" for k, v in row["breakdown_ms"].items()), flush=True)
    profiled = []
    if args.profile:
        for layout in list(layouts)[1:]:
            spec = {"scenario": "wave", "calls": args.calls, "targets": layouts[layout], "timeout_s": args.upstream + 60}
            result, cores, before, peak = run("a", spec, args.upstream + 120, profile_pids(gw_pid, names[0]))
            profiled.append({"layout": layout, **result, "cpu_cores": cores})
            print(f"(a) {layout}, profiled pass (not counted): {result['ok']} ok, p50 {result['median_ms'] / 1000:.2f} s, "
                  f"max {result['max_ms'] / 1000:.2f} s", flush=True)
            print("\n".join(_profile_lines(result["profile"])), flush=True)
    return {"calls": args.calls, "upstream_s": args.upstream, "endpoints": len(names), "rows": rows, "profiled": profiled}


def profile_pids(gw_pid: int, endpoint: str) -> dict[str, int]:
    """The gunicorn workers and ``endpoint``'s replicas (Ray titles them ``ray::ServeReplica:<app>:<deployment>``)."""
    from .cpu import cmdline

    tree = process_tree(gw_pid)
    pids = {f"gunicorn worker {i + 1}": p for i, p in enumerate(sorted(p for p in tree if p != gw_pid and "gunicorn" in cmdline(p)))}
    pids.update({f"replica of {endpoint}": p for p in tree if f"ServeReplica:{endpoint}:" in cmdline(p)})
    return pids


def scenario_b(args, run, chat: str, healthy: dict, gw_pid: int) -> dict:
    """(b) the healthy endpoint idle, then with ``args.hang_callers`` stuck on the hanging one (with ``--profile``:
    py-spy on the gunicorn workers and the stuck endpoint's replica all along: its numbers are not plain ones)."""
    stuck = {"url": chat, "body": {"chat_name": "stuck", "content": "anyone?"}}
    # warm `stuck` as the others (its calls given up after 1 s): the endpoint hangs after it served, not from
    # its first call (the calls given up may stay in flight in the gateway: no wait for them to end)
    for i in range(3):
        run("warm", {"scenario": "wave", "calls": 2, "timeout_s": 1, "targets": [stuck]}, 60, drain=i == 0)
    spec = {"scenario": "hang", "healthy": healthy, "concurrency": 4, "idle_s": args.healthy_s / 2,
            "under_s": args.healthy_s, "settle_s": args.settle, "callers": args.hang_callers, "stuck": stuck}
    result, cores, before, peak = run("b", spec, args.healthy_s * 1.5 + args.settle + 120,
                                      profile_pids(gw_pid, "stuck") if args.profile else None, drain=False)
    if result.get("profile"):
        print("\n".join(_profile_lines(result["profile"])), flush=True)
        result["profiled"] = True
    i, u = result["idle"], result["under_hang"]
    print(f"(b) healthy at c=4: idle median {i['median_ms']:.1f} ms, under the hang {u['median_ms']:.1f} ms "
          f"(x{result['ratio']:.2f}), failures {i['failed'] + i['refused']} / {u['failed'] + u['refused']}; stuck callers "
          f"still waiting {result['after']['waiting']} of {args.hang_callers}, answered {result['after']['answers']}; "
          f"{cpu_groups_short(cores)}", flush=True)
    return {**result, "callers": args.hang_callers, "concurrency": 4, "pss_before_mib": round(before),
            "pss_max_mib": round(peak), "cpu_cores": cores}


def scenario_c(args, run, port: int, healthy: dict) -> dict:
    """(c) trickling sockets, /healthz and a chat call every second."""
    spec = {"scenario": "trickle", "host": "127.0.0.1", "port": port, "sockets": args.trickle, "every_s": args.trickle_every,
            "seconds": args.trickle_s, "probes": {"/healthz": {"url": f"http://127.0.0.1:{port}/healthz", "body": None},
                                                  "chat": healthy}}
    result, cores, before, peak = run("c", spec, args.trickle_s + 60)
    after = {k: "n/a" if v is None else v for k, v in result["closed_after_s"].items()}
    probes = "; ".join(f"{k}: {p['ok']}/{p['calls']} ok, max {p['max_ms']:.0f} ms, {p['over_1s']} over 1 s"
                       for k, p in result["probes"].items())
    print(f"(c) {result['sockets']} trickling: {result['closed_by_server']} closed by the server (after "
          f"{after['median']} s median, {after['max']} s max), {result['still_open_at_end']} still open at the end; "
          f"{probes}; {cpu_groups_short(cores)}", flush=True)
    return {**result, "pss_before_mib": round(before), "pss_max_mib": round(peak), "cpu_cores": cores}


# -- the report ------------------------------------------------------------------------------------
def _s(ms: Optional[float]) -> str:
    return "n/a" if ms is None else f"{ms / 1000:.2f}"


def _profile_lines(profile: dict) -> list[str]:
    lines = []
    for label, spy in profile.items():
        lines += [f"- {label} ({spy.get('samples_holding_gil', 0)} samples at 50/s):", "", "```", *spy["top"], "```"]
    return lines


def _breakdown(parts: Optional[dict]) -> str:
    if not parts:
        return ""
    return " / ".join(f"{_s(parts[k]['median'])} ({_s(parts[k]['max'])})" for k in ("outside", "overhead", "upstream"))


def targets(out: dict) -> list[tuple[str, str, str]]:
    """(target, measured, met) for each of issue 24's targets this run speaks to."""
    rows = []
    a = out["scenarios"].get("a")
    if a:
        for layout in dict.fromkeys(r["layout"] for r in a["rows"] if r["layout"] != "direct"):
            runs = [r for r in a["rows"] if r["layout"] == layout]
            refused, failed = sum(r["refused"] for r in runs), sum(r["failed"] for r in runs)
            worst = max(r["max_ms"] for r in runs)
            growth = max(r["pss_growth_mib"] for r in runs)
            direct = max((r["max_ms"] for r in a["rows"] if r["layout"] == "direct"), default=None)
            rows += [(f"(a) {a['calls']} at once, {layout}: 0 refused, 0 failed", f"{refused} refused, {failed} failed "
                      f"in {len(runs)} pass(es)", "yes" if refused == failed == 0 else "no"),
                     (f"(a) {layout}: max <= {MAX_LATENCY_S:g} s", f"{worst / 1000:.2f} s (direct {_s(direct)} s)",
                      "yes" if worst <= MAX_LATENCY_S * 1000 else "no"),
                     (f"(a) {layout}: gateway PSS grown <= {PSS_GROWTH_MIB:g} MiB", f"+{growth} MiB (largest pass)",
                      "yes" if growth <= PSS_GROWTH_MIB else "no")]
    b = out["scenarios"].get("b")
    if b:
        fails = b["under_hang"]["failed"] + b["under_hang"]["refused"] + b["idle"]["failed"] + b["idle"]["refused"]
        rows += [(f"(b) {b['callers']} stuck: healthy median <= {HANG_RATIO:g}x idle",
                  f"{b['ratio']:.2f}x ({b['idle']['median_ms']:.1f} -> {b['under_hang']['median_ms']:.1f} ms)",
                  "yes" if b["ratio"] <= HANG_RATIO else "no"),
                 ("(b) 0 failures of the healthy calls", f"{fails} of {b['idle']['calls'] + b['under_hang']['calls']}",
                  "yes" if fails == 0 else "no"),
                 (f"(b) the {b['callers']} stuck callers held (not refused)", f"{b['after']['waiting']} still waiting",
                  "yes" if b["after"]["waiting"] == b["callers"] else "no")]
    c = out["scenarios"].get("c")
    if c:
        for probe, p in c["probes"].items():
            bad = p["calls"] - p["ok"]
            rows.append((f"(c) {probe} within {PROBE_S:g} s throughout", f"max {p['max_ms']:.0f} ms, {p['over_1s']} over "
                         f"1 s, {bad} failed of {p['calls']}", "yes" if bad == 0 and p["over_1s"] == 0 else "no"))
        after = {k: "n/a" if v is None else v for k, v in c["closed_after_s"].items()}
        # met: the server closed trickling sockets, and none still open at the end had outlived those it closed
        # (the ones open then were opened later, in place of closed ones: younger than the deadline)
        oldest_open = c["still_open_age_s_max"] or 0.0
        met = c["closed_by_server"] > 0 and oldest_open <= (c["closed_after_s"]["max"] or 0.0) + 0.5
        rows.append(("(c) trickling connections closed by the server at their deadline",
                     f"{c['closed_by_server']} closed, {after['median']} s after they opened (median; max {after['max']} s); "
                     f"{c['still_open_at_end']} open at the end, the oldest {oldest_open:.1f} s old",
                     "yes" if met else "no"))
    return rows


def report(out: dict, name: str) -> None:
    lines = [f"Machine: {out['machine']}; {out['at']}; gateway from `{out['tree']}`, worker class {out['worker_class']}, "
             f"{out['gateway']}; start to ready {out.get('start_to_ready_s', 'n/a')} s. `{out['command']}`"]
    a = out["scenarios"].get("a")
    if a:
        lines += ["", f"(a) {a['calls']} calls at once (one connection each, half streamed to `[DONE]`), `POST /chat`, "
                      f"upstream {a['upstream_s']:g} s; direct: the same calls to the upstream itself:", "",
                  "| layout | pass | 2xx | refused (503 endpoint_busy) | other failures | p50 s | p99 s | max s | "
                  "gateway PSS before MiB | max during MiB | grown MiB | cores busy: gunicorn workers / ray / load client "
                  "/ other processes on the machine | plain answers, median (max) s: outside the gateway's hooks / "
                  "gateway overhead / replica's upstream call |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in a["rows"]:
            cores = r["cpu_cores"]
            ray = sum(v for k, v in cores.items() if k.startswith("ray: "))
            other = ", ".join(f"{k}: {v}" for k, v in r["kinds"].items() if k != "503 endpoint_busy")
            lines.append(f"| {r['layout']} | {r['repeat']} | {r['ok']} | {r['refused']} | {r['failed']}"
                         f"{' (' + other + ')' if other else ''} | {_s(r['median_ms'])} | {_s(r['p99_ms'])} | "
                         f"{_s(r['max_ms'])} | {r['pss_before_mib'] if r['layout'] != 'direct' else ''} | "
                         f"{r['pss_max_mib'] if r['layout'] != 'direct' else ''} | "
                         f"{r['pss_growth_mib'] if r['layout'] != 'direct' else ''} | "
                         f"{cores.get('gunicorn workers', 0):.2f} / {ray:.2f} / {cores.get('load client', 0):.2f} / "
                         f"{cores.get('everything else on the machine', 0):.2f} | {_breakdown(r.get('breakdown_ms'))} |")
        for prof in a.get("profiled", []):
            lines += ["", f"Profiled pass (`--profile`, not counted above), {prof['layout']}: {prof['ok']} ok, p50 "
                          f"{_s(prof['median_ms'])} s, max {_s(prof['max_ms'])} s; py-spy `--gil` (share of the samples "
                          "where the process ran Python, per function on the stack):", ""]
            lines += _profile_lines(prof.get("profile", {}))
    b = out["scenarios"].get("b")
    if b:
        i, u = b["idle"], b["under_hang"]
        lines += ["", f"(b) `healthy` (50 ms upstream) at concurrency {b['concurrency']}, a new connection a call, "
                      f"idle and while {b['callers']} callers wait on `stuck` (its upstream never answers in the run):", "",
                  "| | calls | median ms | p90 ms | max ms | failures |", "|---|---|---|---|---|---|",
                  f"| idle | {i['calls']} | {i['median_ms']:.1f} | {i['p90_ms']:.1f} | {i['max_ms']:.1f} | "
                  f"{i['failed'] + i['refused']} |",
                  f"| under the hang | {u['calls']} | {u['median_ms']:.1f} | {u['p90_ms']:.1f} | {u['max_ms']:.1f} | "
                  f"{u['failed'] + u['refused']} |", "",
                  f"Ratio {b['ratio']:.2f}. Stuck callers still waiting after {b['settled']['after_s']:.0f} s: "
                  f"{b['settled']['waiting']} of {b['callers']} (answered: {b['settled']['answers'] or 'none'}); at the end: "
                  f"{b['after']['waiting']}. Gateway PSS {b['pss_before_mib']} -> {b['pss_max_mib']} MiB. "
                  f"CPU: {cpu_groups_short(b['cpu_cores'])}."]
        if b.get("profile"):
            lines += ["", "Profiled all along (`--profile`: these numbers are not plain ones); py-spy `--gil`:", "",
                      *_profile_lines(b["profile"])]
    c = out["scenarios"].get("c")
    if c:
        after = {k: "n/a" if v is None else v for k, v in c["closed_after_s"].items()}
        lines += ["", f"(c) {c['sockets']} sockets each sending one byte of a request head every {c['every_s']:g} s "
                      f"(one closed is replaced at once) for {c['seconds']:g} s; meanwhile every second `GET /healthz` and "
                      f"`POST /chat` to `healthy` (new connection, 10 s client timeout):", "",
                  "| probe | calls | ok | p50 ms | max ms | over 1 s | failures |", "|---|---|---|---|---|---|---|"]
        for probe, p in c["probes"].items():
            lines.append(f"| {probe} | {p['calls']} | {p['ok']} | {p['median_ms']:.0f} | {p['max_ms']:.0f} | {p['over_1s']} | "
                         f"{p['kinds'] or 0} |")
        lines += ["", f"Trickling sockets: {c['opened']} opened (at most {c['peak_open']} at once), {c['closed_by_server']} "
                      f"closed by the server, {after['min']} / {after['median']} / {after['max']} s after they opened "
                      f"(min / median / max; how: {c['closed_how'] or 'none'}; the server's first line: "
                      f"{c['server_said'] or 'none'}); {c['still_open_at_end']} still open when the run ended "
                      f"(the oldest {c['still_open_age_s_max'] or 0:.0f} s). CPU: {cpu_groups_short(c['cpu_cores'])}."]
    lines += ["", "Targets (issue 24; the gateway on its default settings):", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {ok} |" for t, m, ok in targets(out)]
    table = "\n".join(lines)
    print("\n" + table)
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2))
    (RESULTS / f"{name}.md").write_text(table + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["_client"]:
        client_main(sys.argv[2:])
    else:
        main(sys.argv[1:])
