"""``python -m gateway apply FILE [--url URL]``: apply an endpoints file to a running gateway."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .apply import apply_over_http


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    p_apply = sub.add_parser("apply", help="deploy what an endpoints file lists (idempotent); keys come from env vars")
    p_apply.add_argument("file")
    p_apply.add_argument("--url", default=None, help="the gateway (default: http://GATEWAY_BIND)")
    args = parser.parse_args(argv)
    url = args.url or "http://" + os.environ.get("GATEWAY_BIND", "127.0.0.1:8099")
    reports = apply_over_http(url, args.file, os.environ.get("GATEWAY_ADMIN_TOKEN"))
    for report in reports:
        print(json.dumps(report, ensure_ascii=False))
    return 1 if any(r["status"] == "error" for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
