"""The web console at ``/ui``: a page for people who would rather not use curl.

The page and its two assets hold no data and are served to anyone who passes the doors;
every piece of data comes from the gateway's JSON API (``GET /deployments``, ``GET /providers``,
``POST /<provider>/deploy|undeploy``, ``POST /chat/broadcast``), called by the page's script
with ``Authorization: Bearer <admin token>``. The token lives only in the tab's sessionStorage.

Every ``/ui`` response carries a strict Content-Security-Policy (scripts and styles from this
origin only, nothing inline; no framing), ``nosniff`` and ``no-referrer``.
"""
from __future__ import annotations

from pathlib import Path

from flask import Blueprint, jsonify, request, send_from_directory

from .context import gw
from contract.errors import GatewayError

STATIC = Path(__file__).resolve().parent / "static" / "ui"

#: the files the page is made of (nothing else under /ui is served from disk)
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}  # (Flask adds "; charset=utf-8")

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'none'; object-src 'none'")

ui = Blueprint("ui", __name__, url_prefix="/ui")


@ui.after_request
def _headers(response):
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers.setdefault("Cache-Control", "no-cache")
    return response


@ui.get("")
@ui.get("/")
def index():
    response = send_from_directory(STATIC, "index.html", mimetype="text/html", max_age=0)
    response.headers["Cache-Control"] = "no-store"
    return response


@ui.get("/<asset>")
def asset(asset: str):
    if asset not in ASSETS:
        raise GatewayError("not_found", f"no such file of the console: /ui/{asset} (open /ui/)")
    response = send_from_directory(STATIC, asset, mimetype=ASSETS[asset], max_age=0)
    response.headers["Cache-Control"] = "no-cache"  # revalidated (ETag): a new gateway version shows at once
    return response


@ui.get("/config")
def config():
    """What the page needs: whether it must ask for the token, and (to the admin or metrics token, as
    ``/readyz``'s details) the Ray dashboard's URL."""
    gateway = gw()
    url = gateway.dashboard_url() if gateway.auth.may_read(request.headers.get("Authorization")) else None
    return jsonify(dashboard_url=url, auth=gateway.settings.admin_token is not None)
