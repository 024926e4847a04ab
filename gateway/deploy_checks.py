"""The checks of a deploy, before anything starts: what the adapter and the provider say of the spec (its keys
included), what the cluster can place, the fallbacks, and who else holds the name.

Each check raises the ``GatewayError`` the deploy answers (its message without the spec's secrets), or
answers what the next step needs. None calls the cluster itself: the caller passes the live nodes and
the deployed records in, so every check but the provider's own runs without Ray.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

from providers.base import Provider, indefinite
from providers.deploy_failure import construction_failure
from providers.keys import key_fingerprint
from providers.specs import DeploySpec

from contract.errors import GatewayError

from .config import Settings
from .placement import placement_options
from .records import EndpointRecord

log = logging.getLogger("gateway.endpoints")


def check_deploy(provider: Provider, spec: DeploySpec, check: Callable[[DeploySpec], Optional[str]]) -> Optional[str]:
    """Run a deploy-time ``check(spec)`` of the provider; its failures without the spec's secrets.

    ``provider.check_deploy`` builds a SaaS adapter, so an SDK constructor that puts the key
    in its error fails here as it would in the replica (422 ``deploy_failed``, the same scrubbed
    message). ``provider.verify_key`` asks the provider about the key: a rejected key is a 400
    ``invalid_key`` and nothing is deployed; a check that could not tell (unreachable, 5xx, a
    timeout) returns a warning, which is logged, and the deploy goes on.
    """
    failure = warning = None
    try:
        warning = check(spec)
    except GatewayError as err:
        failure = GatewayError.from_info(err.info.model_copy(update={"message": spec.scrub(err.info.message)}))
    except Exception as exc:  # noqa: BLE001 - whatever an SDK raises
        scrubbed = construction_failure(exc, spec, provider.name)
        failure = GatewayError("deploy_failed", scrubbed.message, reason=scrubbed.reason, provider=provider.name)
    if failure is not None:
        raise failure from None  # outside the except block: the original is not chained to it
    if warning:
        warning = spec.scrub(warning)
        log.warning("deploy of %s: %s", spec.chat_name, warning)
    return warning


def check_keys(provider: Provider, spec: DeploySpec) -> None:
    """The deploy-time key check of every key of the spec's pool (at most 8 at a time).

    One key (``api_key``) fails as it always did; a key of ``api_keys`` the provider refuses fails
    the deploy naming its entry number and fingerprint (never the key).
    """
    keys = [key for key, _ in spec.pool()] if getattr(spec, "api_keys", None) else None
    if keys is None:
        check_deploy(provider, spec, provider.verify_key)
        return

    def check(numbered: tuple[int, str]) -> Optional[GatewayError]:
        number, key = numbered
        try:
            check_deploy(provider, spec.for_key(key), provider.verify_key)
        except GatewayError as err:
            said = spec.scrub(f"api_keys entry {number} ({key_fingerprint(key)}): {err.info.message}")
            fields = ["api_keys" if f == "api_key" else f for f in err.info.fields or []] or None
            return GatewayError.from_info(err.info.model_copy(update={"message": said, "fields": fields}))
        return None

    with ThreadPoolExecutor(max_workers=min(8, len(keys)), thread_name_prefix="key-check") as pool:
        failures = [f for f in pool.map(check, enumerate(keys, 1)) if f is not None]
    if failures:
        raise failures[0]


def check_resources(provider: Provider, spec: DeploySpec, settings: Settings, nodes: list[dict]) -> dict:
    """Refuse at once what the cluster can never place (it would wait forever); answer the Serve
    options the replicas are deployed with (``placement_options``: what is checked is what starts).

    Every resource a worker asks for counts: CPUs, GPUs, and the custom ones (``resources``, a
    provider's own). One that no live node has names the nodes that carry it (none, or too little).
    """
    options = placement_options(provider, spec, settings, nodes)
    actor = options.get("ray_actor_options") or {}
    bundles = options.get("placement_group_bundles")
    need: dict[str, float] = {}
    for bundle in bundles or [{"CPU": actor.get("num_cpus", 1), "GPU": actor.get("num_gpus", 0),
                               **(actor.get("resources") or {})}]:
        for key, value in bundle.items():
            if value:
                need[key] = need.get(key, 0) + float(value)
    have = [n.get("Resources", {}) for n in nodes]
    total = {key: sum(n.get(key, 0) for n in have) for key in need}
    workers = spec.workers
    for key, per in sorted(need.items(), key=lambda kv: kv[0] != "GPU"):
        if any(n.get(key, 0) >= per for n in have) and total[key] >= per * workers:
            continue
        needed = f"{workers} worker(s) x {per:g} = {per * workers:g} needed, each worker on one node"
        if key in ("GPU", "CPU"):
            noun = {"GPU": "GPUs", "CPU": "CPUs"}[key]
            amounts = ", ".join(f"{n.get(key, 0):g}" for n in have) or "no nodes"
            message = f"not enough {noun} in the cluster for '{spec.chat_name}': {needed}; the nodes have {amounts}"
        else:
            holders = [f"{n.get('NodeManagerAddress') or '?'} ({(n.get('NodeID') or '')[:8]}) has "
                       f"{n['Resources'][key]:g}" for n in nodes if (n.get("Resources") or {}).get(key)]
            where = ("the nodes with it: " + ", ".join(holders)) if holders else "no live node has it"
            message = f"not enough '{key}' resources in the cluster for '{spec.chat_name}': {needed}; {where}"
            if key in spec.resources:
                message += (f". A node carries it when started with ray start --resources='{{\"{key}\": N}}' "
                            f"(a KubeRay group's rayStartParams; GATEWAY_RAY_RESOURCES for the embedded head)")
        raise GatewayError("deploy_failed", message,
                           reason="insufficient_gpus" if key == "GPU" else "insufficient_resources",
                           provider=provider.name, fields=["resources"] if key in spec.resources else None)
    return options


def check_fallbacks(name: str, fallbacks: list[str], deployed: Callable[[], list[EndpointRecord]]) -> None:
    """Fallbacks must name deployed endpoints and must not lead back to ``name``."""
    if not fallbacks:
        return
    if name in fallbacks:
        raise GatewayError("invalid_request", f"'{name}' cannot be its own fallback", fields=["fallbacks"])
    graph = {r.chat_name: list(r.fallbacks) for r in deployed()}
    unknown = [f for f in fallbacks if f not in graph]
    if unknown:
        raise GatewayError("invalid_request", f"fallbacks name endpoints that are not deployed: {', '.join(unknown)}",
                           fields=["fallbacks"])
    cycle = fallback_cycle(name, fallbacks, graph)
    if cycle:
        raise GatewayError("invalid_request", f"fallbacks form a cycle: {' -> '.join(cycle)}", fields=["fallbacks"])


def conflict(name: str, other: str) -> GatewayError:
    return GatewayError(
        "conflict",
        f"'{name}' is deployed as {indefinite(other)} endpoint; undeploy it there first (POST /{other}/undeploy)",
    )


def check_same_provider(name: str, provider: str, running_as: Optional[str]) -> None:
    """Refuse ``name`` while Serve runs it as another provider's endpoint (``running_as``: that provider, or None)."""
    if running_as and running_as != provider:
        raise conflict(name, running_as)


def fallback_cycle(name: str, fallbacks: list[str], graph: dict[str, list[str]]) -> Optional[list[str]]:
    """The first path by which ``name``'s new ``fallbacks`` lead back to ``name`` (``['a', 'b', 'a']``), or None.

    ``graph`` maps the deployed endpoints to their fallbacks (it is not changed); ``name``'s own
    entry is replaced by ``fallbacks``. Names the graph lacks lead nowhere. Pure: no cluster.
    """
    graph = {**graph, name: list(fallbacks)}
    path: list[str] = []
    seen = {name}  # a node looked at once need not be again: the search stops at the first way back

    def leads_back(node: str) -> bool:
        for nxt in graph.get(node, []):
            path.append(nxt)
            if nxt == name:
                return True
            if nxt not in seen:
                seen.add(nxt)
                if leads_back(nxt):
                    return True
            path.pop()
        return False

    return [name] + path if leads_back(name) else None
