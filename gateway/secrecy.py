"""What a gateway process holds stays in it: no Ray process may read its memory or environment.

A gateway process (the gunicorn master and its workers, ``python app.py``) holds the admin token,
the client keys and, while a deploy passes through it, a provider key, in its environment and its
memory. Ray's processes (the embedded head's GCS, raylet and agents, every replica, including a
local model that runs a repository's own code) run as the same user, and a process may read
``/proc/<pid>/environ`` and ``/proc/<pid>/mem`` of any process of its own user that is *dumpable*.

Three locks; the first two from the kernel's ptrace access check (``ptrace_may_access``):

- ``keep_to_itself()`` marks this process not dumpable (``prctl(PR_SET_DUMPABLE, 0)``): its
  ``/proc`` files that expose memory or environment belong to root then, and only a process with
  ``CAP_SYS_PTRACE`` may read them. A fork keeps the mark (the gunicorn master sets it before it
  forks its workers); an ``exec`` drops it, so the Ray processes the master starts are dumpable as
  usual. Core dumps of gateway processes are off too (they would hold the same secrets).
- ``without_ptrace(argv)`` starts a Ray head: ``python -m gateway.secrecy ray start ...`` drops
  ``CAP_SYS_PTRACE`` from its bounding set, then becomes ``ray start`` (``exec``), so that a head
  started by a gateway running as root (containers, CI) and everything it starts cannot pass the
  check either. A non-root user has no such capability to drop.
- ``keep_to_itself()`` also blanks the values of credential-looking variables (``*_API_KEY``,
  ``*TOKEN*``, ``*SECRET*`` ..., ``CREDENTIAL``) in the process's original environment block, the
  bytes ``/proc/<pid>/environ`` shows (Python's ``os.environ`` is a copy and keeps them, and each
  is set again, so C code that reads it later with ``getenv``, Ray's token loader, finds it). Kernels
  differ in what they let root without ``CAP_SYS_PTRACE`` read there (``environ`` is a read-mode
  check, ``mem`` an attach-mode one); blanked bytes hold nothing on any of them.

Profilers that attach to a gateway process (py-spy) need root with ``CAP_SYS_PTRACE`` since.
Linux only; elsewhere these do nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import re
import sys

log = logging.getLogger("gateway.secrecy")

_PR_SET_DUMPABLE = 4
_PR_GET_DUMPABLE = 3
_PR_CAPBSET_DROP = 24
_CAP_SYS_PTRACE = 19

#: names of variables that hold credentials: never to a Ray process (``gateway.head``), blanked in the
#: environment block of a gateway process (``keep_to_itself``)
CREDENTIAL = re.compile(r"(?:^|_)(?:API_?KEYS?|KEYS?|TOKENS?|SECRETS?|PASSWORDS?|PASSWD|CREDENTIALS?)(?:_|$)", re.I)


def _prctl(option: int, arg: int = 0) -> int:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    return libc.prctl(option, arg, 0, 0, 0)


def without_ptrace(argv: list[str]) -> list[str]:
    """The command line that runs ``argv`` without ``CAP_SYS_PTRACE`` (this module's ``__main__``)."""
    return [sys.executable, "-m", "gateway.secrecy", *argv]


def keep_to_itself() -> bool:
    """This process (and the processes it forks) not dumpable, and its credentials blanked in its original
    environment block; True when both hold now."""
    if not sys.platform.startswith("linux"):
        return False
    blank_credentials_in_environ()
    if _prctl(_PR_SET_DUMPABLE, 0) != 0:
        log.warning("could not mark this process not dumpable: Ray's processes may read its memory")
        return False
    return dumpable() is False


def blank_credentials_in_environ() -> int:
    """Overwrite, in place, the values of credential-looking variables in this process's original
    environment block (what ``/proc/self/environ`` shows); how many. ``os.environ`` keeps its copy."""
    try:
        fields = open("/proc/self/stat", "rb").read().rpartition(b")")[2].split()
        start, end = int(fields[47]), int(fields[48])  # env_start, env_end (fields 50, 51 of proc(5))
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        environ = ctypes.POINTER(ctypes.c_void_p).in_dll(libc, "environ")
    except (OSError, ValueError, IndexError):
        return 0
    blanked, i, blanked_names = 0, 0, []
    while environ[i]:
        address = environ[i]
        i += 1
        if not start <= address < end:  # set since the start: not in the block /proc shows
            continue
        entry = ctypes.string_at(address)
        name, eq, value = entry.partition(b"=")
        if eq and value and CREDENTIAL.search(name.decode("latin-1")):
            blanked_names.append(os.fsdecode(name))
            ctypes.memset(address + len(name) + 1, ord("*"), len(value))
            blanked += 1
    for name in blanked_names:
        # C code reads the variable with getenv (Ray's token loader, at ray.init): a fresh copy of the
        # value, outside the block /proc shows (os.environ kept its own copy all along)
        os.putenv(name, os.environ[name])
    return blanked


def dumpable() -> "bool | None":
    """Whether this process is dumpable (None: not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    return _prctl(_PR_GET_DUMPABLE) == 1


if __name__ == "__main__":  # python -m gateway.secrecy PROGRAM ARGS...: PROGRAM without CAP_SYS_PTRACE
    if sys.platform.startswith("linux"):
        _prctl(_PR_CAPBSET_DROP, _CAP_SYS_PTRACE)  # (EPERM without CAP_SETPCAP: then there was none to drop)
    os.execvp(sys.argv[1], sys.argv[1:])
