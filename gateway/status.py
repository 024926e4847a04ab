"""``python -m gateway status [--json] [--timeout S]``: is a gateway's Ray cluster up, and what runs on it.

One answer within a few seconds, without Ray's own logging and without an environment switch:

- nothing listens at the address (``RAY_ADDRESS``, else the embedded head's ``127.0.0.1:GATEWAY_RAY_PORT``):
  "no gateway is running at ...", exit 3 (``EXIT_NOT_RUNNING``, systemctl's "not running"), at once;
- something listens but cannot be read (not a Ray head, no Ray token here, a refused token, a version
  mismatch, no answer before the deadline): one line that says which, exit 4 (``EXIT_NO_ANSWER``);
- else the cluster's nodes and each endpoint (provider, model, status, replicas and their nodes, health),
  exit 0. ``--json`` prints the same as one JSON object, in every case;
- an invalid setting (``GATEWAY_*``) or a Ray Client address (``ray://``): exit 2, like a usage error.

It looks as a gateway process does (the same Ray namespace, token authentication, loopback switch), but
reads only: it creates no registry, starts no Serve and settles no deploy. The Ray side runs in a child
process (``python -m gateway.status_probe``): its stderr (Ray's log lines, a C++ check that aborts) is
kept from the answer, and a connect that hangs is killed at the deadline. Nothing it prints holds a
secret: the registry's records hold none, and only the fields ``gateway.status_probe`` chooses are shown.
How the answer is printed is ``gateway.status_render``.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Optional

from .status_render import render

EXIT_OK = 0
EXIT_NOT_RUNNING = 3
EXIT_NO_ANSWER = 4
#: the whole command's default deadline (connect and reads), seconds
DEFAULT_TIMEOUT_S = 15.0

_ROOT = Path(__file__).resolve().parent.parent


# -- where to look, and how -----------------------------------------------------------------
def target(env: Mapping[str, str]) -> tuple[str, str, str]:
    """(address, where it came from in words, Ray namespace) for the environment ``env``."""
    from .config import Settings

    settings = Settings.from_env(env)  # (an invalid setting stops here, naming the variable)
    if settings.embedded:
        return (f"127.0.0.1:{settings.ray_port}", "the embedded Ray head's port, GATEWAY_RAY_PORT",
                settings.ray_namespace)
    return settings.ray_address, "RAY_ADDRESS", settings.ray_namespace


def probe_env(env: Mapping[str, str], address: str, embedded: bool) -> dict[str, str]:
    """The child's environment: as a gateway process connects, without the gateway's settings.

    Token authentication as the gateway uses it (on by default with the embedded head; as set when
    joining ``RAY_ADDRESS``), and Ray's loopback switch for a head on loopback (see
    ``gateway.ray_switches.LOOPBACK_SWITCH``): the user sets neither.
    """
    from .head import _host_port
    from .ray_switches import LOOPBACK_SWITCH, is_loopback

    out = {k: v for k, v in env.items() if not k.startswith("GATEWAY_")}
    out.pop("RAY_ADDRESS", None)  # given as an argument
    if embedded:
        out.setdefault("RAY_AUTH_MODE", "token")
    hp = _host_port(address)
    if hp is not None and is_loopback(hp[0]):
        out[LOOPBACK_SWITCH] = "0"
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH", "")) if p)
    out.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return out


def missing_token(env: Mapping[str, str]) -> Optional[str]:
    """Why Ray would abort for want of a token (token auth on, none here), else None.

    Checked before Ray is touched: Ray's C++ client aborts the process (a failed check, not an
    exception) when token authentication is on and it finds no token.
    """
    if env.get("RAY_AUTH_MODE", "").lower() != "token" or env.get("RAY_AUTH_TOKEN"):
        return None
    path = Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser() if env.get("RAY_AUTH_TOKEN_PATH") else Path.home() / ".ray" / "auth_token"
    try:
        if path.read_text().strip():
            return None
    except OSError:
        pass
    return (f"Ray's token authentication is on (RAY_AUTH_MODE=token) but this user has no Ray token "
            f"(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or {path} is missing or empty): run this as the user "
            f"that runs the gateway, or give it the cluster's token (docs/operations.md: 'What the Ray token gives')")


def _token_source(env: Mapping[str, str]) -> str:
    if env.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    return env.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token"


def speaks_grpc(host: str, port: int, timeout: float = 1.0) -> Optional[bool]:
    """Does ``host:port`` answer as a gRPC (HTTP/2) server, as Ray's GCS does? None: cannot tell in time.

    A gRPC server opens with a SETTINGS frame; Redis (whose port 6379 is Ray's too), an HTTP/1 server
    or a database answers otherwise, or closes.
    """
    client_preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    data = b""
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=timeout) as sock:
            sock.sendall(client_preface)
            deadline = time.monotonic() + timeout
            while len(data) < 9 and time.monotonic() < deadline:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(9 - len(data))
                if not chunk:
                    break
                data += chunk
    except socket.timeout:
        return None if not data else False
    except OSError:
        return False if data else None
    if len(data) < 9:
        return None if not data else False
    return data[3] == 0x04  # the frame type of the server's first frame: SETTINGS


# -- the parent: decide, run the child, answer ----------------------------------------------
def status(env: Mapping[str, str], timeout: float = DEFAULT_TIMEOUT_S) -> tuple[int, dict]:
    """(exit code, report) for the gateway ``env`` describes; ``report["problem"]`` says what is wrong."""
    from .head import _host_port, reachable

    started = time.monotonic()
    try:
        address, source, namespace = target(env)
    except SystemExit as exc:  # an invalid setting, in words
        return 2, {"running": False, "problem": str(exc)}
    embedded = source != "RAY_ADDRESS"
    report: dict = {"address": address, "address_from": source, "namespace": namespace, "running": False}

    def done(code: int, problem: Optional[str] = None) -> tuple[int, dict]:
        if problem:
            report["problem"] = problem
        report["elapsed_s"] = round(time.monotonic() - started, 2)
        return code, report

    if address.startswith("ray://"):
        return done(2, f"RAY_ADDRESS={address} is a Ray Client address, which the gateway cannot use; set host:port "
                       "of the head's GCS (the gateway and this command run on a node of the cluster)")
    hp = _host_port(address)  # (None: "auto", which Ray resolves itself)
    if hp is not None and not reachable(address, min(1.0, timeout)):
        if embedded:
            return done(EXIT_NOT_RUNNING, f"no gateway is running at {address} ({source}): nothing listens there; "
                                          "start one with `make start`, or set RAY_ADDRESS to your Ray cluster")
        return done(EXIT_NOT_RUNNING, f"no Ray cluster is running at {address} (RAY_ADDRESS): nothing listens there; "
                                      "start its head, or fix RAY_ADDRESS")
    tls = env.get("RAY_USE_TLS", "").lower() in ("1", "true")
    grpc = speaks_grpc(*hp, timeout=min(1.0, timeout)) if hp is not None and not tls else True
    if grpc is False:
        return done(EXIT_NO_ANSWER, f"something listens at {address} ({source}) but it is not a Ray head (it does not speak "
                                    "gRPC; Redis, for one, uses 6379 too): stop it, or "
                                    + ("give the gateway another port with GATEWAY_RAY_PORT" if embedded else "fix RAY_ADDRESS"))
    child_env = probe_env(env, address, embedded)
    problem = missing_token(child_env)
    if problem:
        return done(EXIT_NO_ANSWER, problem)
    left = timeout - (time.monotonic() - started)
    ended, answer, stderr = _run_probe(address, namespace, child_env, max(left, 1.0))
    if ended == "token refused":
        if child_env.get("RAY_AUTH_MODE", "").lower() != "token":
            return done(EXIT_NO_ANSWER, f"the Ray cluster at {address} ({source}) wants a Ray token: set RAY_AUTH_MODE=token "
                                        "(and RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, unless its token is in ~/.ray/auth_token)")
        return done(EXIT_NO_ANSWER, f"the Ray cluster at {address} ({source}) refused this user's Ray token ({_token_source(child_env)}): "
                                    "it is not that cluster's; run this as the user that runs the gateway, or give it the "
                                    "cluster's token (docs/operations.md: 'What the Ray token gives')")
    if ended == "timeout":
        if grpc is None:
            return done(EXIT_NO_ANSWER, f"something listens at {address} ({source}) but it answered nothing within 1 s, nor as a "
                                        f"Ray head within {timeout:g} s: not a Ray head, or one that hangs")
        return done(EXIT_NO_ANSWER, f"the Ray head at {address} ({source}) accepted a connection but did not answer within "
                                    f"{timeout:g} s (still starting? overloaded? --timeout waits longer)")
    if answer is None:
        why = _last_words(stderr)
        return done(EXIT_NO_ANSWER, f"could not read the Ray cluster at {address} ({source}): Ray's client stopped "
                                    f"({ended}){': ' + why if why else ''}")
    if "problem" in answer:
        return done(EXIT_NO_ANSWER, answer["problem"])
    report.update(running=True, **answer)
    return done(EXIT_OK)


#: Ray's client retries these for ever; the parent stops it at the first one
_REFUSED_TOKEN = ("Unauthenticated", "InvalidAuthToken")


def _run_probe(address: str, namespace: str, env: dict, timeout: float) -> tuple[str, Optional[dict], str]:
    """Run the child: (how it ended: ``exit <code>``, ``timeout`` or ``token refused``; its report or None; its stderr)."""
    import threading

    proc = subprocess.Popen([sys.executable, "-m", "gateway.status_probe", address, namespace], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    out: list[bytes] = []
    err: list[str] = []
    refused = threading.Event()

    def read_err() -> None:
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace")
            err.append(line)
            if any(word in line for word in _REFUSED_TOKEN):
                refused.set()

    readers = [threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True),
               threading.Thread(target=read_err, daemon=True)]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not refused.is_set() and time.monotonic() < deadline:
        try:
            proc.wait(0.05)
        except subprocess.TimeoutExpired:
            pass
    ended = f"exit {proc.returncode}" if proc.returncode is not None else "token refused" if refused.is_set() else "timeout"
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the child and nothing else
        except ProcessLookupError:
            pass
        proc.wait()
    for reader in readers:
        reader.join(2)
    try:
        answer = json.loads(out[0]) if out and out[0].strip() else None
    except ValueError:
        answer = None
    return ended, answer, "".join(err)


def _last_words(stderr: str) -> str:
    """The line of Ray's output that says why it stopped (not its stack trace)."""
    lines = [line.strip() for line in stderr.splitlines()
             if line.strip() and not line.startswith(("/", " ", "\t", "***")) and "StackTrace" not in line]
    for line in reversed(lines):
        if "Check failed" in line or " C " in line[:40] or "Error" in line:
            return line[-300:]
    return lines[-1][-300:] if lines else ""


def main(as_json: bool = False, timeout: float = DEFAULT_TIMEOUT_S, env: Optional[Mapping[str, str]] = None) -> int:
    code, report = status(os.environ if env is None else env, timeout)
    print(json.dumps(report, ensure_ascii=False, indent=2) if as_json else render(report), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
