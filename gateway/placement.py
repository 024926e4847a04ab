"""Where an endpoint's replicas run: the deploy's ``resources``, and a SaaS provider's replicas kept off GPU nodes.

Pure (no cluster): the deploy passes the live nodes in (``gateway.serve_apps.live_nodes``), checks what
these options ask for (``gateway.deploy_checks``), and starts the replicas with them.
"""
from __future__ import annotations

import re
from typing import Optional

from providers.base import Provider
from providers.specs import DeploySpec

from .config import Settings

#: labels Ray 2.60 gives nodes itself: every node its id (``ray._raylet.RAY_NODE_ID_KEY``); a node whose GPUs
#: it recognises, their type (``RAY_NODE_ACCELERATOR_TYPE_KEY``, e.g. ``H100``); a KubeRay pod, its worker
#: group (``RAY_NODE_GROUP_KEY``, from the pod's ``RAY_NODE_TYPE_NAME``)
NODE_ID_LABEL = "ray.io/node-id"
ACCELERATOR_LABEL = "ray.io/accelerator-type"
NODE_GROUP_LABEL = "ray.io/node-group"
#: what a label value may be (Kubernetes' syntax, as Ray checks it)
_LABEL_VALUE = re.compile(r"[a-zA-Z0-9]([a-zA-Z0-9_.-]{0,61}[a-zA-Z0-9])?")


def avoid_gpu_nodes(nodes: list[dict]) -> Optional[dict]:
    """The ``ray_actor_options`` that keep a SaaS replica off the GPU nodes of ``nodes`` (``ray.nodes()``,
    the live ones), or None when there is nothing to avoid (no GPU node, or no other node with CPUs).

    Ray 2.60 has no resource a replica could ask for to stay away from GPUs (a request can only require,
    and Serve places replicas with its SPREAD strategy, which ignores Ray's own preference of CPU nodes
    for CPU work), and no label on every GPU node. What it has are labels (``label_selector``): every node
    carries its id, and many a GPU node its GPUs' type and its KubeRay group. So at deploy the replicas
    get a selector that excludes the GPU nodes live now (by ``ray.io/node-id``), and any node of their GPU
    types and KubeRay groups (by ``ray.io/accelerator-type``, ``ray.io/node-group``: the nodes a GPU group
    adds later; a value a node without GPUs shares is not excluded), with a fallback that takes any node:
    preferred, not required. When the other nodes are full or gone the replicas run on a GPU node rather
    than not at all (and Serve stops those first when it scales down); a cluster of GPU nodes only runs
    them as before. A GPU node of a new type and group that joins after the deploy is not excluded until
    the endpoint is deployed again. An operator who wants a hard rule gives the deploy ``resources``
    that only CPU nodes carry: those replace this default.
    """
    alive = [n for n in nodes if n.get("Alive", True)]
    gpu = [n for n in alive if (n.get("Resources") or {}).get("GPU", 0) > 0]
    others = [n for n in alive if not (n.get("Resources") or {}).get("GPU", 0) and (n.get("Resources") or {}).get("CPU", 0) > 0]
    if not gpu or not others:
        return None
    selector = {NODE_ID_LABEL: f"!in({','.join(sorted(n['NodeID'] for n in gpu))})"}
    for label in (ACCELERATOR_LABEL, NODE_GROUP_LABEL):
        def values(group: list[dict]) -> set[str]:
            return {str((n.get("Labels") or {}).get(label) or "") for n in group} - {""}

        excluded = sorted(v for v in values(gpu) - values(others) if _LABEL_VALUE.fullmatch(v))
        if excluded:
            selector[label] = f"!in({','.join(excluded)})"
    return {"label_selector": selector, "fallback_strategy": [{"label_selector": {}}]}


def placement_options(provider: Provider, spec: DeploySpec, settings: Settings,
                      nodes: Optional[list[dict]] = None) -> dict:
    """The Serve options of ``spec``'s replicas: the provider's, with where they may run.

    ``spec.resources``: each replica asks Ray for them (``ray_actor_options["resources"]``; with a
    placement group, in its first bundle too, where Serve puts the replica). Without them, a SaaS
    provider's replicas keep off the GPU nodes of ``nodes`` (``avoid_gpu_nodes``; no ``nodes``: no
    such default).
    """
    options = dict(provider.replica_options(spec, settings))
    actor = dict(options.get("ray_actor_options") or {})
    bundles = options.get("placement_group_bundles")
    if spec.resources:
        actor["resources"] = {**(actor.get("resources") or {}), **spec.resources}
        if bundles:
            options["placement_group_bundles"] = [{**bundles[0], **spec.resources}, *bundles[1:]]
    elif provider.kind == "saas" and nodes and not bundles and "label_selector" not in actor:
        actor.update(avoid_gpu_nodes(nodes) or {})
    options["ray_actor_options"] = actor
    return options
