"""The shipped deploy files, read offline (no Ray, no cluster, no Docker).

The image runs as a fixed non-root user that owns none of the application's files; every pod the
manifests make (the gateway's Deployment and each group of the RayCluster) runs hardened: non-root,
read-only root filesystem, no capabilities, no privilege escalation, seccomp RuntimeDefault, no
service-account token, and an emptyDir for every path written at run time; NetworkPolicies let only the
cluster's own pods reach Ray's ports and only the ingress namespace reach the gateway's; the gateway
serves HTTPS with a certificate from a Secret. More than one machine: the RayCluster's worker groups
carry the custom resources deploys pin endpoints with (``cpu_pool`` on CPU pods, ``gpu_pool`` on GPU
pods), quoted so that bash, KubeRay and Ray's autoscaler all read them; two gateway pods join it, spread
over nodes and kept through a drain by a PodDisruptionBudget; docs/operations.md names those resources.
The schema check of the same files is ``test_manifests_validate_against_the_kubernetes_schemas`` in
tests/test_security.py.
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import PurePosixPath

import pytest
import yaml

from providers.specs import check_resources
from tests.procs import ROOT

pytestmark = pytest.mark.fast

KUBE = ROOT / "deploy" / "kubernetes"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
OPERATIONS = ROOT / "docs" / "operations.md"
#: the custom Ray resources of the RayCluster's CPU and GPU worker groups, which deploys name in ``resources``
CPU_POOL, GPU_POOL = "cpu_pool", "gpu_pool"
GATEWAY_PORT = 8099
#: Ray's ports between nodes (the low and high ends of each range): GCS, dashboard, Ray Client, metrics export
#: (KubeRay's 8080), dashboard agent, the worker range (every worker's and driver's gRPC server), and the
#: ephemeral range (the ports Ray's processes bind themselves: raylet, object manager, agents, and each Serve
#: replica's gRPC server, which Serve binds to [::]:0)
RAY_PORTS = (6379, 8265, 10001, 8080, 52365, 10002, 19999, 32768, 60999)


# -- reading the files --------------------------------------------------------------------------
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, its arguments) of deploy/Dockerfile, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        word, _, rest = (pending + stripped).partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def image_env() -> dict[str, str]:
    env = {}
    for word, rest in dockerfile():
        if word != "ENV":
            continue
        items = shlex.split(rest)
        if items and "=" not in items[0]:  # the old form: ENV NAME value
            env[items[0]] = " ".join(items[1:])
            continue
        for item in items:
            name, _, value = item.partition("=")
            env[name] = value
    return env


def image_user() -> tuple[int, int]:
    users = [rest for word, rest in dockerfile() if word == "USER"]
    assert users, "deploy/Dockerfile has no USER: the image runs as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit(), f"USER {users[-1]}: give the numeric UID (kubelet checks runAsNonRoot only against a number)"
    assert not gid or gid.isdigit(), f"USER {users[-1]}: give the numeric GID"
    return int(uid), int(gid or uid)


def load(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBE / name).read_text()) if d]


def all_docs() -> list[dict]:
    return [d for path in sorted(KUBE.glob("*.yaml")) for d in load(path.name)]


def pods() -> list[tuple[str, dict, dict]]:
    """(name, its labels as Kubernetes sees them, pod template) of every pod the manifests make."""
    out = []
    for doc in load("gateway.yaml"):
        if doc["kind"] == "Deployment":
            template = doc["spec"]["template"]
            out.append(("gateway", dict(template["metadata"]["labels"]), template))
    cluster = load("raycluster.yaml")[0]
    spec = cluster["spec"]
    groups = [("headgroup", "head", spec["headGroupSpec"])] + [(g["groupName"], "worker", g) for g in spec["workerGroupSpecs"]]
    for group, node_type, body in groups:
        template = body["template"]
        labels = dict((template.get("metadata") or {}).get("labels") or {})
        # what KubeRay puts on every pod it makes, whatever the template says
        # (ray-operator/controllers/ray/common/pod.go, labelPod: these three are not overridable)
        labels.update({"ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": node_type, "ray.io/group": group})
        out.append((f"ray-{group}", labels, template))
    return out


POD_NAMES = [name for name, _, _ in pods()]


def pod(name: str) -> tuple[dict, dict]:
    return next((labels, template["spec"]) for n, labels, template in pods() if n == name)


def quantity(text) -> float:
    """A Kubernetes quantity ("2Gi", "500Mi", "1G", "3") in bytes."""
    match = re.fullmatch(r"([0-9.]+)([EPTGMK]i?|k|m)?", str(text))
    assert match, f"not a quantity: {text!r}"
    number, unit = float(match.group(1)), match.group(2) or ""
    factors = {"": 1, "m": 1e-3, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
               "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
    return number * factors[unit]


def covering_mount(container: dict, path: str) -> dict | None:
    """The volume mount a file at ``path`` lands on (the deepest mount path at or above it)."""
    target = PurePosixPath(path)
    found = [m for m in container.get("volumeMounts", [])
             if target == PurePosixPath(m["mountPath"]) or PurePosixPath(m["mountPath"]) in target.parents]
    return max(found, key=lambda m: len(PurePosixPath(m["mountPath"]).parts), default=None)


# -- the image ----------------------------------------------------------------------------------
def test_the_image_runs_as_a_fixed_non_root_user():
    uid, gid = image_user()
    assert uid != 0 and gid != 0, "the image's USER is root"
    steps = dockerfile()
    last_user = max(i for i, (word, _) in enumerate(steps) if word == "USER")
    # everything installed before USER is root's; nothing after it adds files owned by the user
    assert not [w for w, _ in steps[last_user + 1:] if w in ("RUN", "COPY", "ADD")], "files added after USER are the user's"
    # the user exists in /etc/passwd with that UID (Python's getpass.getuser(), which Ray calls, needs an entry)
    assert any(w == "RUN" and re.search(rf"\b(useradd|adduser)\b[^&;]*(--uid|-u)[ =]?{uid}\b", rest) for w, rest in steps), \
        f"no useradd creates UID {uid}"


def test_the_image_has_no_app_dir_the_user_can_write():
    steps = dockerfile()
    env = image_env()
    workdirs = [rest for w, rest in steps if w == "WORKDIR"]
    assert workdirs
    app = PurePosixPath(workdirs[-1])
    for name in ("HOME", "TMPDIR"):  # the writable places, which the manifests mount as emptyDir volumes
        assert env.get(name, "").startswith("/"), f"the image sets no absolute {name}"
        place = PurePosixPath(env[name])
        assert place != app and app not in place.parents and place not in app.parents, f"{name} {place} and the app dir {app} overlap"
    for word, rest in steps:
        if word in ("COPY", "ADD"):
            assert "--chown" not in rest and "--chmod" not in rest, f"{word} {rest}: the app's files stay root's, not writable"
        if word != "RUN":
            continue
        for command in re.split(r"&&|;|\|\|", rest):
            args = shlex.split(command)
            if not args:
                continue
            if args[0] == "chown":  # only the user's HOME may become the user's
                paths = [a for a in args[1:] if not a.startswith("-")][1:]
                assert paths and all(PurePosixPath(p) == PurePosixPath(env["HOME"]) for p in paths), f"RUN {command.strip()}"
            if args[0] == "chmod":  # no write bit for group or others (symbolic or octal)
                mode = next(a for a in args[1:] if not a.startswith("-") or re.fullmatch(r"-[rwxXst]+", a))
                for clause in mode.split(","):
                    symbolic = re.fullmatch(r"([ugoa]*)([-+=])([rwxXst]*)", clause)
                    if symbolic:
                        who, op, perms = symbolic.groups()
                        assert not (op in "+=" and "w" in perms and (not who or set(who) & set("goa"))), f"RUN {command.strip()}"
                    else:
                        assert not int(clause, 8) & 0o022, f"RUN {command.strip()}"


# -- every pod ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", POD_NAMES)
def test_every_pod_runs_hardened(name):
    uid, gid = image_user()
    _, spec = pod(name)
    assert spec.get("automountServiceAccountToken") is False, f"{name}: the service-account token is mounted"
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(key), f"{name}: {key}"
    assert not [v for v in spec.get("volumes", []) if "hostPath" in v], f"{name}: a hostPath volume"
    pod_context = spec.get("securityContext") or {}
    assert pod_context.get("fsGroup") == gid, f"{name}: fsGroup (the volumes' group) is not the image's group"
    containers = spec["containers"] + spec.get("initContainers", [])
    for container in containers:
        where = f"{name}/{container['name']}"
        own = container.get("securityContext") or {}
        effective = {**{k: v for k, v in pod_context.items() if k in ("runAsNonRoot", "runAsUser", "runAsGroup", "seccompProfile")}, **own}
        assert effective.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
        assert (effective.get("runAsUser"), effective.get("runAsGroup")) == (uid, gid), f"{where}: not the image's user {uid}:{gid}"
        assert (effective.get("seccompProfile") or {}).get("type") == "RuntimeDefault", f"{where}: seccomp RuntimeDefault"
        assert own.get("readOnlyRootFilesystem") is True, f"{where}: the root filesystem is writable"
        assert own.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
        assert not own.get("privileged"), f"{where}: privileged"
        capabilities = own.get("capabilities") or {}
        assert "ALL" in capabilities.get("drop", []) and not capabilities.get("add"), f"{where}: capabilities not all dropped"


@pytest.mark.parametrize("name", POD_NAMES)
def test_every_path_written_at_run_time_is_an_empty_dir(name):
    """With a read-only root filesystem, each place the gateway or Ray writes is a writable emptyDir
    with a size limit (a runaway log or cache evicts the pod rather than filling the node's disk)."""
    _, spec = pod(name)
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for volume in volumes.values():
        if "emptyDir" in volume:
            assert (volume["emptyDir"] or {}).get("sizeLimit"), f"{name}: emptyDir {volume['name']} has no sizeLimit"
    for container in spec["containers"]:
        where = f"{name}/{container['name']}"
        env = {**image_env(), **{e["name"]: e["value"] for e in container.get("env", []) if "value" in e}}
        assert "HOME" in env, f"{where}: no HOME"
        written = {
            # Ray's temp dir (TMPDIR/ray: sessions, logs, sockets, runtime envs), gunicorn's worker
            # heartbeat files, the gateway's PROMETHEUS_MULTIPROC_DIR (mkdtemp), Python's tempfile
            "TMPDIR": env.get("RAY_TMPDIR") or env.get("TMPDIR", "/tmp"),
            # gunicorn's control socket (~/.gunicorn/gunicorn.ctl), ~/.ray, ~/.cache (Hugging Face, vLLM, Triton)
            "HOME": env["HOME"],
            # Ray's object store (plasma)
            "/dev/shm": "/dev/shm",
        }
        for var in ("RAY_TMPDIR", "PROMETHEUS_MULTIPROC_DIR", "XDG_RUNTIME_DIR", "XDG_CACHE_HOME", "HF_HOME"):
            if var in env:
                written[var] = env[var]
        for what, path in written.items():
            mount = covering_mount(container, path)
            assert mount is not None, f"{where}: {what} ({path}) is on the read-only root filesystem"
            assert "emptyDir" in volumes.get(mount["name"], {}), f"{where}: {what} ({path}) is not on an emptyDir"
            assert not mount.get("readOnly"), f"{where}: {what} ({path}) is mounted read-only"
        shm = volumes[covering_mount(container, "/dev/shm")["name"]]["emptyDir"]
        assert shm.get("medium") == "Memory", f"{where}: /dev/shm is not memory"
        # Ray's object store takes 30% of the memory by default and refuses a /dev/shm smaller than one over 10 GB
        memory = quantity(container["resources"]["limits"]["memory"])
        assert quantity(shm["sizeLimit"]) >= 0.3 * memory, f"{where}: /dev/shm is smaller than Ray's object store"


# -- the gateway's TLS --------------------------------------------------------------------------
def test_the_gateway_serves_https_from_a_secret():
    _, spec = pod("gateway")
    container = next(c for c in spec["containers"] if c["name"] == "gateway")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert "GATEWAY_ALLOW_OPEN_CHAT" not in env
    assert env.get("GATEWAY_CERTFILE") and env.get("GATEWAY_KEYFILE"), "no GATEWAY_CERTFILE/GATEWAY_KEYFILE: plain HTTP"
    for var in ("GATEWAY_CERTFILE", "GATEWAY_KEYFILE"):
        mount = covering_mount(container, env[var])
        assert mount is not None and "secret" in volumes[mount["name"]], f"{var} {env[var]} is not from a Secret"
        assert mount.get("readOnly") is True, f"{var}: the Secret is mounted writable"
        mode = volumes[mount["name"]]["secret"].get("defaultMode", 0o644)
        assert not mode & 0o027, f"{var}: the Secret's files are mode {mode:o} (group-writable or others may read)"
    port = next(p for p in container["ports"] if p["containerPort"] == GATEWAY_PORT)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get.get("scheme") == "HTTPS", f"{probe} speaks plain HTTP to an HTTPS port"
        assert get["port"] in (GATEWAY_PORT, port.get("name"))
    service = next(d for d in load("gateway.yaml") if d["kind"] == "Service")
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in (GATEWAY_PORT, port.get("name"))
    assert "https" in (service_port.get("name"), service_port.get("appProtocol")), "the Service's port is not named https"


# -- NetworkPolicies ----------------------------------------------------------------------------
def selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector matches these labels."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if not {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
                "Exists": key in labels, "DoesNotExist": key not in labels}[op]:
            return False
    return True


def port_allowed(rule: dict, port: int, names: dict[str, int]) -> bool:
    if not rule.get("ports"):
        return True
    for entry in rule["ports"]:
        if entry.get("protocol", "TCP") != "TCP":
            continue
        if "port" not in entry:
            return True
        low = names.get(entry["port"], entry["port"]) if isinstance(entry["port"], str) else entry["port"]
        if low == port or (entry.get("endPort") and low <= port <= entry["endPort"]):
            return True
    return False


def is_cluster_peer(peer: dict, cluster: str) -> bool:
    """A peer that can only be one of the cluster's own pods: in this namespace, selected by the
    RayCluster's label or the gateway's."""
    labels = (peer.get("podSelector") or {}).get("matchLabels") or {}
    return ("namespaceSelector" not in peer and "ipBlock" not in peer
            and (labels.get("ray.io/cluster") == cluster or labels.get("app.kubernetes.io/name") == "llm-gateway-api"))


def test_network_policies_let_only_the_cluster_reach_ray_and_the_ingress_reach_the_gateway():
    policies = [d for d in all_docs() if d["kind"] == "NetworkPolicy"]
    assert policies, "no NetworkPolicy in deploy/kubernetes"
    cluster = load("raycluster.yaml")[0]["metadata"]["name"]
    everyone = pods()
    for name, labels, template in everyone:
        names = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", []) if "name" in p}
        isolating = [p for p in policies if selects(p["spec"]["podSelector"], labels)
                     and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
        assert isolating, f"no NetworkPolicy selects the {name} pods: anything can reach them"
        rules = [r for p in isolating for r in p["spec"].get("ingress") or []]
        for peer_name, peer_labels, _ in everyone:  # the cluster's own pods reach each other on Ray's ports
            for port in RAY_PORTS:
                assert any(port_allowed(r, port, names) and any(is_cluster_peer(p, cluster) and selects(p["podSelector"], peer_labels)
                                                                for p in r.get("from") or []) for r in rules), \
                    f"the {peer_name} pods cannot reach the {name} pods on Ray's port {port}"
        for rule in rules:  # and nothing else does, but callers from the ingress namespace to the gateway's port
            assert rule.get("from"), f"{name}: an ingress rule without `from` lets in every pod and address"
            for peer in rule["from"]:
                if is_cluster_peer(peer, cluster):
                    continue
                assert name == "gateway", f"{name}: a Ray pod lets in more than the cluster's own pods: {peer}"
                assert "ipBlock" not in peer and (peer.get("namespaceSelector") or {}).get("matchLabels"), \
                    f"the gateway lets in {peer}: name the namespace"
                assert rule.get("ports") and all(port_allowed({"ports": [e]}, GATEWAY_PORT, names) and not e.get("endPort")
                                                 for e in rule["ports"]), f"the gateway lets {peer} in beyond its HTTPS port"
    gateway_labels, gateway_spec = pod("gateway")
    names = {p["name"]: p["containerPort"] for c in gateway_spec["containers"] for p in c.get("ports", []) if "name" in p}
    assert any(port_allowed(r, GATEWAY_PORT, names) and any(not is_cluster_peer(p, cluster) for p in r["from"])
               for p in policies if selects(p["spec"]["podSelector"], gateway_labels) for r in p["spec"].get("ingress") or []), \
        "nothing outside the cluster can reach the gateway's port"


# -- more than one machine ----------------------------------------------------------------------
def group_resources(group: dict) -> dict[str, int]:
    """The custom resources each pod of a RayCluster group carries: its rayStartParams ``resources``, read
    the three ways it is read, which must agree. Bash: KubeRay pastes ``--resources=VALUE`` into the Ray
    container's command line (``convertParamMap``, ray-operator/controllers/ray/common/pod.go), so the
    JSON must survive the shell. KubeRay: ``getResourcesMap`` there trims quotes and parses JSON, before
    it adds ``num-gpus`` from the GPU limit. Ray's autoscaler (``_get_custom_resources``), once it is on.
    """
    params = group.get("rayStartParams") or {}
    if "resources" not in params:
        return {}
    value = params["resources"]
    where = f"group {group.get('groupName', 'head')}: rayStartParams resources {value!r}"
    assert isinstance(value, str), f"{where}: rayStartParams values are strings"
    words = shlex.split(f"--resources={value}")
    assert len(words) == 1, f"{where}: bash makes {words} of it"
    try:
        by_bash = json.loads(words[0].partition("=")[2])
        by_kuberay = json.loads(value.strip("'\"` "))
    except ValueError as exc:
        pytest.fail(f"{where}: not JSON once bash or KubeRay has read it ({exc}); give the JSON in single quotes")
    assert isinstance(by_bash, dict) and all(type(v) is int for v in by_bash.values()), \
        f"{where}: a JSON object of whole numbers (Ray's autoscaler takes no other)"
    check_resources(by_bash, whole=True)  # custom names only (CPUs, GPUs, memory have flags of their own)
    from ray.autoscaler._private.kuberay.autoscaling_config import _get_custom_resources

    by_autoscaler = _get_custom_resources({}, params, group.get("groupName", "headgroup"))
    assert by_bash == by_kuberay == by_autoscaler, f"{where}: bash {by_bash}, KubeRay {by_kuberay}, autoscaler {by_autoscaler}"
    return by_bash


def gpu_limit(group: dict) -> float:
    return sum(quantity((c.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu", 0))
               for c in group["template"]["spec"]["containers"])


def spreads_over_nodes(spec: dict, labels: dict) -> bool:
    """The pod spec keeps pods with these labels on different Kubernetes nodes (preferred or required)."""
    anti = (spec.get("affinity") or {}).get("podAntiAffinity") or {}
    terms = [t.get("podAffinityTerm") or {} for t in anti.get("preferredDuringSchedulingIgnoredDuringExecution") or []]
    terms += list(anti.get("requiredDuringSchedulingIgnoredDuringExecution") or [])
    return any(t.get("topologyKey") == "kubernetes.io/hostname" and "labelSelector" in t
               and selects(t["labelSelector"] or {}, labels) for t in terms)


def test_the_ray_cluster_has_a_cpu_pool_group_and_a_gpu_pool_group():
    spec = load("raycluster.yaml")[0]["spec"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    carries = {name: group_resources(group) for name, group in groups.items()}
    group_resources(spec["headGroupSpec"])  # (the head's, if any, are read the same way)
    cpu = [name for name, has in carries.items() if has.get(CPU_POOL)]
    gpu = [name for name, has in carries.items() if has.get(GPU_POOL)]
    assert cpu, f"no worker group carries {CPU_POOL}: a deploy with resources {{{CPU_POOL}: ...}} never runs ({carries})"
    assert gpu, f"no worker group carries {GPU_POOL}: a deploy with resources {{{GPU_POOL}: ...}} never runs ({carries})"
    for name in cpu:
        group = groups[name]
        assert not gpu_limit(group) and GPU_POOL not in carries[name], f"{name}: endpoints pinned to {CPU_POOL} land on GPUs"
        # a lost pod leaves the endpoints pinned to the group another node carrying the resource
        assert min(group["replicas"], group["minReplicas"]) >= 2, f"{name}: one pod carries {CPU_POOL}"
        labels = next(labels for n, labels, _ in pods() if n == f"ray-{name}")
        assert spreads_over_nodes(group["template"]["spec"], labels), f"{name}: its pods may share one Kubernetes node"
    for name in gpu:
        group = groups[name]
        assert gpu_limit(group) >= 1, f"{name} carries {GPU_POOL} without an nvidia.com/gpu limit"
        assert carries[name][GPU_POOL] == gpu_limit(group), f"{name}: one {GPU_POOL} per GPU ({carries[name]})"
        assert CPU_POOL not in carries[name], f"{name}: endpoints pinned to {CPU_POOL} land on GPU nodes"
        assert group["replicas"] == group["minReplicas"] == 0, f"{name}: GPU pods run (and cost) before anyone scales the group"


def test_two_gateway_pods_join_the_cluster_on_different_nodes_and_a_drain_keeps_one():
    (deployment,) = [d for d in load("gateway.yaml") if d["kind"] == "Deployment"]
    replicas = deployment["spec"].get("replicas", 1)
    assert replicas >= 2, f"the gateway runs {replicas} pod(s): one lost pod is an outage"
    labels, spec = pod("gateway")
    container = next(c for c in spec["containers"] if c["name"] == "gateway")
    # every pod joins the same RayCluster: its head Service (KubeRay names it <cluster>-head-svc), GCS port
    cluster = load("raycluster.yaml")[0]
    head = f"{cluster['metadata']['name']}-head-svc:{cluster['spec']['headGroupSpec']['rayStartParams'].get('port', '6379')}"
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env.get("RAY_ADDRESS") == head, f"RAY_ADDRESS {env.get('RAY_ADDRESS')}, not the RayCluster's head {head}"
    joins = re.findall(r"ray start --address=(\S+)", " ".join(container.get("command", []) + container.get("args", [])))
    assert joins == [head], f"the pod's Ray node joins {joins}, not {head}"
    assert spreads_over_nodes(spec, labels), "the gateway's pods may all run on one Kubernetes node"
    budgets = [d for d in all_docs() if d["kind"] == "PodDisruptionBudget" and selects(d["spec"]["selector"], labels)]
    assert budgets, "no PodDisruptionBudget selects the gateway's pods: a drain may evict them all at once"
    ray_pods = [(n, lab) for n, lab, _ in pods() if n != "gateway"]
    for budget in budgets:
        keeps = budget["spec"].get("minAvailable")
        if keeps is None:  # (maxUnavailable)
            keeps = replicas - budget["spec"]["maxUnavailable"]
        assert isinstance(keeps, int) and 1 <= keeps < replicas, \
            f"PodDisruptionBudget {budget['metadata']['name']}: keeps {keeps} of {replicas} (at least one, and a drain must go on)"
        assert not [n for n, lab in ray_pods if selects(budget["spec"]["selector"], lab)], \
            f"PodDisruptionBudget {budget['metadata']['name']} selects Ray pods too"


def test_the_docs_name_the_resources_the_nodes_carry():
    text = OPERATIONS.read_text()
    found = re.search(r"^## More than one machine\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert found, "docs/operations.md has no section '## More than one machine'"
    section = found.group(1)
    assert "(#more-than-one-machine)" in text.split("\n## ", 1)[0], "the file's opening lines do not link the section"
    spec = load("raycluster.yaml")[0]["spec"]
    carried = set().union(*(group_resources(g) for g in spec["workerGroupSpecs"]))
    for name in sorted(carried | {CPU_POOL, GPU_POOL}):
        assert f"`{name}`" in section or f'"{name}"' in section, f"the section never names {name}"
    # only commands that exist: make targets of the Makefile, subcommands of python -m gateway
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    main = (ROOT / "gateway" / "__main__.py").read_text()
    subcommands = set(re.findall(r'add_parser\("(\w+)"', main)) | set(re.findall(r'argv\[:1\] == \["(\w+)"\]', main))
    for target in re.findall(r"\bmake ([\w-]+)", section):
        assert target in targets, f"the section runs make {target}: no such target"
    for sub in re.findall(r"python -m gateway (\w+)", section):
        assert sub in subcommands, f"the section runs python -m gateway {sub}: no such command ({sorted(subcommands)})"

