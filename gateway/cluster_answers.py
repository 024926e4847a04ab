"""The cluster's answers as every gateway process takes them: bounded in time, shared, and in words.

A call to Ray can hang (a cluster that stopped answering, a controller restarting): ``_bounded``
gives up on it after a timeout, and ``SharedAnswer`` makes a burst of callers (``/readyz``, the
model list) cost the cluster one look at a time. What a failed connect or a version check found is
said in words here too. Nothing here imports Ray: the calls themselves are ``gateway.cluster``'s
and ``gateway.endpoints``'.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Optional

from contract.errors import GatewayError

#: one call that tells whether the cluster answers (the watchdog, liveness)
_CALL_TIMEOUT_S = 2.0


def _bounded(fn: Callable, timeout: float):
    """``fn()`` in a daemon thread: its result, or None when it raised or did not end in ``timeout``."""
    box: list = []

    def run() -> None:
        try:
            box.append(fn())
        except Exception:  # noqa: BLE001 - the caller reads None as "no answer"
            pass

    thread = threading.Thread(target=run, name="ray-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return box[0] if box else None


class _Look:
    """One look of a ``SharedAnswer``: when it began, whether it ended, and its value or error."""

    __slots__ = ("started", "ended", "done", "value", "error")

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.ended = 0.0
        self.done = threading.Event()
        self.value = None
        self.error = None  # an ErrorInfo


class SharedAnswer:
    """One answer of the cluster shared by every thread of this process (readiness, the model list).

    A burst of callers costs the cluster one call per ``fresh_s`` and never piles threads up on
    it. ``get()`` answers the last look while it is younger than ``fresh_s``; after that the
    first caller starts one new look, in a thread of its own, and every caller waits for it, at
    most until ``wait_s`` after it began. A look that takes longer answers 503
    ``cluster_unavailable`` with Retry-After to the callers waiting (at once to those after them)
    and is kept when it ends. And once a look took longer than ``wait_s`` (the cluster is stuck or
    overloaded) and failed, callers do not wait for the next one: they get that failure at once
    (for ``stale_s`` after it ended) while the next one runs; a slow success is never served stale
    (a "ready" must be fresh). There is never more than one look at
    a time, however long one hangs (its own calls to the cluster have timeouts: it ends). A look
    that raises answers its error (as a ``GatewayError``), like a value. ``forget()``: the next
    caller looks again.
    """

    def __init__(self, look: Callable[[], object], what: str, fresh_s: float, wait_s: float,
                 stale_s: float = 10.0) -> None:
        self._look, self.what, self.fresh_s, self.wait_s, self.stale_s = look, what, fresh_s, wait_s, stale_s
        self._lock = threading.Lock()
        self._answer: Optional[_Look] = None
        self._pending: Optional[_Look] = None

    def get(self):
        with self._lock:
            last, now = self._answer, time.monotonic()
            if last is not None and now - last.ended < self.fresh_s:
                look = last
            else:
                look = self._pending
                if look is None:
                    look = self._pending = _Look()
                    threading.Thread(target=self._run, args=(look,), name="shared-answer", daemon=True).start()
                if last is not None and last.error is not None and last.ended - last.started >= self.wait_s \
                        and now - last.ended < self.stale_s:
                    look = last  # (the last look failed slowly: no caller waits on the next; a success is never stale)
        if not look.done.wait(max(0.0, look.started + self.wait_s - time.monotonic())):
            raise GatewayError("cluster_unavailable", f"the Ray cluster did not answer within {self.wait_s:g}s "
                               f"({self.what} is stuck or overloaded); try again shortly", retry_after=2)
        if look.error is not None:
            raise GatewayError.from_info(look.error)
        return look.value

    def forget(self) -> None:
        """What the cluster answered is out of date (this process changed it): the next ``get`` looks again."""
        with self._lock:
            self._answer = self._pending = None

    def _run(self, look: _Look) -> None:
        try:
            look.value = self._look()
        except GatewayError as err:
            look.error = err.info
        except Exception as exc:  # noqa: BLE001 - any failure of the cluster's is "did not answer"
            look.error = GatewayError("cluster_unavailable", f"the Ray cluster did not answer ({type(exc).__name__}); "
                                      f"try again shortly", retry_after=2).info
        look.ended = time.monotonic()
        with self._lock:
            if self._pending is look:  # (a look begun before a ``forget`` answers its own waiters only)
                self._answer, self._pending = look, None
        look.done.set()


def version_problems(local: dict, cluster: dict) -> list[str]:
    """What differs between the gateway's Ray and Python (``local``) and the cluster's, in words; [] when nothing."""
    problems = []
    if cluster["ray"] != local["ray"]:
        problems.append(f"Ray version mismatch: gateway has {local['ray']}, cluster runs {cluster['ray']}; install ray=={cluster['ray']} here or upgrade the cluster")
    if cluster["python"].split(".")[:2] != local["python"].split(".")[:2]:
        problems.append(f"Python version mismatch: gateway has {local['python']}, cluster runs {cluster['python']}; Ray needs the same major.minor on both")
    return problems


def describe_connect_error(exc: Exception, address: str) -> str:
    text = str(exc)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    if "ersion mismatch" in text:
        return f"Ray/Python version mismatch with the cluster at {address}: {' '.join(text.split())[:400]}"
    if "uthentication" in text or "token" in text.lower():
        return f"the Ray cluster at {address} refused this process's authentication token ({first[:200]}); see docs/operations.md, 'What the Ray token gives'"
    return f"could not connect to the Ray cluster at {address}: {first[:300]}"
