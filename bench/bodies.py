"""What each hostile body costs ``gateway.bodies.read`` in CPU: ``python -m bench.bodies [--module PATH]``.

Issue 26.1: form bodies within the size limit (1 MiB, the default ``GATEWAY_MAX_BODY_BYTES``)
burnt seconds of CPU (a 1 MiB ``a=1&a=1...`` took 48.7 s, 80 000 header parameters 12 s) or
ended in a RecursionError (a 500). The target: any body within the size limit is answered in
at most 100 ms of CPU, and the caps answer 413 (or 400). This prints, for each body, its size,
the CPU seconds ``read(raw, content_type, forms=True)`` took (``time.process_time``: this
process's user + system time, the best of ``--repeats``), and how it was answered: ``ok`` and
the number of fields, or the error type (``RecursionError`` and any other exception: a 500).
Measured in a heap like a gateway worker's (``gateway.web`` and its imports, Ray's client
included, frozen as a worker freezes it; no Ray is started): the cyclic garbage collector's passes over that heap are part of
what a body with many lists costs. Each run also pays for the collections its objects cause
right after it (it allocates what a next request would).

``--module`` reads another version of ``gateway/bodies.py``, e.g. the committed one, without
touching the working tree::

    git show HEAD:gateway/bodies.py > /tmp/old_bodies.py
    python -m bench.bodies --module /tmp/old_bodies.py --repeats 1   # about a minute: the old one is slow

No test asserts any of it (``tests/fast/test_bodies.py`` checks how each body is answered).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
FORM = "application/x-www-form-urlencoded"
TARGET_S = 0.100


def multipart(*parts: bytes, ctype: str = "multipart/form-data; boundary=b1") -> tuple[bytes, str]:
    """A multipart body of raw parts (headers, blank line, payload), closed; boundary ``b1``."""
    return b"".join(b"--b1\r\n" + part + b"\r\n" for part in parts) + b"--b1--\r\n", ctype


def cases() -> dict[str, tuple[bytes, str]]:
    disposition = b'Content-Disposition: form-data; name="chat_name"'
    small_part = b'Content-Disposition: form-data; name="a"\r\n\r\n1'
    # the most part headers taken: 1 000 parts of 131 bytes of quoted parameter (the slowest to parse), ...
    quoted = b'Content-Disposition: form-data; name="stop"; filename="' + b"x" * 74 + b'"\r\n\r\nx'
    # ... one part with 128 KiB of them, and one with 128 KiB of short parameters
    one_quoted = b'Content-Disposition: form-data; name="stop"; filename="' + b"x" * (128 * 1024 - 58) + b'"\r\n\r\nx'
    many_params = disposition + b"; a=1" * ((128 * 1024 - 50) // 5) + b"\r\n\r\nx"
    return {
        # urlencoded
        "form: 1 MiB of a=1&a=1... (262 144 repeats)": ((b"a=1&" * (MIB // 4))[:MIB], FORM),
        "form: 1 MiB of & (empty fields)": (b"&" * (MIB - 1), FORM),
        "form: 1 000 repeated fields (the cap)": (b"&".join([b"stop=x"] * 1000), FORM),
        "form: one field of 1 MiB of %E4%BD%A0": (b"content=" + b"%E4%BD%A0" * (MIB // 9 - 1), FORM),
        "form: 1 MiB of %41, no = or & (JSON probe)": (b"%41" * (MIB // 3), FORM),
        "form: escaped JSON object of 1 MiB": (quote('{"content":"' + "你" * (MIB // 9 - 10) + '"}').encode(), FORM),
        "form: messages=[[],[],...] (350 000 lists)": (b"messages=[" + b"[]," * (MIB // 3 - 5) + b"[]]", FORM),
        # multipart
        "multipart: 80 000 header parameters": multipart(
            disposition + b"".join(b"; a%d=1" % i for i in range(80000)) + b"\r\n\r\na"),
        "multipart: 20 000 nested ( in a part header": multipart(disposition + b" " + b"(" * 20000 + b"\r\n\r\na"),
        "multipart: 8 000 nested ( in the Content-Type": multipart(
            disposition + b"\r\n\r\na", ctype="multipart/form-data; boundary=b1 " + "(" * 8000),
        "multipart: 1 MiB of small parts (18 000)": multipart(*[small_part] * (MIB // (len(small_part) + 8) - 1)),
        "multipart: 1 000 parts, 128 KiB of headers": multipart(*[quoted] * 1000),
        "multipart: one part, 128 KiB quoted header": multipart(one_quoted),
        "multipart: one part, 128 KiB of parameters": multipart(many_params),
        "multipart: 1 MiB of headers without an end": multipart(disposition + b"; x=1" * (MIB // 6)),
        "multipart: one part of 1 MiB": multipart(disposition + b"\r\n\r\n" + b"x" * (MIB - 100)),
        # JSON, for comparison (the depth check walks every list and object)
        "json: 350 000 empty lists": (b'{"a":[' + b"[]," * (MIB // 3 - 5) + b"[]]}", "application/json"),
        "json: 1 MiB string": (json.dumps({"content": "x" * (MIB - 20)}).encode(), "application/json"),
    }


def load(path: str | None):
    """``gateway.bodies``, or the file at ``path`` loaded in its place (its relative imports from ``gateway``)."""
    sys.path.insert(0, str(ROOT))
    import gateway.bodies
    import gateway.web  # noqa: F401 - a worker's heap
    import gc

    gc.freeze()  # as each gunicorn worker does once it has loaded (gunicorn.conf.py, post_worker_init)
    if path is None:
        return gateway.bodies
    spec = importlib.util.spec_from_file_location("gateway._bench_bodies", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def measure(bodies, raw: bytes, ctype: str, repeats: int) -> tuple[float, str]:
    best, outcome = float("inf"), ""
    for _ in range(repeats):
        start = time.process_time()
        try:
            data = bodies.read(raw, ctype, True).data
            outcome = f"ok, {len(data)} field(s)"
        except Exception as exc:  # noqa: BLE001 - what the gateway would answer
            data, kind = None, getattr(exc, "type", None)
            outcome = f"{kind} {getattr(exc, 'status', '')}" if kind else f"{type(exc).__name__} (a 500)"
        after = [[] for _ in range(5000)]  # a next request's allocations: the collections this body caused
        del data, after
        best = min(best, time.process_time() - start)
    return best, outcome


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", help="another gateway/bodies.py to measure (default: the working tree's)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per body; the best is printed")
    parser.add_argument("-k", dest="only", help="only the bodies whose name contains this")
    args = parser.parse_args()
    bodies = load(args.module)
    print(f"# {args.module or 'gateway/bodies.py'}; Python {platform.python_version()} on {platform.machine()}; "
          f"CPU seconds per body (best of {args.repeats}); target {TARGET_S:.3f} s")
    over = 0
    for name, (raw, ctype) in cases().items():
        if args.only and args.only not in name:
            continue
        seconds, outcome = measure(bodies, raw, ctype, args.repeats)
        over += seconds > TARGET_S
        print(f"{name:48} {len(raw):>9} B {seconds:9.4f} s  {'OVER ' if seconds > TARGET_S else ''}{outcome}",
              flush=True)
    print(f"# {over} bod{'y' if over == 1 else 'ies'} over {TARGET_S:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
