"""What a request must look like before anyone reads it: a browser on the operator's machine
cannot drive the gateway, and nothing listens on the network by accident.

A web page can POST to ``http://127.0.0.1:8099`` without asking anyone (a ``text/plain``
"simple request" needs no CORS preflight), and with DNS rebinding it can even name its own
host for that address. So, on every route, before authentication:

- ``Host`` must be a loopback name (``localhost``, ``*.localhost``), an IP address, or a name
  in ``GATEWAY_ALLOWED_HOSTS``. A rebinding page sends *its own* DNS name as Host, never an
  IP address, so addresses are always allowed: legacy callers on the network that dial
  ``http://10.0.0.5:8099`` keep working. A request without Host (HTTP/1.0) is let through:
  browsers always send one.
- ``Origin``, when present, must be the gateway's own (the same scheme, host and port as the
  request; or ``GATEWAY_PUBLIC_URL``'s, where a proxy in front terminates TLS) or listed in
  ``GATEWAY_ALLOWED_ORIGINS``. Legacy programs send none; browsers send it on every
  cross-site POST.
- Admin routes that take a body (deploy, undeploy) take only ``application/json``: a page
  cannot send that cross-site without a preflight, which the gateway never answers. Chat
  routes read any body, as legacy callers send it.

Each refusal is a JSON 403 ``host_not_allowed`` / ``origin_not_allowed`` or 415
``unsupported_media_type`` that says which setting would allow it.
"""
from __future__ import annotations

import ipaddress
from typing import Iterable, Optional, Union
from urllib.parse import urlsplit

from contract.errors import GatewayError

#: one address gunicorn listens on: ``(host, port)``, an ``"host:port"`` string or a unix socket path
Address = Union[str, tuple]


def _names(csv: Optional[str]) -> list[str]:
    return [n.strip().lower() for n in (csv or "").split(",") if n.strip()]


def split_host(value: str) -> tuple[str, Optional[int]]:
    """``host[:port]`` (IPv6 in brackets) -> (lowercase host, port or None)."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    else:  # a bare name, or a bare IPv6 address
        host, port = value, ""
    return host.rstrip("."), int(port) if port.isascii() and port.isdigit() else None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def is_loopback_host(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_address(address: Address) -> bool:
    """Is this listening address reachable only from this machine? (unix sockets are)"""
    if isinstance(address, tuple):
        host = str(address[0])
    elif address.startswith("unix:") or address.startswith("/"):
        return True
    else:
        host, _ = split_host(address)
    return is_loopback_host(host.strip("[]").lower())


class Doors:
    """The checks above, for one gateway's settings."""

    def __init__(self, allowed_hosts: Optional[str] = None, allowed_origins: Optional[str] = None,
                 public_url: Optional[str] = None) -> None:
        self.hosts = _names(allowed_hosts)
        self.origins = [o.rstrip("/") for o in _names(allowed_origins)]
        if public_url:  # behind a TLS-terminating proxy the page's origin is https://, the request here http://
            public = urlsplit(public_url.strip().lower())
            self.origins.append(f"{public.scheme}://{public.netloc}")
            self.hosts.append(split_host(public.netloc)[0])

    def _host_allowed(self, host: str) -> bool:
        if "*" in self.hosts or is_loopback_host(host) or _is_ip(host):
            return True
        return any(host == n or (n.startswith(".") and host.endswith(n)) for n in self.hosts)

    def check(self, host_header: Optional[str], origin: Optional[str], scheme: str) -> None:
        """Raise the refusal for a request with these ``Host`` and ``Origin`` headers, if any."""
        if host_header:
            host, _ = split_host(host_header)
            if not self._host_allowed(host):
                raise GatewayError(
                    "host_not_allowed",
                    f"this gateway does not answer to the host name {host!r} (a web page may be trying to reach it): "
                    f"call it by IP address or localhost, or add the name to GATEWAY_ALLOWED_HOSTS")
        if origin is None:
            return
        origin = origin.strip().lower().rstrip("/")
        if origin in self.origins or "*" in self.origins:
            return
        parts = urlsplit(origin)
        own = host_header and parts.scheme == scheme and parts.netloc == host_header.strip().lower()
        if not own:
            raise GatewayError(
                "origin_not_allowed",
                f"requests from web pages of {origin or 'an opaque origin'} are refused: the gateway is called by "
                f"programs, not browsers; to let a web page call it, add its origin to GATEWAY_ALLOWED_ORIGINS")

    @staticmethod
    def check_json(content_type: Optional[str]) -> None:
        """Admin routes with a body: JSON only."""
        mimetype = (content_type or "").split(";")[0].strip().lower()
        if mimetype != "application/json":
            raise GatewayError(
                "unsupported_media_type",
                f"this admin route takes only Content-Type: application/json (got {mimetype or 'none'}); "
                f"send the body as JSON with that header")


def check_listeners(addresses: Iterable[Address], admin_token: bool, client_keys: bool, open_chat: bool) -> None:
    """Refuse to serve a network address without the doors locked.

    Anyone who reaches a non-loopback address could deploy endpoints (run code on the
    cluster) without an admin token, and spend every provider key without client keys.
    Called with the addresses gunicorn actually listens on, however they were given
    (``GATEWAY_BIND``, ``-b``, ``GUNICORN_CMD_ARGS``, a config file, systemd sockets).
    """
    for address in addresses:
        if is_loopback_address(address):
            continue
        shown = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
        missing = []
        if not admin_token:
            missing.append("GATEWAY_ADMIN_TOKEN (anyone could deploy endpoints and run code on the Ray cluster)")
        if not client_keys and not open_chat:
            missing.append("GATEWAY_API_KEYS or GATEWAY_API_KEYS_FILE (anyone could chat on every provider key), "
                           "or GATEWAY_ALLOW_OPEN_CHAT=1 to let them on purpose")
        if missing:
            raise SystemExit(f"refusing to listen on {shown}: a network address needs " + "; and ".join(missing)
                             + ". Or bind to 127.0.0.1.")
