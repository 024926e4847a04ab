"""Load generation: wrk (C, cheap on CPU) when installed, a small asyncio client otherwise.

Both run for a bounded time at a fixed concurrency (closed loop: each connection sends its
next request when the previous one answered) and report throughput, latency percentiles,
and failures.
"""
from __future__ import annotations

import asyncio
import json
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(us|ms|s|m)", text.strip()).groups()
    return float(value) * _UNITS[unit]


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def wrk(url: str, body: dict, concurrency: int, seconds: float, headers: Optional[dict] = None,
        timeout_s: float = 30) -> dict:
    headers = {"Content-Type": "application/json", **(headers or {})}
    script = "wrk.method = \"POST\"\nwrk.body = " + json.dumps(json.dumps(body)) + "\n" + "".join(
        f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}\n" for k, v in headers.items())
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(script)
    threads = max(1, min(2, concurrency))
    cmd = ["wrk", "-t", str(threads), "-c", str(concurrency), "-d", f"{seconds:g}s", "--timeout", f"{timeout_s:g}s",
           "--latency", "-s", fh.name, url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + timeout_s + 30).stdout
    Path(fh.name).unlink(missing_ok=True)
    dist = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.M))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(bad.group(1)) if bad else 0) + (sum(int(x) for x in sock.groups()) if sock else 0)
    max_ms = re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "requests": total, "errors": errors,
            "p50": _ms(dist["50"]), "p90": _ms(dist["90"]), "p99": _ms(dist["99"]),
            "max": _ms(max_ms.group(1)) if max_ms else None, "tool": "wrk"}


def python_load(url: str, body: dict, concurrency: int, seconds: float, headers: Optional[dict] = None,
                timeout_s: float = 30) -> dict:
    import aiohttp

    async def run() -> dict:
        latencies: list[float] = []
        errors = 0
        stop_at = time.perf_counter() + seconds
        conn = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            async def worker():
                nonlocal errors
                while time.perf_counter() < stop_at:
                    t = time.perf_counter()
                    try:
                        async with session.post(url, json=body, headers=headers) as resp:
                            await resp.read()
                            if resp.status != 200:
                                errors += 1
                    except Exception:  # noqa: BLE001 - counted
                        errors += 1
                    latencies.append((time.perf_counter() - t) * 1000)
            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
        ordered = sorted(latencies) or [0.0]
        pick = lambda q: ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1)))]  # noqa: E731
        return {"rps": len(latencies) / elapsed, "requests": len(latencies), "errors": errors,
                "p50": statistics.median(ordered), "p90": pick(0.9), "p99": pick(0.99), "max": ordered[-1], "tool": "python"}

    return asyncio.run(run())


def load(url: str, body: dict, concurrency: int, seconds: float, headers: Optional[dict] = None, timeout_s: float = 30) -> dict:
    return (wrk if have_wrk() else python_load)(url, body, concurrency, seconds, headers, timeout_s)
