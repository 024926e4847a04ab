"""The fake provider upstream of ``tests/fakes/upstreams.py``, listening with a deep accept queue.

    python -m bench.fake_upstream [--backlog 4096] [--provider openai] [--latency S] [--piece-delay S]

aiohttp's ``TCPSite`` listens with a backlog of 128: a burst of 2 000 connections (a load test's, or a
replica's connection pool opening 1 000 at once) overflows it, and the overflowing connections are set
up only when the kernel retries (1 s later, then 3 s): seconds added to calls that a real provider,
behind its load balancers, does not add. This runs the same server (its own ``__main__``, unchanged)
with ``TCPSite``'s backlog raised (the kernel caps it at ``net.core.somaxconn``).
"""
from __future__ import annotations

import runpy
import sys


def main() -> None:
    argv = sys.argv[1:]
    backlog = 4096
    if "--backlog" in argv:
        at = argv.index("--backlog")
        backlog = int(argv[at + 1])
        del argv[at:at + 2]
    from aiohttp import web

    plain_init = web.TCPSite.__init__

    def deep_init(self, *args, **kwargs):
        kwargs["backlog"] = backlog
        plain_init(self, *args, **kwargs)

    web.TCPSite.__init__ = deep_init
    sys.argv = ["tests.fakes.upstreams", *argv]
    runpy.run_module("tests.fakes.upstreams", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
