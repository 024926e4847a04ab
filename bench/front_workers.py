"""The prototype ASGI ``POST /chat`` under gunicorn's two event-loop worker classes (issue 24).

    python -m bench.front_workers [--seconds 5] [--levels 1,32,128,512] [--hold 2000] [--quick]

gunicorn stays the process manager; which worker runs each worker's event loop? This runs the
measured prototype of ``bench.front_prototype`` (class ``Front``: the gateway's real
``ReplicaClient.chat`` on the loop, handles from ``replica_client.new_handles``) as the app of

- ``gunicorn-asgi``: gunicorn's own ASGI worker (``-k asgi``, ``gunicorn.workers.gasgi.ASGIWorker``);
- ``uvicorn-worker``: uvicorn's gunicorn worker (``-k uvicorn.workers.UvicornWorker``; the same code
  as the ``uvicorn-worker`` package, which uvicorn now points to),

2 workers each, every worker a Ray driver (``ray.init`` in the worker, after the fork), against
one local Ray cluster, the gateway's real replica (``bind_endpoint``, 2 workers) and the fake
OpenAI upstream. Both run with the gateway's gunicorn.conf.py values where they apply
(``--keep-alive 5 --timeout 120``) and each class's own defaults otherwise (both pick uvloop;
gunicorn's HTTP parser is its pure-Python one unless ``gunicorn_h1c`` is installed, uvicorn's is
httptools). It measures, per server:

1. req/s, p50, p99 at each concurrency (``bench.loadgen.load``: wrk, else the asyncio client),
   next to the floor (the fake called directly), and the CPU per call of the front processes
   (gunicorn master + workers) and of the replicas (``cpu_s``; in brackets net of their idle CPU);
2. idle keep-alive: when the server closes a connection left idle after one answer;
3. slow clients: ``--slow`` connections that send one byte of a request head every 5 s (plus a few
   silent ones and a few trickling a body), while a normal ``POST /chat`` and a ``GET /healthz``
   (the prototype answers it 404 from the loop, no Ray: it stands in for /healthz) are sent every
   second: their latencies, and when the server closed each kind of slow connection;
4. ``--hold`` calls at once (one burst, one connection each) against a 5 s upstream (the replica
   redeployed with room for them: ``saas_max_ongoing_requests`` raised, so that the front is what
   is measured): answered / refused (503 or no connection) / failed, p50, max, and the PSS of the
   front processes (and of the replicas) before, at peak and after.

Writes ``bench/results/front-workers.json`` and ``.md`` (``--quick`` too; ``--append`` adds this run to those
already there, e.g. the same with ``--servers`` in the other order: one pass per order, not interleaved).
Numbers on a shared 2-core machine are noisy: load generator, fake, fronts, replicas share it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .__main__ import RESULTS, cpu_s, process_table, pss_kib
from .front_prototype import APP, KEY, PROVIDER, ROOT, Front, _env, _free_port, _replica_pids, local_cluster, stop_all
from .loadgen import have_wrk, load

RAY_ENV = "FRONT_WORKERS_RAY_ADDRESS"  # the cluster the workers join (set by the parent)


# -- the app the workers load: bench.front_workers:app -------------------------------------------
class DriverFront:
    """The prototype's ``Front``, made a Ray driver in the worker (after the fork) before its lifespan."""

    def __init__(self) -> None:
        self.front = Front()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            import logging

            import ray

            if not ray.is_initialized():  # (blocking, once, before the worker serves anything)
                ray.init(address=os.environ[RAY_ENV], log_to_driver=False, logging_level=logging.WARNING,
                         configure_logging=False)
        await self.front(scope, receive, send)


app = DriverFront()

# -- the servers ----------------------------------------------------------------------------------
SERVERS = {
    "gunicorn-asgi": "asgi",  # gunicorn.workers.gasgi.ASGIWorker (gunicorn 27)
    "uvicorn-worker": "uvicorn.workers.UvicornWorker",
}

# What each server offers against slow or idle clients (read from gunicorn 27.0.1's gunicorn/asgi/protocol.py,
# workers/gasgi.py, config.py and uvicorn 0.55.0's protocols/http/httptools_impl.py, workers.py, config.py).
SETTINGS = {
    "gunicorn-asgi": {
        "head deadline": "none: no timer runs while the first request's head arrives (the keep-alive timer is armed only "
                         "from the 2nd request on, and data does not reset it, so on a kept-alive connection `keepalive` "
                         "bounds the next whole head); `timeout` (30) is the worker heartbeat",
        "body rate": "none as a rate: each wait for a body chunk is bounded by `timeout` (default 30 s; the app then "
                     "gets http.disconnect), so one byte per <30 s holds the call forever",
        "keep-alive idle": "`keepalive` / --keep-alive (default 2 s)",
        "connection cap": "`worker_connections` (default 1000) is read but NOT enforced by the ASGI worker "
                          "(nr_conns is counted, never compared); `backlog` (2048)",
        "other": "`limit_request_line` 4094, `limit_request_fields` 100, `limit_request_field_size` 8190 (sizes, not "
                 "time); `asgi_disconnect_grace_period` 3; `asgi_loop` auto (uvloop); `asgi_lifespan` auto; "
                 "`http_parser` auto (gunicorn_h1c C parser if installed, else pure Python); `graceful_timeout` 30",
    },
    "uvicorn-worker": {
        "head deadline": "none: the keep-alive timer runs only after a response and any byte cancels it",
        "body rate": "none",
        "keep-alive idle": "uvicorn `timeout_keep_alive` (uvicorn default 5 s), set by the worker from gunicorn's "
                           "`keepalive` (default 2 s)",
        "connection cap": "uvicorn `limit_concurrency` (default none): past it new requests get 503 (connections or "
                          "tasks counted), not mapped from any gunicorn setting (a subclass's CONFIG_KWARGS); gunicorn's "
                          "`worker_connections` is ignored; `backlog` (2048) is passed",
        "other": "the worker maps only keepalive, timeout (heartbeat), max_requests, backlog, forwarded_allow_ips, ssl; "
                 "uvicorn's `h11_max_incomplete_event_size`, `timeout_graceful_shutdown` need CONFIG_KWARGS; "
                 "loop/http auto (uvloop, httptools); the module warns DeprecationWarning (use `uvicorn-worker`)",
    },
}


class Server:
    """gunicorn with 2 workers of one class serving ``bench.front_workers:app`` on ``port``."""

    def __init__(self, name: str, port: int, address: str, log) -> None:
        self.name, self.port = name, port
        self.argv = [sys.executable, "-m", "gunicorn", "-c", "/dev/null",  # (not the gateway's ./gunicorn.conf.py)
                     "-k", SERVERS[name], "-w", "2", "-b", f"127.0.0.1:{port}", "--keep-alive", "5", "--timeout", "120",
                     "--graceful-timeout", "5", "--log-level", "warning", "bench.front_workers:app"]
        env = {**_env(), RAY_ENV: address, "PYTHONWARNINGS": "ignore::DeprecationWarning"}
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
                                     start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def wait_ready(self, limit: float = 180) -> None:
        deadline, ready = time.monotonic() + limit, 0
        while ready < 2:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name}: gunicorn exited ({self.proc.returncode})")
            try:
                ready += self.lines.get(timeout=max(0.1, deadline - time.monotonic())) == "ready"
            except queue.Empty:
                raise SystemExit(f"{self.name}: workers not ready within {limit:.0f}s") from None

    def pids(self) -> list[int]:
        table = process_table()
        return [self.proc.pid] + [pid for pid, (ppid, _) in table.items() if ppid == self.proc.pid]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- the measurements -------------------------------------------------------------------------------
def measure_levels(server: Server, url: str, body: dict, levels: list[int], seconds: float, replicas: list[int],
                   floor: dict) -> tuple[float, list[dict]]:
    fronts = server.pids()
    f0, t0 = cpu_s(fronts), time.monotonic()
    r0 = cpu_s(replicas)
    time.sleep(3)
    t1 = time.monotonic()
    idle_front, idle_rep = (cpu_s(fronts) - f0) / (t1 - t0), (cpu_s(replicas) - r0) / (t1 - t0)
    rows = []
    for c in levels:
        time.sleep(1)
        f0, r0, t0 = cpu_s(fronts), cpu_s(replicas), time.monotonic()
        res = load(url, body, c, seconds)
        f1, r1, t1 = cpu_s(fronts), cpu_s(replicas), time.monotonic()
        n = max(1, res["requests"])
        row = {"server": server.name, "concurrency": c, **res,
               "added_p50": res["p50"] - floor[c]["p50"], "added_p99": res["p99"] - floor[c]["p99"],
               "front_cpu_ms": (f1 - f0) * 1000 / n, "front_cpu_net_ms": (f1 - f0 - idle_front * (t1 - t0)) * 1000 / n,
               "replica_cpu_ms": (r1 - r0) * 1000 / n, "replica_cpu_net_ms": (r1 - r0 - idle_rep * (t1 - t0)) * 1000 / n,
               "load_avg": os.getloadavg()[0]}
        rows.append(row)
        print(f"  {server.name} c={c}: {res['rps']:.0f} req/s p50 {res['p50']:.1f} p99 {res['p99']:.1f} ms, "
              f"front {row['front_cpu_ms']:.2f} ms/call, errors {res['errors']}", flush=True)
    return idle_front * 1000, rows


async def _keepalive_close(port: int, limit: float = 15.0) -> float | None:
    """Seconds until the server closes a connection left idle after one answer (None: still open at ``limit``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0)
    await reader.readexactly(length)
    t0 = time.monotonic()
    try:
        while await asyncio.wait_for(reader.read(1024), limit - (time.monotonic() - t0)):
            pass
        return round(time.monotonic() - t0, 2)
    except (asyncio.TimeoutError, ConnectionError):
        return None if time.monotonic() - t0 >= limit - 0.1 else round(time.monotonic() - t0, 2)
    finally:
        writer.close()


async def _slow_clients(port: int, n_head: int, seconds: float, every: float = 5.0, n_silent: int = 10,
                        n_body: int = 10) -> dict:
    """``n_head`` connections send one byte of a request head every ``every`` s (``n_silent`` send nothing,
    ``n_body`` send a whole head then one byte of the body every ``every`` s) for ``seconds``, while a
    normal POST /chat and a GET /healthz go out every second on connections of their own."""
    import aiohttp

    loop = asyncio.get_running_loop()
    start = loop.time()
    call = json.dumps({"chat_name": APP, "content": "hi"}).encode()
    head = (b"POST /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(call))
    closes: dict[str, list] = {"head": [], "silent": [], "body": []}
    said: dict[str, set] = {k: set() for k in closes}

    async def slow(kind: str, prefix: bytes, drip: bytes) -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:
            closes[kind].append(0.0)
            said[kind].add(f"connect: {type(exc).__name__}")
            return
        opened = loop.time()
        got = asyncio.ensure_future(reader.read(256))  # b"": closed; bytes: the server answered something
        try:
            if prefix:
                writer.write(prefix)
            i = 0
            while loop.time() - start < seconds:
                if i < len(drip):
                    writer.write(drip[i:i + 1])
                    i += 1
                done, _ = await asyncio.wait({got}, timeout=every)
                if done:
                    data = got.result() if not got.exception() else b""
                    closes[kind].append(round(loop.time() - opened, 1))
                    said[kind].add(data.split(b"\r\n")[0].decode(errors="replace") or "EOF")
                    return
        except ConnectionError as exc:
            closes[kind].append(round(loop.time() - opened, 1))
            said[kind].add(type(exc).__name__)
        finally:
            got.cancel()
            writer.close()

    probes: dict[str, list] = {"chat": [], "healthz": []}
    bad: dict[str, list] = {"chat": [], "healthz": []}

    async def probe(session, kind: str) -> None:
        t = time.perf_counter()
        try:
            if kind == "chat":
                async with session.post(f"http://127.0.0.1:{port}/chat", data=call,
                                        headers={"Content-Type": "application/json"}) as resp:
                    await resp.read()
                    ok = resp.status == 200
            else:
                async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    await resp.read()
                    ok = resp.status == 404  # (the prototype's answer to any other route)
            if not ok:
                bad[kind].append(resp.status)
        except Exception as exc:  # noqa: BLE001 - counted
            bad[kind].append(type(exc).__name__)
        probes[kind].append((time.perf_counter() - t) * 1000)

    tasks = [asyncio.ensure_future(slow("head", b"", head + call)) for _ in range(n_head)]
    tasks += [asyncio.ensure_future(slow("silent", b"", b"")) for _ in range(n_silent)]
    tasks += [asyncio.ensure_future(slow("body", head, call)) for _ in range(n_body)]
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True), timeout=timeout) as session:
        await asyncio.sleep(1)  # the slow connections are open
        pending = []
        while loop.time() - start < seconds:
            pending += [asyncio.ensure_future(probe(session, "chat")), asyncio.ensure_future(probe(session, "healthz"))]
            await asyncio.sleep(1)
        await asyncio.gather(*pending)
    await asyncio.gather(*tasks)
    out: dict = {"seconds": seconds, "every_s": every}
    for kind, n in (("head", n_head), ("silent", n_silent), ("body", n_body)):
        t = sorted(closes[kind])
        out[kind] = {"connections": n, "closed": len(t), "closed_after_s": [t[0], statistics.median(t), t[-1]] if t else None,
                     "server_said": sorted(said[kind])}
    for kind, lat in probes.items():
        lat = sorted(lat)
        out[f"probe_{kind}"] = {"n": len(lat), "p50_ms": round(statistics.median(lat), 1), "max_ms": round(lat[-1], 1),
                                "over_1s": sum(x > 1000 for x in lat), "failed": bad[kind]}
    return out


async def _burst(url: str, body: dict, n: int, timeout_s: float) -> dict:
    """``n`` calls at once, one connection each: answered (200), refused (503 or no connection), failed."""
    import aiohttp

    lat, refused, failed = [], 0, {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True),
                                     timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        async def one() -> None:
            nonlocal refused
            t = time.perf_counter()
            try:
                async with session.post(url, json=body) as resp:
                    await resp.read()
                    if resp.status == 200:
                        lat.append((time.perf_counter() - t) * 1000)
                    elif resp.status == 503:
                        refused += 1
                    else:
                        failed[str(resp.status)] = failed.get(str(resp.status), 0) + 1
            except aiohttp.ClientConnectorError:
                refused += 1
            except Exception as exc:  # noqa: BLE001 - counted by kind
                failed[type(exc).__name__] = failed.get(type(exc).__name__, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
    lat.sort()
    return {"calls": n, "answered": len(lat), "refused": refused, "failed": failed, "wall_s": round(time.perf_counter() - t0, 2),
            "p50_ms": round(statistics.median(lat), 1) if lat else None,
            "p99_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1) if lat else None,
            "max_ms": round(lat[-1], 1) if lat else None}


def measure_hold(server: Server, url: str, body: dict, n: int, slow: float, replicas: list[int]) -> dict:
    fronts = server.pids()
    pss = lambda pids: sum(pss_kib(p) for p in pids) / 1024  # noqa: E731
    base_f, base_r = pss(fronts), pss(replicas)
    peak = {"front": base_f, "replicas": base_r}
    halt = threading.Event()

    def sample() -> None:
        while not halt.wait(0.5):
            peak["front"] = max(peak["front"], pss(fronts))
            peak["replicas"] = max(peak["replicas"], pss(replicas))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    c0 = cpu_s(fronts)
    res = asyncio.run(_burst(url, body, n, slow + 30))
    cpu = cpu_s(fronts) - c0
    halt.set()
    sampler.join()
    time.sleep(5)
    res.update(front_pss_mib=[round(base_f), round(peak["front"]), round(pss(fronts))],
               front_pss_growth_mib=round(peak["front"] - base_f), front_cpu_ms_per_call=round(cpu * 1000 / n, 2),
               replica_pss_mib=[round(base_r), round(peak["replicas"]), round(pss(replicas))])
    print(f"  {server.name} hold {n}: {res}", flush=True)
    return res


# -- the run -------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.front_workers")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per level (default 5; --quick 2)")
    ap.add_argument("--levels", default=None, help="concurrency levels (default 1,32,128,512; --quick 1,32)")
    ap.add_argument("--hold", type=int, default=None, help="calls at once against the slow upstream (default 2000; --quick 300)")
    ap.add_argument("--slow", type=int, default=None, help="slow-head connections (default 200; --quick 40)")
    ap.add_argument("--trickle-seconds", type=float, default=None, help="how long the slow clients run (default 20; --quick 11)")
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--append", action="store_true", help="keep the runs already in front-workers.json (e.g. the other order)")
    args = ap.parse_args()
    q = args.quick
    seconds = args.seconds or (2.0 if q else 5.0)
    levels = [int(x) for x in (args.levels or ("1,32" if q else "1,32,128,512")).split(",")]
    hold = args.hold or (300 if q else 2000)
    n_slow = args.slow or (40 if q else 200)
    trickle = args.trickle_seconds or (11.0 if q else 20.0)
    servers = args.servers.split(",")
    slow_upstream = 5.0

    import httpx
    import ray
    from ray import serve

    import providers
    from gateway.config import Settings
    from gateway.serve_apps import bind_endpoint
    from gateway.schemas import validate

    started = time.monotonic()
    out: dict = {"command": "python -m bench.front_workers " + " ".join(sys.argv[1:]),
                 "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                 "load_tool": "wrk" if have_wrk() else "python (aiohttp)", "seconds": seconds, "levels": levels,
                 "hold": hold, "slow_upstream_s": slow_upstream, "slow_connections": n_slow, "trickle_seconds": trickle,
                 "versions": _versions(), "settings": SETTINGS, "servers": {}}
    procs: list[subprocess.Popen] = []
    log_path = Path(tempfile.gettempdir()) / f"front_workers-{os.getpid()}.log"
    log = log_path.open("w")

    def fake(latency: float) -> str:
        proc = subprocess.Popen([sys.executable, "-m", "tests.fakes.upstreams", "--provider", "openai", "--latency", str(latency)],
                                cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        return proc.stdout.readline().strip()

    def deploy(base_url: str, settings: Settings) -> list[int]:
        spec = validate(provider.spec_class, {"chat_name": APP, "model_name": "gpt-4o-mini", "api_key": KEY,
                                              "base_url": base_url, "workers": 2, "max_retries": 0})
        serve.run(bind_endpoint(provider, spec, settings), name=APP, route_prefix=None)
        time.sleep(2)  # (the replicas of a previous deploy are gone)
        return _replica_pids(raylet)

    def started_server(name: str) -> Server:
        server = Server(name, _free_port(), address, log)
        try:
            server.wait_ready()
        except BaseException:
            server.stop()
            raise
        return server

    try:
        url, slow_url = fake(0.05), fake(slow_upstream)
        address, raylet = local_cluster()
        provider = providers.get(PROVIDER)
        replicas = deploy(url, Settings())
        body = {"chat_name": APP, "content": "hi"}
        direct = (url + "/chat/completions", {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                  {"Authorization": f"Bearer {KEY}"})
        floor = {}
        for c in levels:
            time.sleep(1)
            floor[c] = load(*direct[:2], c, seconds, direct[2])
            print(f"  direct c={c}: {floor[c]['rps']:.0f} req/s p50 {floor[c]['p50']:.1f} p99 {floor[c]['p99']:.1f}", flush=True)
        out["direct"] = [{"concurrency": c, **r} for c, r in floor.items()]

        for name in servers:  # 50 ms upstream: levels, keep-alive, slow clients
            print(f"{name}: starting ({time.monotonic() - started:.0f}s into the run)", flush=True)
            server = started_server(name)
            try:
                chat = f"http://127.0.0.1:{server.port}/chat"
                with httpx.Client(timeout=30) as http:
                    resp = http.post(chat, json=body)
                    assert resp.status_code == 200, resp.text
                load(chat, body, 16, 2)  # warm both workers (many connections: the kernel spreads them)
                res = out["servers"][name] = {"worker_class": SERVERS[name], "argv": " ".join(server.argv[1:])}
                res["idle_front_cpu_ms_per_s"], res["levels"] = measure_levels(server, chat, body, levels, seconds, replicas, floor)
                res["keepalive_idle_close_s"] = asyncio.run(_keepalive_close(server.port))
                print(f"  {name} keep-alive idle close after {res['keepalive_idle_close_s']} s", flush=True)
                res["slow_clients"] = asyncio.run(_slow_clients(server.port, n_slow, trickle))
                print(f"  {name} slow clients: {json.dumps(res['slow_clients'])}", flush=True)
            finally:
                server.stop()

        # room in the replicas for every held call: the front is what is measured
        replicas = deploy(slow_url, Settings(saas_max_ongoing_requests=hold))
        for name in servers:
            print(f"{name}: hold {hold} ({time.monotonic() - started:.0f}s into the run)", flush=True)
            server = started_server(name)
            try:
                chat = f"http://127.0.0.1:{server.port}/chat"
                with httpx.Client(timeout=30) as http:
                    assert http.post(chat, json=body).status_code == 200
                asyncio.run(_burst(chat, body, 32, slow_upstream + 30))  # warm both workers
                time.sleep(2)
                out["servers"][name]["hold"] = measure_hold(server, chat, body, hold, slow_upstream, replicas)
            finally:
                server.stop()
        out["run_seconds"] = round(time.monotonic() - started)
    finally:
        stop_all(procs, log)
    path = RESULTS / "front-workers.json"
    runs = json.loads(path.read_text()).get("runs", []) if args.append and path.exists() else []
    runs.append(out)
    path.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    (RESULTS / "front-workers.md").write_text("\n\n".join(
        f"## Run {i} (servers in this order: {', '.join(r['servers'])})\n\n" + report(r) for i, r in enumerate(runs, 1)) + "\n")
    print("\n" + report(out))
    if log_path.stat().st_size == 0:
        log_path.unlink()
    else:
        print(f"\n(server stderr: {log_path})")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("gunicorn", "uvicorn", "uvloop", "httptools", "gunicorn_h1c", "uvicorn-worker", "ray"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def report(out: dict) -> str:
    lines = [f"`{out['command']}` - {out['machine']}; load: {out['load_tool']}, {out['seconds']:g} s per level; "
             f"upstream 50 ms; run {out.get('run_seconds', '?')} s. Versions: "
             + ", ".join(f"{k} {v}" for k, v in out["versions"].items()), "",
             "| concurrency | server | req/s | p50 ms | p99 ms | added p50 | added p99 | front CPU ms/call (net of idle) "
             "| replica CPU ms/call (net) | errors | load avg |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    direct = {r["concurrency"]: r for r in out["direct"]}
    for c in out["levels"]:
        d = direct[c]
        lines.append(f"| {c} | direct | {d['rps']:.0f} | {d['p50']:.1f} | {d['p99']:.1f} | | | | | {d['errors']} | |")
        for name, res in out["servers"].items():
            r = next(x for x in res["levels"] if x["concurrency"] == c)
            lines.append(f"| {c} | {name} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | +{r['added_p50']:.1f} | "
                         f"+{r['added_p99']:.1f} | {r['front_cpu_ms']:.2f} ({r['front_cpu_net_ms']:.2f}) | "
                         f"{r['replica_cpu_ms']:.2f} ({r['replica_cpu_net_ms']:.2f}) | {r['errors']} | {r['load_avg']:.1f} |")
    lines += ["", f"{out['hold']} calls at once (one connection each) against a {out['slow_upstream_s']:g} s upstream:", "",
              "| server | answered | refused | failed | p50 ms | p99 ms | max ms | front PSS MiB before / peak / 5 s after "
              "| front PSS growth | front CPU ms/call | replicas PSS MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, res in out["servers"].items():
        h = res.get("hold")
        if h:
            lines.append(f"| {name} | {h['answered']} | {h['refused']} | {h['failed'] or 0} | {h['p50_ms']} | {h['p99_ms']} | "
                         f"{h['max_ms']} | {' / '.join(map(str, h['front_pss_mib']))} | +{h['front_pss_growth_mib']} | "
                         f"{h['front_cpu_ms_per_call']} | {' / '.join(map(str, h['replica_pss_mib']))} |")
    lines += ["", f"Slow clients for {out['trickle_seconds']:g} s: {out['slow_connections']} connections send one byte of "
              "a request head every 5 s, 10 send nothing, 10 send a head then one body byte every 5 s; a POST /chat and a "
              "GET /healthz (404 from the loop) every second. Idle keep-alive: a connection left idle after one answer "
              "(--keep-alive 5).", "",
              "| server | /chat p50 / max ms (>1 s, failed) | /healthz p50 / max ms (>1 s, failed) | head tricklers closed "
              "(after s: min/med/max; server said) | silent closed | body tricklers closed | keep-alive idle closed after |",
              "|---|---|---|---|---|---|---|"]
    for name, res in out["servers"].items():
        s = res["slow_clients"]

        def probe(p):
            return f"{p['p50_ms']} / {p['max_ms']} ({p['over_1s']}, {len(p['failed'])})"

        def closed(k):
            g = s[k]
            return f"{g['closed']}/{g['connections']}" + (f" ({g['closed_after_s']}; {', '.join(g['server_said'])})" if g["closed"] else "")
        lines.append(f"| {name} | {probe(s['probe_chat'])} | {probe(s['probe_healthz'])} | {closed('head')} | "
                     f"{closed('silent')} | {closed('body')} | {res['keepalive_idle_close_s']} s |")
    lines += ["", "| server | setting | what it offers |", "|---|---|---|"]
    for name, table in out["settings"].items():
        lines += [f"| {name} | {k} | {v} |" for k, v in table.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
