"""An endpoint's keys in messages: how one may be shown, how it is scrubbed, what a failed key check means.

No message, log line or listing may hold a key: a key is shown as its fingerprint
(``key_fingerprint``), any text that may hold one is passed through ``redact`` (what
``DeploySpec.scrub`` and ``reraise_as_gateway_error`` do), and a URL loses its credentials
(``shown_url``). ``judge_key_check`` is the one verdict on every provider's deploy-time key check.
"""
from __future__ import annotations

from typing import Optional
from urllib.parse import urlsplit

from contract.errors import GatewayError


def shown_url(url: str) -> str:
    """``url`` as a message may show it: no user, password, query or fragment (a relay's token may be there)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]  # (an IPv6 host keeps its brackets)
    return f"{parts.scheme}://{host}{parts.path}"


def judge_key_check(err: GatewayError, base_url: str, provider: str) -> Optional[str]:
    """What a failed deploy-time key check means, the same for every provider.

    ``err`` is the provider's own mapping (``map_*_error``) of the check's failure. A key the
    provider refused (401, or an auth business code) raises ``invalid_key``; a 403 (a key without
    the permission to list models, a blocked region) could still chat, so it only warns. ``verify_key:
    false`` is named only where the check could not tell (never after the provider refused the key:
    that advice would deploy a bad key). A base URL
    without the route (404/405: a relay without ``GET /models``, or a wrong path) raises
    ``invalid_request``. Anything else (unreachable, a timeout, 5xx, 429, a malformed answer)
    says nothing about the key: the deploy goes on and the returned warning is logged.
    """
    shown = shown_url(base_url)
    status = err.info.upstream_status
    if status == 403:  # a key without the models permission, or a blocked region: not a wrong key
        return (f"the key could not be checked ({shown}/models answered HTTP 403: a missing permission or a "
                f"blocked region, not a wrong key), deployed anyway")
    if err.type == "upstream_auth" or status == 401:
        said = ", ".join(str(x) for x in (f"HTTP {status}" if status else None, err.info.provider_code) if x)
        raise GatewayError(
            "invalid_key",
            f"the provider rejected this key ({said or 'auth'}) at {shown}: check that it is the right key for "
            f"this provider and account, and that it is still active",
            provider=provider, provider_code=err.info.provider_code, upstream_status=status, fields=["api_key"],
        )
    if status in (404, 405):
        raise GatewayError(
            "invalid_request",
            f"could not check the key: {shown}/models answered HTTP {status}; check base_url, or deploy "
            f"with verify_key: false if this relay has no GET /models",
            provider=provider, upstream_status=status, fields=["base_url", "verify_key"],
        )
    return f"the key could not be checked, deployed anyway: {err.info.message}"


def key_fingerprint(key: str) -> str:
    """``sk-...a1b2``: enough to tell keys apart, never enough to use one."""
    if len(key) < 12:
        return "..." + key[-2:] if len(key) >= 8 else "***"
    prefix = key[:3] if key[:3].isascii() else ""
    return f"{prefix}...{key[-4:]}"


def redact(text: str, secret: str, min_run: int = 8) -> str:
    """Remove ``secret`` and every run of ``min_run``+ of its characters from ``text``."""
    if not text or not secret:
        return text
    out = text.replace(secret, "[redacted]")
    if len(secret) < min_run:
        return out
    i = 0
    while i + min_run <= len(secret):
        piece = secret[i : i + min_run]
        if piece in out:
            out = out.replace(piece, "[redacted]")
        i += 1
    return out
