"""The Ray head's doors: what its processes inherit from the gateway, and where they listen.

The session head (conftest ``ray_head``) started after conftest put canary secrets into this
process's environment; a replica of ``shared_endpoint`` runs on it. We read what every process
of the head's tree really has: ``/proc/<pid>/environ`` and its listening sockets.
"""
from __future__ import annotations

import ipaddress
import os

import pytest

from gateway import Settings
from gateway.head import EmbeddedHead

#: set by conftest before the head started; none may reach a Ray process
CANARIES = ("OPENAI_API_KEY", "MY_LEGACY_APP_SECRET", "GATEWAY_TEST_CANARY_SECRET")
#: named by conftest's GATEWAY_HEAD_ENV: must reach them
EXTRA = "LLMGW_TEST_HEAD_EXTRA"



def _psutil():
    import ray  # noqa: F401 - Ray ships the psutil it imports
    import psutil

    return psutil


def head_tree(head) -> list:
    """The head's processes: ``ray start``, GCS, raylet, dashboard, agents, every worker and replica."""
    psutil = _psutil()
    root = psutil.Process(head.proc.pid)
    return [root, *root.children(recursive=True)]


def title(proc) -> str:
    try:
        return " ".join(proc.cmdline()) or proc.name()
    except Exception:  # noqa: BLE001 - gone since we listed it
        return ""


def environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as fh:
        raw = fh.read().decode("utf-8", "replace")
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def one(procs, label: str, match) -> object:
    found = [p for p in procs if match(title(p))]
    assert found, f"no {label} among the head's processes: {[title(p)[:60] for p in procs]}"
    return found[0]


def test_the_head_gets_an_allow_list_and_named_extras():
    gateway_env = {
        # passes: what Ray, Python, CUDA, model caches, locale, TLS and proxies need
        "PATH": "/usr/bin", "HOME": "/home/llmgw", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TZ": "UTC",
        "TMPDIR": "/var/tmp", "PYTHONUNBUFFERED": "1", "PYTHONPATH": "/opt/extra", "LD_LIBRARY_PATH": "/usr/local/cuda/lib64",
        "CUDA_VISIBLE_DEVICES": "0", "NVIDIA_VISIBLE_DEVICES": "all", "NCCL_DEBUG": "WARN",
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "HF_HOME": "/models/hf", "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_CACHE": "/models/tf", "VLLM_USE_V1": "1", "XDG_CACHE_HOME": "/cache", "OMP_NUM_THREADS": "4",
        "TOKENIZERS_PARALLELISM": "false", "SSL_CERT_FILE": "/etc/ca.pem", "REQUESTS_CA_BUNDLE": "/etc/ca.pem",
        "HTTPS_PROXY": "http://proxy:3128", "no_proxy": "localhost", "RAY_AUTH_TOKEN_PATH": "/etc/llm-gateway/ray_token",
        "RAY_AUTH_TOKEN": "ray-token", "RAY_worker_niceness": "5",
        "MY_EXTRA": "named", "HF_TOKEN": "hf_named",
        # stays out: the gateway's settings and secrets, provider keys (any name), credentials of
        # allowed families, the gateway's own cluster address, anything else
        "GATEWAY_ADMIN_TOKEN": "s1", "GATEWAY_API_KEYS": "s2", "GATEWAY_METRICS_TOKEN": "s3", "GATEWAY_BIND": "x",
        "OPENAI_API_KEY": "s4", "ZHIPUAI_API_KEY": "s5", "DASHSCOPE_API_KEY": "s6", "MY_PROVIDER_KEY": "s7",
        "HUGGING_FACE_HUB_TOKEN": "s8", "VLLM_API_KEY": "s9", "NVIDIA_API_KEY": "s10", "AWS_SECRET_ACCESS_KEY": "s11",
        "RAY_ADDRESS": "127.0.0.1:6379", "PROMETHEUS_MULTIPROC_DIR": "/tmp/gw-metrics", "SOMETHING_ELSE": "x",
    }
    head = EmbeddedHead(Settings.from_env({}, head_env=" MY_EXTRA, HF_TOKEN "))
    env = head.env(gateway_env)

    passed = {"PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "PYTHONUNBUFFERED", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES",
              "NVIDIA_VISIBLE_DEVICES", "NCCL_DEBUG", "PYTORCH_CUDA_ALLOC_CONF", "HF_HOME", "HF_HUB_OFFLINE",
              "TRANSFORMERS_CACHE", "VLLM_USE_V1", "XDG_CACHE_HOME", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM",
              "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "HTTPS_PROXY", "no_proxy", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN",
              "RAY_worker_niceness", "MY_EXTRA", "HF_TOKEN"}
    for name in passed:
        assert env.get(name) == gateway_env[name], name
    ours = {"PYTHONPATH", "RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
            "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "RAY_SERVE_LOG_TO_STDERR", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"}
    assert set(env) == passed | ours
    assert env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] == "0"  # a stop does not wait 30 s draining the only node
    assert env["PYTHONPATH"].split(os.pathsep)[1:] == ["/opt/extra"]  # our code first
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"  # 127.0.0.1 stays the node's address

    # Without GATEWAY_HEAD_ENV the Hugging Face token stays out too.
    assert "HF_TOKEN" not in EmbeddedHead(Settings.from_env({})).env(gateway_env)


@pytest.mark.parametrize("names", ["GATEWAY_ADMIN_TOKEN", "A,GATEWAY_API_KEYS", "RAY_ADDRESS", "NOT-A-NAME",
                                   "PROMETHEUS_MULTIPROC_DIR"])
def test_gateway_head_env_cannot_name_what_never_goes_there(names):
    with pytest.raises(SystemExit, match="GATEWAY_HEAD_ENV"):
        EmbeddedHead(Settings.from_env({}, head_env=names)).env({})


def test_the_key_variables_of_the_endpoints_file_never_pass_whatever_their_names(tmp_path):
    """A key kept in a variable whose name fits an allowed family (HF_*, RAY_*) still stays out."""
    path = tmp_path / "endpoints.yaml"
    path.write_text("endpoints:\n  - {chat_name: a, provider: openai, model_name: m, api_key_env: HF_ACCESS}\n"
                    "  - {chat_name: b, provider: zhipu, model_name: m, api_key_env: RAY_ZHIPU}\n")
    source = {"HF_ACCESS": "sk-in-a-family", "RAY_ZHIPU": "zk-in-a-family", "HF_HOME": "/models"}
    env = EmbeddedHead(Settings.from_env({}, endpoints_file=str(path))).env(source)
    assert "HF_ACCESS" not in env and "RAY_ZHIPU" not in env and env["HF_HOME"] == "/models"
    with pytest.raises(SystemExit, match="HF_ACCESS"):
        EmbeddedHead(Settings.from_env({}, endpoints_file=str(path), head_env="HF_ACCESS")).env(source)


def test_no_gateway_secret_reaches_a_ray_process(ray_head, shared_endpoint):
    chat_name, key, _ = shared_endpoint("openai")
    canaries = {name: os.environ[name] for name in CANARIES}
    assert all(canaries.values()) and os.environ[EXTRA]  # conftest set them before the head started
    procs = head_tree(ray_head)
    must_have_extra = {
        "the GCS": one(procs, "GCS", lambda t: "gcs_server" in t),
        "the raylet": one(procs, "raylet", lambda t: "/raylet " in t or t.startswith("raylet")),
        "the Serve controller": one(procs, "Serve controller", lambda t: t.startswith("ray::ServeController")),
        "the replica": one(procs, f"replica of {chat_name}", lambda t: t.startswith(f"ray::ServeReplica:{chat_name}:")),
    }
    for label, proc in must_have_extra.items():
        env = environ(proc.pid)
        assert env.get(EXTRA) == os.environ[EXTRA], f"{label} lacks the GATEWAY_HEAD_ENV extra: we read the wrong process"
        assert env.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0", label
    looked = 0
    for proc in procs:
        try:
            env = environ(proc.pid)
        except (FileNotFoundError, ProcessLookupError):
            continue  # an idle worker that exited meanwhile
        looked += 1
        blob = "\0".join(f"{k}={v}" for k, v in env.items())
        for name, value in canaries.items():
            assert value not in blob, f"{name}'s value is in the environment of {title(proc)[:80]}"
        assert key not in blob, title(proc)[:80]
        assert not [k for k in env if k.startswith("GATEWAY_")], title(proc)[:80]
    assert looked >= len(must_have_extra)


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def _listening(proc) -> list:
    try:
        return [c for c in proc.net_connections(kind="tcp") if c.status == "LISTEN"]
    except Exception:  # noqa: BLE001 - gone since we listed it
        return []


def test_nothing_of_the_head_listens_beyond_loopback_after_deploys(ray_head, client, deploy, name):
    """Serve binds each replica's gRPC server to ``[::]:0``; on a loopback node ``gateway.loopback`` moves
    it to 127.0.0.1, where Serve's router in the gateway process still dials it (docs/operations.md, "Ray's ports")."""
    import uuid

    workers = {name("listen"): 1, name("listen"): 2}
    for chat_name, n in workers.items():
        r = deploy(chat_name, f"sk-{uuid.uuid4().hex}", workers=n)
        assert r.status_code == 200, r.get_json()
        for _ in range(2 * n):  # over Serve's gRPC path (GATEWAY_SERVE_GRPC, on by default)
            assert client.post("/chat", json={"chat_name": chat_name, "content": "hi"}).status_code == 200
    seen, beyond = [], []
    for proc in [*head_tree(ray_head), _psutil().Process()]:  # (this process: a gateway process, a Ray driver)
        for conn in _listening(proc):
            seen.append((proc.pid, title(proc), conn.laddr.ip, conn.laddr.port))
            if not _loopback(conn.laddr.ip):
                beyond.append(f"pid {proc.pid} {title(proc)[:70]!r} listens on {conn.laddr.ip}:{conn.laddr.port}")
    assert ray_head.settings.ray_port in {port for _, t, ip, port in seen if "gcs_server" in t and _loopback(ip)}
    replicas = {c: {pid for pid, t, _, _ in seen if t.startswith(f"ray::ServeReplica:{c}:")} for c in workers}
    assert {c: len(pids) for c, pids in replicas.items()} == workers, seen  # every replica is looked at
    assert not beyond, "listening beyond loopback:\n" + "\n".join(beyond)
    # ...and this process reaches each endpoint's replicas on one of their loopback ports (the gRPC one)
    dialed = {c.raddr.port for c in _psutil().Process().net_connections(kind="tcp") if c.raddr and _loopback(c.raddr.ip)}
    for chat_name, pids in replicas.items():
        assert {port for pid, _, _, port in seen if pid in pids} & dialed, f"{chat_name}: not dialed over gRPC"


@pytest.mark.parametrize("node_ip, bind", [
    ("127.0.0.1", "127.0.0.1:0"), ("127.0.0.2", "127.0.0.2:0"), ("::1", "[::1]:0"),
    ("10.1.2.3", None), ("192.168.0.7", None), ("2001:db8::1", None), ("", None), (None, None), ("node-a", None),
])
def test_only_a_loopback_node_moves_the_replica_server(node_ip, bind):
    from gateway.loopback import loopback_bind_address

    assert loopback_bind_address(node_ip) == bind


def test_the_rewrite_touches_one_call_and_only_the_any_address(monkeypatch):
    import ray.serve._private.replica as serve_replica

    from gateway import serve_apps as lb

    bound = []
    monkeypatch.setattr(serve_replica, "add_port_to_grpc_server", lambda server, address: bound.append(address) or 1)
    fake = serve_replica.add_port_to_grpc_server
    monkeypatch.setattr(lb, "_node_ip", lambda: "10.1.2.3")
    assert lb.keep_replica_grpc_on_loopback() is False  # a networked node: Ray's own bind, untouched
    assert serve_replica.add_port_to_grpc_server is fake
    monkeypatch.setattr(lb, "_node_ip", lambda: "127.0.0.1")
    assert lb.keep_replica_grpc_on_loopback() is True
    assert lb.keep_replica_grpc_on_loopback() is True  # twice: still one wrapper
    serve_replica.add_port_to_grpc_server(None, "127.0.0.1:5")  # another address passes as it is
    serve_replica.add_port_to_grpc_server(None, "[::]:0")
    assert serve_replica.add_port_to_grpc_server is fake  # one call, then Ray's helper is back
    serve_replica.add_port_to_grpc_server(None, "[::]:0")
    assert bound == ["127.0.0.1:5", "127.0.0.1:0", "[::]:0"]


def test_the_rewrite_stands_down_when_ray_binds_elsewhere(monkeypatch, caplog):
    import ray.serve._private.replica as serve_replica

    from gateway import serve_apps as lb

    monkeypatch.setattr(lb, "_node_ip", lambda: "127.0.0.1")
    monkeypatch.setattr(lb, "UPSTREAM_CALL", 'add_port_to_grpc_server(self._server, "[::]:1")')
    before = serve_replica.add_port_to_grpc_server
    with caplog.at_level("WARNING"):
        assert lb.keep_replica_grpc_on_loopback() is False
    assert serve_replica.add_port_to_grpc_server is before
    assert "all interfaces" in caplog.text


def test_this_gateway_process_listens_for_ray_on_loopback(ray_head, shared_endpoint):
    """A driver (gunicorn worker, here pytest) runs a Ray core worker server too, from the raylet's worker ports."""
    shared_endpoint("openai")  # connected
    psutil = _psutil()
    raylet = one(head_tree(ray_head), "raylet", lambda t: "/raylet " in t or t.startswith("raylet"))
    args = dict(a.lstrip("-").split("=", 1) for a in raylet.cmdline() if a.startswith("--") and "=" in a)
    low, high = int(args["min_worker_port"]), int(args["max_worker_port"])
    ours = [c.laddr for c in _listening(psutil.Process()) if low <= c.laddr.port <= high]
    assert ours, "this process runs no Ray core worker server"
    assert all(_loopback(a.ip) for a in ours), ours


def test_the_ray_token_reads_every_provider_key(ray_head, shared_endpoint):
    """What docs/operations.md says the Ray token gives: Serve keeps each endpoint's bound constructor arguments, the
    provider key among them, in its checkpoint in the GCS (ray/serve/_private/deployment_state.py,
    ``DeploymentStateManager.save_checkpoint``: key ``serve-deployment-state-checkpoint``, KV namespace
    ``serve``), readable by anyone who can talk to the GCS. If this fails, Serve stopped doing so: update docs/operations.md."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

    chat_name, key, _ = shared_endpoint("openai")
    keys = _internal_kv_list(b"", namespace="serve")
    holding = [k for k in keys if key.encode() in (_internal_kv_get(k, namespace="serve") or b"")]
    assert any(k.endswith(b"serve-deployment-state-checkpoint") for k in holding), (keys, holding)


def test_a_gateway_that_imported_ray_first_still_keeps_127_0_0_1():
    """``python app.py`` imports Ray (which reads its switch once) before it starts the head;
    ``export_embedded_env`` must still make it connect to 127.0.0.1, where the head listens."""
    import subprocess
    import sys

    code = ("import app, sys; assert 'ray' in sys.modules\n"
            "from gateway.head import export_embedded_env\n"
            "export_embedded_env('127.0.0.1:6399')\n"
            "from ray._private import services\n"
            "print(services.canonicalize_bootstrap_address('127.0.0.1:6399'))\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" and not k.startswith("GATEWAY_")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "127.0.0.1:6399"
