"""The doors: no web page, neighbour or stray bind drives the gateway (see ``gateway/doors.py``).

Each attack is sent as its sender would send it: a browser's "simple request" (``text/plain``,
no preflight) with its ``Origin``, a DNS-rebinding page's ``Host``, a start command that binds
the network by a route ``GATEWAY_BIND`` does not see.
"""
from __future__ import annotations

import datetime
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
import uuid

import httpx
import pytest

from gateway import Settings, create_app
from gateway.head import free_port
from tests.procs import ROOT, start, stop

ADMIN = "doors-admin-" + "a" * 24
METRICS = "doors-metrics-" + "m" * 24
CLIENT = "doors-client-" + "c" * 24


def deploy_body(name, base_url):
    return {"api_key": "sk-doors-0001", "chat_name": name, "model_name": "m", "base_url": base_url}


def test_a_web_page_cannot_deploy_or_reach_the_gateway(client, deploy, name, fake_openai):
    """What a page on the operator's machine can send to http://127.0.0.1:8099 without a preflight."""
    target = name("doors")
    body = deploy_body(target, "http://attacker.example:9/v1")

    # 1. a cross-site "simple request": text/plain, with the page's Origin
    r = client.post("/openai/deploy", data=json.dumps(body), content_type="text/plain",
                    headers={"Origin": "http://attacker.example"})
    assert r.status_code == 403 and r.get_json()["error"]["type"] == "origin_not_allowed"
    assert "GATEWAY_ALLOWED_ORIGINS" in r.get_json()["error"]["message"]
    # 2. the same without Origin (a sandboxed page sends "null"; a non-browser tool none): JSON only
    r = client.post("/openai/deploy", data=json.dumps(body), content_type="text/plain")
    assert r.status_code == 415 and r.get_json()["error"]["type"] == "unsupported_media_type"
    r = client.post("/openai/deploy", json=body, headers={"Origin": "null"})
    assert r.status_code == 403 and r.get_json()["error"]["type"] == "origin_not_allowed"
    r = client.post("/openai/undeploy", data="chat_name=x", content_type="application/x-www-form-urlencoded")
    assert r.status_code == 415
    # 3. DNS rebinding: the page's own name resolves to 127.0.0.1; its requests carry that Host
    for path in ("/openai/deploy", "/chat", "/deployments", "/v1/models", "/metrics"):
        r = client.open(path, method="GET" if path in ("/deployments", "/v1/models", "/metrics") else "POST",
                        json=body, headers={"Host": "rebind.attacker.example:8099"})
        err = r.get_json()["error"]
        assert r.status_code == 403 and err.get("gateway_type", err["type"]) == "host_not_allowed", path
        assert "GATEWAY_ALLOWED_HOSTS" in err["message"]
    r = client.post("/v1/chat/completions", json={"model": "x", "messages": []}, headers={"Origin": "https://a.example"})
    assert r.status_code == 403 and r.get_json()["error"]["type"] == "permission_error"
    assert r.get_json()["error"]["gateway_type"] == "origin_not_allowed"
    # nothing was deployed by any of it
    assert target not in [d["chat_name"] for d in client.get("/deployments").get_json()["deployments"]]

    # Legacy callers: no Origin, any body type on chat routes, Host an IP or localhost; the
    # gateway's own pages (same origin) pass.
    chat_name = name("doors_ok")
    assert deploy(chat_name, "sk-doors-0002").status_code == 200
    for headers in ({}, {"Host": "10.1.2.3:8099"}, {"Host": "[::1]:8099"}, {"Host": "localhost"},
                    {"Origin": "http://localhost"}):
        r = client.post("/openai/chat", data=json.dumps({"chat_name": chat_name, "content": "hi"}),
                        content_type="text/plain", headers=headers)
        assert r.status_code == 200, (headers, r.get_json())
    r = client.post("/chat", data=json.dumps({"chat_name": chat_name, "content": "hi"}), headers={"Host": ""})
    assert r.status_code == 200  # HTTP/1.0 callers send no Host


def test_allowed_hosts_and_origins_are_the_operators_to_widen(ray_head):
    app = create_app(Settings.from_env(ray_address=ray_head.address, allowed_hosts="gw.example.com, .corp.example",
                                       allowed_origins="https://tools.corp.example"))
    client = app.test_client()
    for host, code in (("gw.example.com:8099", 200), ("a.corp.example", 200), ("corp.example.evil", 403),
                       ("GW.EXAMPLE.COM.", 200), ("other.example.com", 403), ("localhost:\xb2", 200)):
        assert client.get("/healthz", headers={"Host": host}).status_code == code, host
    assert client.get("/healthz", headers={"Origin": "https://tools.corp.example"}).status_code == 200
    assert client.get("/healthz", headers={"Origin": "https://evil.example"}).status_code == 403


def test_readyz_tells_strangers_only_ready_or_why_and_metrics_has_its_own_token(ray_head):
    app = create_app(Settings.from_env(ray_address=ray_head.address, admin_token=ADMIN, metrics_token=METRICS,
                                       api_keys=CLIENT))
    client = app.test_client()
    bare = client.get("/readyz")
    assert bare.status_code == 200 and bare.get_json() == {"status": "ready"}
    for token in (ADMIN, METRICS):
        full = client.get("/readyz", headers={"Authorization": f"Bearer {token}"}).get_json()
        assert full["ray_address"] == ray_head.address and full["gateway"]["ray"]
    # /metrics: the metrics token reads it; it opens nothing else
    auth = {"Authorization": f"Bearer {METRICS}"}
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=auth).status_code == 200
    assert client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
    assert client.get("/deployments", headers=auth).status_code == 401
    assert client.post("/openai/deploy", json={}, headers=auth).status_code == 401
    assert client.post("/chat", json={"chat_name": "x", "content": "hi"}, headers=auth).status_code == 401

    # Not ready (a cluster nobody runs): why, in general words, and no address or versions.
    down = create_app(Settings.from_env(ray_address=f"127.0.0.1:{free_port()}", admin_token=ADMIN, api_keys=CLIENT))
    r = down.test_client().get("/readyz")
    assert r.status_code == 503
    body = r.get_json()
    assert body["checks"] == {"reason": "cluster_unavailable"} and body["error"]["message"] == "the Ray cluster does not answer"
    assert "127.0.0.1" not in r.get_data(as_text=True)


def test_a_network_bind_needs_an_admin_token_and_client_keys(tmp_path):
    def refused(**fields):
        with pytest.raises(SystemExit) as exc:
            Settings.from_env(bind="0.0.0.0:8099", **fields).check_bind()
        return str(exc.value)

    assert "GATEWAY_ADMIN_TOKEN" in refused() and "GATEWAY_API_KEYS" in refused()
    message = refused(admin_token=ADMIN)
    assert "GATEWAY_API_KEYS" in message and "GATEWAY_ALLOW_OPEN_CHAT" in message and "GATEWAY_ADMIN_TOKEN" not in message
    assert "GATEWAY_ADMIN_TOKEN" in refused(api_keys=CLIENT)
    empty = tmp_path / "keys.yaml"
    empty.write_text("[]\n")
    assert "GATEWAY_API_KEYS" in refused(admin_token=ADMIN, api_keys_file=str(empty))  # keys as loaded: none
    assert "GATEWAY_API_KEYS" in refused(admin_token=ADMIN, api_keys=",")
    Settings.from_env(bind="0.0.0.0:8099", admin_token=ADMIN, api_keys=CLIENT).check_bind()
    Settings.from_env(bind="0.0.0.0:8099", admin_token=ADMIN, allow_open_chat=True).check_bind()
    for loopback in ("127.0.0.1:8099", "[::1]:8099", "localhost:8099", "unix:/run/gateway.sock"):
        Settings.from_env(bind=loopback).check_bind()
    Settings.from_env().check_bind([("::1", 8099, 0, 0), ("127.0.0.2", 1), "unix:/tmp/x.sock"])
    with pytest.raises(SystemExit):
        Settings.from_env().check_bind([("127.0.0.1", 8099), ("192.168.1.20", 8099)])


@pytest.mark.parametrize("how", ["-b", "GUNICORN_CMD_ARGS"])
def test_gunicorn_checks_the_address_it_really_binds(tmp_path, how):
    """``-b`` and ``GUNICORN_CMD_ARGS`` bypass GATEWAY_BIND: the check reads gunicorn's own addresses."""
    port = free_port()
    log_path = tmp_path / "refused.log"
    cmd = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"]
    env = {"GATEWAY_ADMIN_TOKEN": ADMIN}
    if how == "-b":
        cmd[3:3] = ["-b", f"0.0.0.0:{port}"]
    else:
        env["GUNICORN_CMD_ARGS"] = f"--bind 0.0.0.0:{port}"
    proc = start(cmd, env, log_path)
    try:
        assert proc.wait(60) != 0
    finally:
        if proc.poll() is None:
            stop(proc)
    log = log_path.read_text()
    assert f"refusing to listen on 0.0.0.0:{port}" in log and "GATEWAY_API_KEYS" in log, log[-2000:]
    assert ADMIN not in log
    assert "embedded Ray head" not in log  # refused before starting anything


def test_gunicorn_checks_an_inherited_socket_once_it_holds_it(tmp_path):
    """``fd://`` (systemd socket activation and the like): the address is known only from the socket."""
    sock = socket.socket()
    sock.bind(("0.0.0.0", 0))
    sock.listen()
    fd = sock.fileno()
    port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    # joined to an address nobody serves: no embedded head starts, and no worker ever runs
    env.update(GATEWAY_ADMIN_TOKEN=ADMIN, RAY_ADDRESS=f"127.0.0.1:{free_port()}")
    log_path = tmp_path / "fd.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", f"fd://{fd}", "app:app"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, pass_fds=(fd,),
                                start_new_session=True)
    try:
        assert proc.wait(60) != 0
    finally:
        sock.close()
        if proc.poll() is None:
            stop(proc)
    log = log_path.read_text()
    assert f"refusing to listen on 0.0.0.0:{port}" in log and "Booting worker" not in log, log[-2000:]


def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_tls_on_a_network_bind_with_every_door_locked(ray_head, tmp_path, fake_openai):
    """The way to listen on the network: TLS, an admin token, client keys. Over a real socket."""
    cert, key = _self_signed(tmp_path)
    port = free_port()
    log_path = tmp_path / "tls.log"
    proc = start([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"], {
        "RAY_ADDRESS": ray_head.address, "GATEWAY_BIND": f"0.0.0.0:{port}", "GATEWAY_WORKERS": "1",
        "GATEWAY_THREADS": "4", "GATEWAY_ADMIN_TOKEN": ADMIN, "GATEWAY_API_KEYS": CLIENT,
        "GATEWAY_CERTFILE": cert, "GATEWAY_KEYFILE": key}, log_path)
    base = f"https://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, verify=cert, timeout=30) as http:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                try:
                    if http.get("/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.3)
            chat_name = f"tls_{uuid.uuid4().hex[:8]}"
            admin = {"Authorization": f"Bearer {ADMIN}"}
            r = http.post("/openai/deploy", json=deploy_body(chat_name, fake_openai.base_url), headers=admin)
            assert r.status_code == 200, r.text
            try:
                r = http.post("/openai/chat", content=b'{"chat_name": "%s", "content": "hi"}' % chat_name.encode(),
                              headers={"Authorization": f"Bearer {CLIENT}", "Content-Type": "text/plain"})
                assert r.status_code == 200, r.text
                assert http.post("/chat", json={"chat_name": chat_name, "content": "hi"}).status_code == 401
                r = http.get("/deployments", headers={**admin, "Host": "evil.example"})
                assert r.status_code == 403 and r.json()["error"]["type"] == "host_not_allowed"
            finally:
                http.post("/openai/undeploy", json={"chat_name": chat_name, "force": True}, headers=admin)
        # plain HTTP on the TLS port gets no answer from the gateway
        with pytest.raises(httpx.TransportError):  # the TLS handshake fails: no HTTP answer at all
            httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
    finally:
        assert stop(proc) == 0
    assert ADMIN not in log_path.read_text() and CLIENT not in log_path.read_text()


def test_tls_settings_go_together():
    result = subprocess.run([sys.executable, "-c", "from gateway import Settings; Settings.from_env()"],
                            env={"GATEWAY_CERTFILE": "/x/cert.pem", "PATH": "/usr/bin:/bin"}, cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode != 0 and "GATEWAY_CERTFILE and GATEWAY_KEYFILE go together" in result.stderr
