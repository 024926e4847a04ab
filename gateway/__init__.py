"""LLM gateway for legacy applications: named chat endpoints on Ray Serve behind plain HTTP."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from .config import Settings

if TYPE_CHECKING:  # Flask is imported where the app is built: replicas import this package too
    from flask import Flask

    from .auth import Auth
    from .cluster import Cluster
    from .dispatch import Dispatcher
    from .endpoints import Endpoints

__all__ = ["Gateway", "Settings", "create_app"]


@dataclass
class Gateway:
    """Per-app services, kept in ``app.extensions['gateway']``."""

    settings: Settings
    cluster: "Cluster"
    endpoints: "Endpoints"
    dispatcher: "Dispatcher"
    auth: "Auth"

    def startup(self) -> None:
        """Connect to Ray, then deploy ``GATEWAY_ENDPOINTS_FILE`` (one process at a time; idempotent).

        Runs in each fresh gateway process, so endpoints come back after a cluster restart.
        """
        import ray

        from .apply import apply_in_process

        self.cluster.connect()
        self.endpoints.list()  # settles deploys whose watcher died with an earlier process
        path = self.settings.endpoints_file
        if not path:
            return
        registry = self.cluster.registry()
        if not ray.get(registry.claim_apply.remote(900), timeout=30):
            return
        log = logging.getLogger("gateway.apply")
        try:
            for report in apply_in_process(self, path):
                (log.error if report["status"] == "error" else log.info)("endpoints file %s: %s", path, json.dumps(report))
        finally:
            ray.get(registry.release_apply.remote(), timeout=30)


def create_app(settings: Optional[Settings] = None) -> "Flask":
    """Build the WSGI app. Nothing here touches Ray: each process connects on first use."""
    from flask import Flask

    from .auth import Auth, load_keys
    from .cluster import Cluster
    from .dispatch import Dispatcher
    from .endpoints import Endpoints
    from .web import register_routes

    settings = settings or Settings.from_env()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    access = logging.getLogger("gateway.access")
    if not access.handlers:  # one JSON object per line, nothing around it
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)
        access.propagate = False
    app = Flask("gateway", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.ensure_ascii = False  # legacy callers get the reply text as written
    app.json.sort_keys = False
    cluster = Cluster(settings)
    dispatcher = Dispatcher(cluster, settings)
    app.extensions["gateway"] = Gateway(
        settings=settings,
        cluster=cluster,
        endpoints=Endpoints(cluster, settings, on_change=dispatcher.forget),
        dispatcher=dispatcher,
        auth=Auth(
            settings.admin_token.get_secret_value() if settings.admin_token else None,
            load_keys(settings.api_keys.get_secret_value() if settings.api_keys else None, settings.api_keys_file),
        ),
    )
    register_routes(app)
    return app
