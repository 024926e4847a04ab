"""Why an endpoint could not start: ``DeployFailure``, the one form a failed replica leaves its reason in.

A replica's constructor has no channel back to the gateway but Serve's report of the failed
replica (a traceback's text); ``DeployFailure`` writes one line there that ``parse`` reads back,
and ``construction_failure`` makes sure that line never holds a key.
"""
from __future__ import annotations

import re
from typing import Optional

from .specs import DeploySpec


#: how a ``DeployFailure`` reads in a traceback: ``DeployFailure: <reason>: <message>`` on one line
_FAILURE_LINE = re.compile(r"DeployFailure: ([a-z_]+): (.+)")


class DeployFailure(Exception):
    """Raised by an adapter that cannot start in a replica; ``reason`` is a stable code.

    The gateway reads it back from Serve's report of the failed replica (``parse``) and shows
    it in ``GET /deployments/<chat_name>`` (see ``ErrorInfo.reason``).
    The replica raises every construction failure as one (``construction_failure``), so that
    report never holds a key.
    """

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        self.message = " ".join(message.split())  # one line: the gateway reads it from a traceback
        super().__init__(f"{reason}: {self.message}")

    def __reduce__(self):  # pickles with both arguments (Exception's default passes only the text)
        return type(self), (self.reason, self.message)

    @classmethod
    def parse(cls, text: str) -> Optional["DeployFailure"]:
        """The last ``DeployFailure`` in ``text`` (Serve's report of a failed replica), or None.

        Serve's status message (a traceback's text) is the only channel Serve gives a failed
        constructor; this is the one place that reads what ``__init__`` wrote there.
        """
        found = _FAILURE_LINE.findall(text or "")
        if not found:
            return None
        reason, message = found[-1]
        return cls(reason, message.strip())


def construction_failure(exc: BaseException, spec: DeploySpec, provider: str) -> DeployFailure:
    """The one form a failure to build an adapter leaves in: a ``DeployFailure`` without secrets.

    An SDK's constructor may put the key in its error, and Serve shows a failed replica's
    traceback in its status, the dashboard and its logs. So the replica (and the gateway's own
    ``check_deploy``) raise this instead, with ``raise ... from None`` outside the ``except``
    block: the original exception is not even its ``__context__``. A ``DeployFailure`` keeps
    its reason; anything else is ``load_error`` with its class and its redacted text.
    """
    if isinstance(exc, DeployFailure):
        reason, text = exc.reason, exc.message
    else:
        try:
            said = str(exc)
        except Exception:  # noqa: BLE001 - a broken __str__ must not hide the failure
            said = ""
        reason = "load_error"
        text = f"the {provider} adapter could not be built: {type(exc).__name__}" + (f": {said}" if said else "")
    return DeployFailure(reason, spec.scrub(text)[:500])
