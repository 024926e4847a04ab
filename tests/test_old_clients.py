"""What old applications send, read as they send it (``gateway/bodies.py``).

Old programs post JSON in their platform's charset (GBK above all), forms instead of JSON,
and want bare text back. Each request here is raw bytes on a real socket to a real gunicorn
(2 workers x 4 threads) joined to the session's Ray head, with one endpoint on the fake
OpenAI upstream for the whole module: no client library re-encodes anything.
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import uuid
from urllib.parse import quote, urlsplit

import pytest

from tests.procs import gunicorn_joined_to, worker_pids

HELLO = "你好，世界"


@pytest.fixture(scope="module")
def gateway(ray_head, fake_openai, tmp_path_factory):
    """(base URL, gunicorn process, chat_name of the one endpoint)."""
    log_path = tmp_path_factory.mktemp("old_clients") / "gunicorn.log"
    for base, proc, _ in gunicorn_joined_to(ray_head.address, log_path, GATEWAY_WORKERS="2", GATEWAY_THREADS="4"):
        chat_name = f"old_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        deploy = {"api_key": "sk-old-clients-0001", "chat_name": chat_name, "model_name": "m",
                  "base_url": fake_openai.base_url, "max_retries": 0}
        status, _, body = post(base, "/openai/deploy", json.dumps(deploy).encode(), "application/json")
        assert status == 200, body
        yield base, proc, chat_name
        post(base, "/openai/undeploy", json.dumps({"chat_name": chat_name, "force": True}).encode(), "application/json")


def post(base: str, path: str, body: bytes, content_type=None, **headers) -> tuple[int, dict, bytes]:
    """POST these exact bytes; (status, headers with lower-case names, raw answer)."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        sent = {k.replace("_", "-"): v for k, v in headers.items()}
        if content_type:
            sent["Content-Type"] = content_type
        conn.request("POST", path, body=body, headers=sent)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def post_chunked(base: str, path: str, body: bytes) -> tuple[int, bytes]:
    """POST ``body`` with ``Transfer-Encoding: chunked`` on a plain socket; (status, raw answer body)."""
    url = urlsplit(base)
    with socket.create_connection((url.hostname, url.port), timeout=60) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
                     f"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode())
        try:
            for i in range(0, len(body), 65536):
                piece = body[i:i + 65536]
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            sock.sendall(b"0\r\n\r\n")
        except OSError:  # the gateway may answer and close before all of it is sent
            pass
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body_out = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body_out


def error(status: int, raw: bytes) -> dict:
    err = json.loads(raw)["error"]
    assert err["message"] and err["type"], raw
    return err


def test_json_in_the_callers_charset(gateway):
    base, _, chat_name = gateway
    for charset in ("gbk", "GB18030", "gb2312", "big5", "shift_jis", "utf-16"):
        text = "こんにちは" if charset == "shift_jis" else ("你好" if charset == "gb2312" else HELLO)
        raw = json.dumps({"chat_name": chat_name, "content": text}, ensure_ascii=False).encode(charset)
        status, headers, answer = post(base, "/openai/chat", raw, f"application/json; charset={charset}")
        assert status == 200, (charset, answer)
        assert answer.isascii() and "\\u" in answer.decode(), answer  # escaped: any decoder reads it
        assert json.loads(answer) == "echo: " + text


def test_no_charset_is_utf8_then_gb18030(gateway):
    base, _, chat_name = gateway
    body = json.dumps({"chat_name": chat_name, "content": HELLO}, ensure_ascii=False)
    # UTF-8 callers keep raw UTF-8 answers
    status, _, answer = post(base, "/openai/chat", body.encode())
    assert status == 200 and answer.decode("utf-8") == json.dumps("echo: " + HELLO, ensure_ascii=False) + "\n"
    # GBK bytes without a charset: read as GB18030, answered in ASCII
    for path in ("/chat", "/openai/chat"):
        status, _, answer = post(base, path, body.encode("gbk"), "application/json")
        assert status == 200 and answer.isascii(), answer
        got = json.loads(answer)
        assert (got if path == "/openai/chat" else got["output"]) == "echo: " + HELLO


def test_unreadable_charsets_are_invalid_request_naming_them(gateway):
    base, _, chat_name = gateway
    raw = json.dumps({"chat_name": chat_name, "content": "hi"}).encode()
    for path in ("/chat", "/openai/chat", "/chat/broadcast", "/v1/chat/completions", "/openai/deploy"):
        status, _, answer = post(base, path, raw, "application/json; charset=klingon-8")
        err = error(status, answer)
        assert status == 400 and "klingon-8" in err["message"], (path, answer)
    status, _, answer = post(base, "/chat", b'{"content": "\xff\xfe\xff"}', "application/json; charset=utf-8")
    assert status == 400 and "utf-8" in error(status, answer)["message"]
    # codecs Python has but no body is written in, and forms a codec cannot read field by field: 400, not 500
    for content_type in ("application/json; charset=idna", "application/json; charset=punycode",
                         "application/x-www-form-urlencoded; charset=utf-16"):
        status, _, answer = post(base, "/chat", raw if "json" in content_type else b"a=bc&d=e", content_type)
        assert status == 400, (content_type, answer)
    status, _, answer = post(base, "/chat", b"%FF%FEab=c", "application/x-www-form-urlencoded")
    assert status == 400, answer


def test_errors_to_a_gbk_caller_are_ascii_json(gateway):
    base, _, chat_name = gateway
    raw = json.dumps({"chat_name": chat_name, "内容": "hi"}, ensure_ascii=False).encode("gbk")
    status, _, answer = post(base, "/chat", raw, "application/json; charset=gbk")
    assert status == 400 and answer.isascii()
    assert "内容" in error(status, answer)["message"]


def test_form_bodies_on_chat_routes(gateway):
    base, _, chat_name = gateway
    form = "application/x-www-form-urlencoded"
    # the legacy route, percent-escaped GBK (what an old form posts)
    status, _, answer = post(base, "/openai/chat", f"chat_name={chat_name}&content={quote(HELLO, encoding='gbk')}".encode(), form)
    assert status == 200 and answer.isascii() and json.loads(answer) == "echo: " + HELLO
    # messages as JSON text, scalars as text, blank fields left out
    messages = json.dumps([{"role": "system", "content": "be brief"}, {"role": "user", "content": HELLO}])
    raw = f"chat_name={chat_name}&messages={quote(messages)}&temperature=0.5&max_tokens=16&stream=false&stop=".encode()
    status, _, answer = post(base, "/chat", raw, form)
    assert status == 200, answer
    assert json.loads(answer)["output"] == "echo: " + HELLO and HELLO.encode() in answer  # a UTF-8 form: raw UTF-8
    # chat_names as a plain field, and repeated
    status, _, answer = post(base, "/chat/broadcast", f"chat_names={chat_name}&content=hi".encode(), form)
    assert status == 200 and json.loads(answer)["results"][chat_name]["output"] == "echo: hi", answer
    status, _, answer = post(base, "/chat/broadcast", f"chat_names={chat_name}&chat_names=nope_x&content=hi".encode(), form)
    assert status == 200 and set(json.loads(answer)["results"]) == {chat_name, "nope_x"}, answer
    # a stop string that merely starts like JSON
    status, _, answer = post(base, "/chat", f"chat_name={chat_name}&content=hi&stop=[END]".encode(), form)
    assert status == 200, answer
    status, _, answer = post(base, "/v1/chat/completions", f"model={chat_name}&messages={quote(messages)}".encode(), form)
    assert status == 200 and json.loads(answer)["choices"][0]["message"]["content"] == "echo: " + HELLO
    # scalars still validated by the models
    status, _, answer = post(base, "/chat", f"chat_name={chat_name}&content=hi&temperature=hot".encode(), form)
    assert status == 400 and "temperature" in error(status, answer)["message"]


def test_json_sent_by_curl_d_is_read_as_json_on_chat_routes(gateway):
    """``curl -d '{...}'`` (and PHP's curl, Java's HttpURLConnection) label JSON as a form."""
    base, _, chat_name = gateway
    form = "application/x-www-form-urlencoded"
    raw = json.dumps({"chat_name": chat_name, "content": "a=b&c 1+1"}).encode()
    status, _, answer = post(base, "/chat", raw, form)
    assert status == 200 and json.loads(answer)["output"] == "echo: a=b&c 1+1", answer
    status, _, answer = post(base, "/openai/chat", raw, form)
    assert status == 200 and json.loads(answer) == "echo: a=b&c 1+1", answer
    raw = json.dumps({"model": chat_name, "messages": [{"role": "user", "content": HELLO}]}, ensure_ascii=False)
    status, _, answer = post(base, "/v1/chat/completions", raw.encode("gbk"), form + "; charset=gbk")
    assert status == 200 and json.loads(answer)["choices"][0]["message"]["content"] == "echo: " + HELLO, answer
    # deploy and undeploy stay JSON-only: a door against cross-site forms
    status, _, answer = post(base, "/openai/undeploy", json.dumps({"chat_name": "nope_old"}).encode(), form)
    assert status == 415 and error(status, answer)["type"] == "unsupported_media_type"


def test_multipart_bodies_on_chat_routes(gateway):
    base, _, chat_name = gateway
    messages = json.dumps([{"role": "user", "content": HELLO}], ensure_ascii=False)
    raw = (f'--b0undary\r\nContent-Disposition: form-data; name="chat_name"\r\n\r\n{chat_name}\r\n'
           f'--b0undary\r\nContent-Disposition: form-data; name="messages"; filename="m.json"\r\n'
           f'Content-Type: application/json; charset=gbk\r\n\r\n{messages}\r\n--b0undary--\r\n').encode("gbk")
    status, _, answer = post(base, "/chat", raw, "multipart/form-data; boundary=b0undary")
    assert status == 200 and answer.isascii() and json.loads(answer)["output"] == "echo: " + HELLO, answer
    status, _, answer = post(base, "/chat", raw, "multipart/form-data; boundary=other")
    assert status == 400 and error(status, answer)["type"] == "invalid_request"


def test_admin_routes_take_json_only_in_any_charset(gateway):
    base, _, _ = gateway
    status, _, answer = post(base, "/openai/undeploy", b"chat_name=nope_old", "application/x-www-form-urlencoded")
    assert status == 415 and error(status, answer)["type"] == "unsupported_media_type"
    raw = json.dumps({"chat_name": "nope_old", "备注": "x"}, ensure_ascii=False).encode("gbk")
    status, _, answer = post(base, "/openai/undeploy", raw, "application/json; charset=gbk")
    assert status == 400 and answer.isascii() and "备注" in error(status, answer)["message"]


def test_nesting_and_size_limits_are_400_and_413_and_no_worker_dies(gateway):
    base, proc, chat_name = gateway
    workers = worker_pids(proc.pid)
    deep_values = [
        b"[" * 100_000,
        # parses (under Python's 1000 levels) but broke pickling for Ray: a 500 before bodies.py
        b'{"chat_name": "%s", "content": "hi", "response_format": %s1%s}' % (chat_name.encode(), b'{"a":' * 900, b"}" * 900),
    ]
    for raw in deep_values:
        for path in ("/chat", "/openai/chat", "/chat/broadcast", "/v1/chat/completions", "/openai/deploy"):
            status, _, answer = post(base, path, raw, "application/json")
            assert status == 400 and "nests too deeply" in error(status, answer)["message"], (path, answer[:300])
    nested = quote("[" * 5000 + "]" * 5000)
    status, _, answer = post(base, "/chat", f"chat_name={chat_name}&messages={nested}".encode(), "application/x-www-form-urlencoded")
    assert status == 400 and "nests too deeply" in error(status, answer)["message"]
    big = json.dumps({"chat_name": chat_name, "content": "a" * (2 << 20)}).encode()
    for ct in ("application/json", "application/x-www-form-urlencoded"):
        status, _, answer = post(base, "/chat", big, ct)
        assert status == 413 and error(status, answer)["type"] == "payload_too_large"
    status, answer = post_chunked(base, "/chat", big)  # no Content-Length to refuse it by: counted as read
    assert status == 413 and error(status, answer)["type"] == "payload_too_large", answer[:300]
    status, _, answer = post(base, "/openai/chat", json.dumps({"chat_name": chat_name, "content": "still here"}).encode())
    assert status == 200 and json.loads(answer) == "echo: still here"
    assert worker_pids(proc.pid) == workers


def test_legacy_answer_as_bare_text(gateway):
    base, _, chat_name = gateway
    raw = json.dumps({"chat_name": chat_name, "content": HELLO}).encode()
    status, headers, answer = post(base, "/openai/chat", raw, "application/json", Accept="text/plain")
    assert status == 200 and headers["content-type"] == "text/plain; charset=utf-8"
    assert answer.decode("utf-8") == "echo: " + HELLO
    status, headers, answer = post(base, "/openai/chat", raw, "application/json", Accept="text/plain", Accept_Charset="gbk")
    assert headers["content-type"] == "text/plain; charset=gbk" and answer.decode("gbk") == "echo: " + HELLO
    # a character the charset cannot write becomes "?"
    status, headers, answer = post(base, "/openai/chat", raw, "application/json", Accept="text/plain", Accept_Charset="iso-8859-1")
    assert headers["content-type"] == "text/plain; charset=iso-8859-1" and answer == b"echo: " + b"?" * len(HELLO)
    # a charset Python has but cannot write text in: the next one, here UTF-8 (the call is paid for: no 500)
    status, headers, answer = post(base, "/openai/chat", raw, "application/json", Accept="text/plain", Accept_Charset="idna")
    assert status == 200 and headers["content-type"] == "text/plain; charset=utf-8", answer
    # no Accept, or JSON first: the JSON string, as before
    for accept in ({}, {"Accept": "*/*"}, {"Accept": "application/json, text/plain"}):
        status, headers, answer = post(base, "/openai/chat", raw, "application/json", **accept)
        assert headers["content-type"] == "application/json" and json.loads(answer) == "echo: " + HELLO
