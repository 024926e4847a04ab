"""Small pure helpers a regression in would leak a key, open a door or mislabel an error: pinned without a server."""
from __future__ import annotations

from pathlib import Path

import pytest

from gateway.auth import Auth, check_chat_names, load_keys
from gateway.doors import Doors, check_listeners, is_loopback_address, split_host
from contract.errors import GatewayError
from providers.error_mapping import retry_after_seconds
from providers.keys import judge_key_check, key_fingerprint, redact, shown_url

SECRET = "sk-proj-0123456789abcdefXYZ"


# -- secrets in messages ------------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    f"bad key {SECRET}",
    f"Incorrect API key provided: {SECRET[:-3]}***",     # the SDK shows most of it
])
def test_redact_removes_the_secret_and_every_long_run_of_it(text):
    out = redact(text, SECRET)
    assert "[redacted]" in out
    for i in range(len(SECRET) - 8 + 1):
        assert SECRET[i:i + 8] not in out


def test_redact_keeps_what_is_not_the_secret():
    assert redact("nothing to hide here", SECRET) == "nothing to hide here"
    assert redact("", SECRET) == "" and redact("text", "") == "text"
    assert redact("a short abc key", "abc") == "a short [redacted] key"  # short secrets: only whole


@pytest.mark.parametrize("key, shown", [
    ("sk-1234567890abcdef", "sk-...cdef"),
    ("abcdefghijk", "...jk"),        # 8-11 characters: the last two only
    ("1234567", "***"),              # shorter: nothing at all
    ("密钥密钥密钥密钥密钥密钥", "...密钥密钥"),  # no prefix that is not ASCII
])
def test_key_fingerprint_tells_keys_apart_without_giving_one_away(key, shown):
    assert key_fingerprint(key) == shown
    assert len(shown.replace(".", "").replace("*", "")) <= 7


@pytest.mark.parametrize("url, shown", [
    ("https://user:pw@relay.example:8443/v1?token=abc#frag", "https://relay.example:8443/v1"),
    ("http://api.example/v4", "http://api.example/v4"),
])
def test_shown_url_drops_credentials_query_and_fragment(url, shown):
    assert shown_url(url) == shown


def test_shown_url_keeps_ipv6_brackets():
    assert shown_url("http://[::1]:8080/x") == "http://[::1]:8080/x"


@pytest.mark.parametrize("headers, seconds", [
    ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),  # the milliseconds first
    ({"retry-after": "9"}, 9.0),
    ({"retry-after": "-3"}, 0.0),
    ({"retry-after-ms": "soon", "retry-after": "2"}, 2.0),  # a bad one is skipped
    ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, None),
    (None, None),
])
def test_retry_after_seconds(headers, seconds):
    assert retry_after_seconds(headers) == seconds


def test_retry_after_seconds_is_finite():
    seconds = retry_after_seconds({"retry-after": "inf"})
    assert seconds is None or seconds < float("inf")
    GatewayError("upstream_rate_limited", "slow down", retry_after=seconds).headers()


# -- the deploy-time key check -------------------------------------------------------------------
BASE = "https://user:pw@relay.example/api/v4?token=t"


def judged(type_: str, status=None, code=None):
    return judge_key_check(GatewayError(type_, "what the provider said", upstream_status=status, provider_code=code),
                           BASE, "zhipu")


@pytest.mark.parametrize("type_, status, code, said", [
    ("upstream_error", 401, None, "(HTTP 401)"),
    ("upstream_auth", 401, "1000", "(HTTP 401, 1000)"),
    ("upstream_auth", None, "InvalidApiKey", "(InvalidApiKey)"),
])
def test_a_rejected_key_is_invalid_key(type_, status, code, said):
    with pytest.raises(GatewayError) as info:
        judged(type_, status, code)
    err = info.value
    assert err.type == "invalid_key" and err.status == 400
    assert err.info.fields == ["api_key"] and err.info.provider == "zhipu" and err.info.upstream_status == status
    assert f"the provider rejected this key {said}" in err.info.message
    assert "verify_key" not in err.info.message  # the provider said the key is wrong: no way around the check
    assert "https://relay.example/api/v4" in err.info.message and "pw" not in err.info.message and "token" not in err.info.message


@pytest.mark.parametrize("type_", ["upstream_auth", "upstream_error"])
def test_a_403_only_warns(type_):
    warning = judged(type_, 403)
    assert "HTTP 403" in warning and "deployed anyway" in warning and "not a wrong key" in warning


@pytest.mark.parametrize("status", [404, 405])
def test_a_base_url_without_the_models_route_is_invalid_request(status):
    with pytest.raises(GatewayError) as info:
        judged("upstream_bad_request", status)
    assert info.value.type == "invalid_request"
    assert info.value.info.fields == ["base_url", "verify_key"]
    assert f"https://relay.example/api/v4/models answered HTTP {status}" in info.value.info.message


@pytest.mark.parametrize("type_, status", [("upstream_error", 500), ("upstream_error", 503), ("upstream_rate_limited", 429),
                                           ("upstream_timeout", None), ("upstream_error", None)])
def test_what_says_nothing_about_the_key_warns(type_, status):
    assert judged(type_, status) == "the key could not be checked, deployed anyway: what the provider said"


# -- the doors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, split", [
    ("localhost:8099", ("localhost", 8099)), ("[::1]:8099", ("::1", 8099)), ("::1", ("::1", None)),
    ("evil.com:80@127.0.0.1", ("evil.com", None)),
])
def test_split_host(value, split):
    assert split_host(value) == split


@pytest.mark.parametrize("host, allowed_hosts, ok", [
    ("app.localhost", None, True), ("10.0.0.5:8099", None, True), ("[::1]:8099", None, True),  # any IP: no rebinding
    (None, None, True),                                                    # HTTP/1.0
    ("evil.example", None, False), ("localhost.evil.example", None, False),
    ("GW.example.com:8099", "gw.example.com", True),
    ("a.example.com", ".example.com", True), ("example.com.evil", ".example.com", False),
    ("anything", "*", True),
])
def test_host_check(host, allowed_hosts, ok):
    doors = Doors(allowed_hosts=allowed_hosts)
    if ok:
        doors.check(host, None, "http")
        return
    with pytest.raises(GatewayError) as info:
        doors.check(host, None, "http")
    assert info.value.type == "host_not_allowed" and "GATEWAY_ALLOWED_HOSTS" in info.value.info.message


@pytest.mark.parametrize("host, origin, scheme, allowed_origins, ok", [
    ("127.0.0.1:8099", None, "http", None, True),                          # legacy programs send none
    ("127.0.0.1:8099", "http://127.0.0.1:8099", "http", None, True),       # the gateway's own page
    ("127.0.0.1:8099", "https://127.0.0.1:8099", "http", None, False),     # another scheme is another origin
    ("127.0.0.1:8099", "https://evil.example", "http", None, False),
    ("127.0.0.1:8099", "null", "http", None, False),
    ("127.0.0.1:8099", "https://tools.example.com", "http", "https://tools.example.com/", True),
    ("127.0.0.1:8099", "https://evil.example", "http", "*", True),
])
def test_origin_check(host, origin, scheme, allowed_origins, ok):
    doors = Doors(allowed_origins=allowed_origins)
    if ok:
        doors.check(host, origin, scheme)
        return
    with pytest.raises(GatewayError) as info:
        doors.check(host, origin, scheme)
    assert info.value.type == "origin_not_allowed" and "GATEWAY_ALLOWED_ORIGINS" in info.value.info.message


@pytest.mark.parametrize("content_type, ok", [("Application/JSON; charset=utf-8", True), ("text/plain", False), (None, False)])
def test_admin_routes_take_json_only(content_type, ok):
    if ok:
        Doors.check_json(content_type)
        return
    with pytest.raises(GatewayError) as info:
        Doors.check_json(content_type)
    assert info.value.type == "unsupported_media_type" and info.value.status == 415


@pytest.mark.parametrize("address, loopback", [
    (("127.0.0.1", 8099), True), ("[::1]:8099", True), ("unix:/run/gw.sock", True),
    (("0.0.0.0", 8099), False), ("[::]:8099", False),
])
def test_is_loopback_address(address, loopback):
    assert is_loopback_address(address) is loopback


def test_a_network_listener_needs_the_doors_locked():
    check_listeners(["127.0.0.1:8099"], admin_token=False, client_keys=False, open_chat=False)
    check_listeners(["0.0.0.0:8099"], admin_token=True, client_keys=True, open_chat=False)
    check_listeners(["0.0.0.0:8099"], admin_token=True, client_keys=False, open_chat=True)
    with pytest.raises(SystemExit) as info:
        check_listeners(["127.0.0.1:1", ("0.0.0.0", 8099)], admin_token=False, client_keys=True, open_chat=False)
    assert "0.0.0.0:8099" in str(info.value) and "GATEWAY_ADMIN_TOKEN" in str(info.value)
    with pytest.raises(SystemExit) as info:
        check_listeners(["10.0.0.5:8099"], admin_token=True, client_keys=False, open_chat=False)
    assert "GATEWAY_API_KEYS" in str(info.value) and "GATEWAY_ADMIN_TOKEN" not in str(info.value)


# -- client keys ---------------------------------------------------------------------------------------
KEY = "sk-client-key-0123456789"


def keys_file(tmp_path, text: str) -> str:
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    return str(path)


def test_load_keys_inline_and_file(tmp_path):
    path = keys_file(tmp_path, f"- key: {KEY}\n  name: app1\n  chat_names: [a, b]\n  rate_per_minute: 0.5\n")
    keys = load_keys("first-key-123, ,second-key-456", path)
    assert [k.name for k in keys] == ["key#1", "key#2", "app1"]
    assert keys[2].chat_names == frozenset({"a", "b"}) and keys[2].rate_per_minute == 0.5 and keys[2].limited
    assert KEY not in repr(keys)
    assert load_keys(None, None) == [] and load_keys(None, keys_file(tmp_path, "")) == []


@pytest.mark.parametrize("text, says", [
    (f"- key: {KEY}\n  name: app1\n  rate_per_minute: -1\n", "entry #1 (name 'app1'): rate_per_minute"),
    (f"- key: {KEY}\n  tokens_per_minute: .inf\n", "entry #1: tokens_per_minute"),
    (f"- key: {KEY}\n  {KEY}: pasted in the wrong place\n", "a field the entry should not have"),
    (f"- name: ok\n  key: {KEY}\n- key: {KEY[:7]}\n", "entry #2: key"),
    (f"key: [{KEY}\n", "is not valid YAML/JSON near line 2"),
    (f"{{key: {KEY}}}\n", "must be a list"),
    (f"- {KEY}\n", "entry #1"),
])
def test_a_bad_keys_file_stops_the_start_without_showing_a_key(tmp_path, text, says):
    with pytest.raises(SystemExit) as info:
        load_keys(None, keys_file(tmp_path, text))
    message = str(info.value)
    assert says in message
    assert KEY not in message and KEY[:7] not in message


@pytest.mark.parametrize("inline, text, says", [
    (None, f"- key: {KEY}\n  name: app1\n- key: {KEY}\n  name: app2\n  rate_per_minute: 5\n",
     "entry #2 (name 'app2') has the same key as GATEWAY_API_KEYS_FILE"),
    (KEY, f"- key: {KEY}\n  name: app1\n", "entry #1 (name 'app1') has the same key as GATEWAY_API_KEYS entry #1"),
    (f"{KEY},other-key-123,{KEY}", "", "GATEWAY_API_KEYS entry #3 has the same key as GATEWAY_API_KEYS entry #1"),
])
def test_a_key_given_twice_stops_the_start_instead_of_keeping_the_last(tmp_path, inline, text, says):
    with pytest.raises(SystemExit) as info:
        load_keys(inline, keys_file(tmp_path, text))
    assert says in str(info.value) and KEY not in str(info.value)


def test_a_short_inline_key_is_named_by_its_place_not_shown():
    with pytest.raises(SystemExit) as info:
        load_keys("good-key-12345,short1", None)
    assert "GATEWAY_API_KEYS entry #2" in str(info.value) and "short1" not in str(info.value)


def test_an_unreadable_keys_file(tmp_path):
    with pytest.raises(SystemExit) as info:
        load_keys(None, str(tmp_path / "missing.yaml"))
    assert "cannot be read (FileNotFoundError)" in str(info.value)


def test_client_keys_are_checked_and_scoped():
    auth = Auth("admin-token-123", load_keys(KEY, None))
    assert auth.client(f"Bearer {KEY}").name == "key#1"
    assert auth.client("Bearer admin-token-123") is None  # the admin may chat
    for header in (None, "Bearer wrong-key-000", f"Basic {KEY}", KEY):
        with pytest.raises(GatewayError) as info:
            auth.client(header)
        assert info.value.type == "unauthorized"


def test_a_scoped_key_is_refused_what_it_may_not_use(tmp_path):
    (scoped,) = load_keys(None, keys_file(tmp_path, f"- key: {KEY}\n  name: app1\n  chat_names: [a, b]\n"))
    check_chat_names(scoped, ["a", "b"])
    check_chat_names(None, ["anything"])  # keys off, or the admin
    with pytest.raises(GatewayError) as info:
        check_chat_names(scoped, ["a", "z", "c"])
    assert info.value.type == "forbidden"
    assert info.value.info.message.startswith("app1 may not use: c, z; it may use a, b")


def test_the_chat_routes_are_exactly_the_calls_to_one_endpoint():
    """``X-Gateway-Overhead-Ms`` (and a refused body's endpoint) belong to these routes and no other."""
    from gateway import Settings, create_app
    from gateway.context import is_chat_route

    app = create_app(Settings.from_env(ray_address="127.0.0.1:1"))  # (builds routes; touches no Ray)
    chat = sorted(rule.rule for rule in app.url_map.iter_rules() if is_chat_route(rule.endpoint))
    providers = sorted(rule.rule for rule in app.url_map.iter_rules() if rule.rule.endswith("/deploy"))
    assert chat == sorted(["/chat", "/v1/chat/completions", *(p.removesuffix("/deploy") + "/chat" for p in providers)])
    assert len(providers) >= 3


def test_an_operators_metrics_directory_loses_only_the_last_runs_samples(tmp_path):
    """``PROMETHEUS_MULTIPROC_DIR`` set by the operator: the gateway clears its own sample files at start,
    never the directory or anything else in it (it used to remove the whole tree)."""
    from gateway.metrics import clear_samples

    for name in ("counter_123.db", "gauge_livesum_123.db", "histogram_9.db", "gauge_all_7.db",
                 "keep.txt", "counter_notes.db", "other.db"):
        (tmp_path / name).write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "counter_1.db").write_text("x")
    assert clear_samples(str(tmp_path)) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter_notes.db", "keep.txt", "other.db", "sub"]
    assert (tmp_path / "sub" / "counter_1.db").exists()
    assert clear_samples(str(tmp_path / "new")) == 0 and (tmp_path / "new").is_dir()


def test_every_answer_says_nosniff():
    from gateway import Settings, create_app

    app = create_app(Settings.from_env(ray_address="127.0.0.1:1"))  # (no route below touches Ray)
    client = app.test_client()
    for r in (client.get("/nowhere"), client.post("/chat", data="{", content_type="application/json"),
              client.get("/ui/")):
        assert r.headers["X-Content-Type-Options"] == "nosniff", (r.status_code, dict(r.headers))


def test_behind_a_tls_proxy_the_public_url_is_the_gateways_own_origin():
    """The proxy speaks https to the browser and http to the gateway: the console's POSTs carry
    ``Origin: https://gw.example.com`` on an http request, refused unless that URL is the gateway's."""
    with pytest.raises(GatewayError) as info:
        Doors(allowed_hosts="gw.example.com").check("gw.example.com", "https://gw.example.com", "http")
    assert info.value.type == "origin_not_allowed"
    doors = Doors(public_url="https://GW.example.com/")
    doors.check("gw.example.com", "https://gw.example.com", "http")  # its host and origin: allowed
    doors.check("10.0.0.5:8099", None, "http")
    for origin in ("https://evil.example.com", "https://gw.example.com:8443", "null"):
        with pytest.raises(GatewayError):
            doors.check("gw.example.com", origin, "http")
    with pytest.raises(GatewayError) as info:
        doors.check("other.example.com", None, "http")
    assert info.value.type == "host_not_allowed"


def test_blanked_credentials_leave_proc_environ_but_not_the_process(tmp_path):
    """``gateway.secrecy.keep_to_itself`` blanks credential values in the block /proc/<pid>/environ shows;
    Python and C code (getenv: Ray's token loader), and children, still get them. Run in a child: it
    would mark this test process not dumpable."""
    import subprocess
    import sys

    code = (
        "import ctypes, os, subprocess, sys\n"
        "from gateway.secrecy import keep_to_itself, dumpable\n"
        "assert keep_to_itself() and dumpable() is False\n"
        "raw = open('/proc/self/environ', 'rb').read()\n"
        "assert b'sk-live-123' not in raw and b'ray-tok-456' not in raw and b'RAY_AUTH_TOKEN=' in raw, raw\n"
        "assert b'PLAIN_SETTING=visible' in raw\n"
        "libc = ctypes.CDLL(None); libc.getenv.restype = ctypes.c_char_p\n"
        "assert libc.getenv(b'RAY_AUTH_TOKEN') == b'ray-tok-456' and os.environ['OPENAI_API_KEY'] == 'sk-live-123'\n"
        "out = subprocess.run([sys.executable, '-c', 'import os; print(os.environ[\"OPENAI_API_KEY\"])'],\n"
        "                     capture_output=True, text=True).stdout.strip()\n"
        "assert out == 'sk-live-123', out\n"
        "print('ok')\n"
    )
    env = {"PATH": "/usr/bin:/bin", "OPENAI_API_KEY": "sk-live-123", "RAY_AUTH_TOKEN": "ray-tok-456",
           "PLAIN_SETTING": "visible", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
