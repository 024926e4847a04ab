"""gateway.bodies: request bodies as old applications send them (charsets, forms, limits), without a server."""
from __future__ import annotations

import codecs
import io
import json
from urllib.parse import quote, quote_plus

import flask
import pytest

from gateway import bodies
from gateway.bodies import MAX_DEPTH, codec_of, decode, read
from gateway.errors import GatewayError

CHINESE = "你好，世界"
MESSAGES = [{"role": "user", "content": CHINESE}]


def refused(call, *args) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        call(*args)
    assert info.value.type == "invalid_request"
    return info.value


# -- JSON in a charset ---------------------------------------------------------------
@pytest.mark.parametrize("content_type, encoding, codec", [
    ("application/json", "utf-8", "utf-8"),
    ("application/json; charset=utf-8", "utf-8", "utf-8"),
    ("application/json; charset=gbk", "gbk", "gb18030"),         # GBK is read as its superset
    ("application/json; charset=GB2312", "gb2312", "gb18030"),
    ("application/json; charset=big5", "big5", "big5"),
    ("application/json", "gbk", "gb18030"),                        # undeclared, not UTF-8: GB18030
    ("text/plain", "utf-8", "utf-8"),                             # a legacy program's Content-Type
    ("application/json", "utf-16", "utf-16"),                      # undeclared, with a BOM
    ("application/json; charset=utf-16", "utf-16", "utf-16"),
])
def test_json_body_in_its_charset(content_type, encoding, codec):
    raw = json.dumps({"chat_name": "a", "content": CHINESE}, ensure_ascii=False).encode(encoding)
    body = read(raw, content_type, forms=True)
    assert body.data == {"chat_name": "a", "content": CHINESE}
    assert body.charset == codec
    assert body.utf8 == (codec == "utf-8")


@pytest.mark.parametrize("bom, text", [
    (b"\xef\xbb\xbf", '{"a": "\u00e9"}'.encode("utf-8")),
    (b"", '\ufeff{"a": "\u00e9"}'.encode("utf-16-le")),
    (b"", '\ufeff{"a": "\u00e9"}'.encode("utf-32-le")),
])
def test_a_byte_order_mark_is_read_and_dropped(bom, text):
    assert read(bom + text, "application/json", forms=False).data == {"a": "\u00e9"}


def test_a_declared_utf8_body_with_a_bom_still_parses():
    assert read(b'\xef\xbb\xbf{"a": 1}', "application/json; charset=utf-8", forms=False).data == {"a": 1}


def test_shift_jis_is_read_as_cp932():
    raw = '{"a": "\u2460"}'.encode("cp932")  # a circled 1: CP932, not strict Shift-JIS
    assert codec_of("Shift_JIS") == "cp932"
    assert read(raw, "application/json; charset=shift_jis", forms=False).data == {"a": "\u2460"}


@pytest.mark.parametrize("charset", ["nope-123", "base64", "rot13", "idna", "x" * 100])
def test_a_charset_that_is_no_text_encoding_is_refused_by_name(charset):
    err = refused(read, b'{"a": 1}', f"application/json; charset={charset}", False)
    assert "unknown charset" in err.info.message
    assert ascii(charset[:40]) in err.info.message
    if len(charset) > 40:  # named, not echoed whole
        assert charset not in err.info.message


@pytest.mark.parametrize("charset, codec", [("utf8", "utf-8"), ("latin1", "iso8859-1"), ("cp936", "gb18030")])
def test_codec_of_names_python_codecs(charset, codec):
    assert codec_of(charset) == codec


def test_a_body_not_in_its_declared_charset_is_refused():
    err = refused(read, CHINESE.encode("gbk"), "application/json; charset=utf-8", False)
    assert "not valid 'utf-8' text" in err.info.message


@pytest.mark.parametrize("raw", [b"\x81", b"\xff\xfe\xff"])
def test_neither_utf8_nor_gb18030_is_refused_with_what_to_do(raw):
    err = refused(decode, raw, None)
    assert "charset" in err.info.message


def test_decode_reports_the_codec():
    assert decode("你".encode(), None) == ("你", "utf-8")
    assert decode("你".encode("gbk"), None) == ("你", "gb18030")
    assert decode(b"\xef\xbb\xbfx", None) == ("x", "utf-8-sig")


@pytest.mark.parametrize("raw", [b'{"a": NaN}', b'{"a": -Infinity}', b'{"a": 1'])
def test_not_json_is_refused(raw):
    err = refused(read, raw, "application/json", False)
    assert "not valid JSON" in err.info.message


@pytest.mark.parametrize("raw", [b"[1, 2]", b"null", b"  \n"])
def test_the_body_must_be_a_json_object(raw):
    assert "must be a JSON object" in refused(read, raw, "application/json", False).info.message


def nested(levels: int) -> dict:
    """An object holding lists ``levels`` deep in all (the object is the first level)."""
    value: object = "x"
    for _ in range(levels - 1):
        value = [value]
    return {"a": value}


def test_nesting_is_allowed_up_to_the_limit():
    assert read(json.dumps(nested(MAX_DEPTH)).encode(), "application/json", False).data == nested(MAX_DEPTH)


@pytest.mark.parametrize("levels", [MAX_DEPTH + 1, 100_000])
def test_nesting_deeper_than_the_limit_is_refused(levels):
    raw = b'{"a": ' + b"[" * (levels - 1) + b"]" * (levels - 1) + b"}"
    err = refused(read, raw, "application/json", False)
    assert f"nests too deeply (at most {MAX_DEPTH} levels)" in err.info.message


def test_a_form_field_is_held_to_the_same_depth():
    def form(levels: int) -> bytes:
        return f"chat_name=a&messages={quote(json.dumps(nested(levels)['a']))}".encode()

    assert read(form(MAX_DEPTH), "application/x-www-form-urlencoded", True).data["messages"] == nested(MAX_DEPTH)["a"]
    err = refused(read, form(MAX_DEPTH + 1), "application/x-www-form-urlencoded", True)
    assert "nests too deeply" in err.info.message


# -- forms ------------------------------------------------------------------------------
FORM = "application/x-www-form-urlencoded"


def test_urlencoded_chat_form_with_json_fields_and_repeated_names():
    raw = (f"chat_name=a&messages={quote(json.dumps(MESSAGES))}&fallbacks=b&fallbacks=c"
           f"&temperature=0.5&stop=&max_tokens=").encode()
    body = read(raw, FORM, forms=True)
    assert body.data == {"chat_name": "a", "messages": MESSAGES, "fallbacks": ["b", "c"], "temperature": "0.5"}
    assert body.charset == "utf-8"


@pytest.mark.parametrize("fields, fallbacks", [
    ("fallbacks=b", ["b"]),                                      # one plain name is a list of one
    (f"fallbacks={quote(json.dumps(['b', 'c']))}", ["b", "c"]),  # a JSON list
    (f"fallbacks={quote(json.dumps(['b']))}&fallbacks=c", ["b", "c"]),
])
def test_name_lists_in_a_form(fields, fallbacks):
    assert read(f"chat_name=a&{fields}".encode(), FORM, True).data["fallbacks"] == fallbacks


def test_stop_in_a_form_may_be_text_that_looks_like_json():
    assert read(b"stop=[END]", FORM, True).data == {"stop": "[END]"}
    assert read(f"stop={quote(json.dumps(['a', 'b']))}".encode(), FORM, True).data == {"stop": ["a", "b"]}
    assert read(b"stop=a&stop=b", FORM, True).data == {"stop": ["a", "b"]}


def test_a_bad_json_field_in_a_form_is_refused_by_name():
    err = refused(read, b"chat_name=a&messages=%5Boops", FORM, True)
    assert "'messages'" in err.info.message


@pytest.mark.parametrize("content_type, encoding, codec", [
    (FORM, "utf-8", "utf-8"),
    (FORM, "gbk", "gb18030"),                    # percent-escapes in GBK, undeclared
    (FORM + "; charset=big5", "big5", "big5"),
])
def test_urlencoded_percent_escapes_are_bytes_in_the_forms_charset(content_type, encoding, codec):
    raw = f"chat_name=a&content={quote(CHINESE.encode(encoding))}".encode()
    body = read(raw, content_type, True)
    assert body.data == {"chat_name": "a", "content": CHINESE}
    assert body.charset == codec


def test_a_form_on_a_route_without_forms_is_read_as_json():
    refused(read, b"chat_name=a&content=hi", FORM, False)


# -- JSON sent as a form: curl -d '{...}', PHP's curl, Java's HttpURLConnection -----------------
@pytest.mark.parametrize("raw", [
    b'{"chat_name":"a","content":"a=b&c=d 1+1 %41"}',            # = & + % inside strings stay as written
    b' \r\n\t{"chat_name":"a","content":"a=b&c=d 1+1 %41"}',     # blanks before the object
    codecs.BOM_UTF8 + b'{"chat_name":"a","content":"a=b&c=d 1+1 %41"}',
    quote('{"chat_name":"a","content":"a=b&c=d 1+1 %41"}').encode(),  # curl --data-urlencode: one escaped field
    quote_plus('{"chat_name":"a","content":"a=b&c=d 1+1 %41"}').encode(),
])
def test_a_json_object_sent_as_a_form_is_read_as_json(raw):
    body = read(raw, FORM, forms=True)
    assert body.data == {"chat_name": "a", "content": "a=b&c=d 1+1 %41"}
    assert body.charset in ("utf-8", "utf-8-sig")


def test_a_json_object_sent_as_a_form_keeps_its_charset():
    raw = json.dumps({"chat_name": "a", "content": CHINESE}, ensure_ascii=False).encode("gbk")
    assert read(raw, FORM + "; charset=gbk", True).data == {"chat_name": "a", "content": CHINESE}
    assert read(raw, FORM, True).data == {"chat_name": "a", "content": CHINESE}  # undeclared: GB18030


def test_broken_json_sent_as_a_form_is_answered_as_broken_json():
    err = refused(read, b'{"chat_name":"a","content":"hi"', FORM, True)
    assert "not valid JSON" in err.info.message


@pytest.mark.parametrize("raw, data", [
    (b"chat_name=a&content=%7B%22x%22%3A1%7D", {"chat_name": "a", "content": '{"x":1}'}),  # a field that holds JSON
    (f"messages={quote(json.dumps(MESSAGES))}&chat_name=a".encode(), {"messages": MESSAGES, "chat_name": "a"}),
    (b"content=%7B", {"content": "{"}),
    (b"chat_name", {}),                                           # a lone name without "=": a blank field
])
def test_a_real_form_is_still_read_as_a_form(raw, data):
    assert read(raw, FORM, True).data == data


def test_json_sent_as_a_form_to_a_route_without_forms_is_json_as_before():
    assert read(b'{"chat_name":"a"}', FORM, False).data == {"chat_name": "a"}


def test_a_utf16_form_is_refused_not_a_500():
    raw = "a=1&b=2".encode("utf-16")
    err = refused(read, raw, FORM + "; charset=utf-16", True)
    assert "utf-16" in err.info.message.lower()


def multipart(parts: list[tuple[str, bytes, str]], boundary: str = "XyZ123") -> tuple[bytes, str]:
    """(body, Content-Type) of a multipart/form-data body; each part: (name, payload, its own Content-Type or '')."""
    out = b""
    for name, payload, ctype in parts:
        out += f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n".encode()
        if ctype:
            out += f"Content-Type: {ctype}\r\n".encode()
        out += b"\r\n" + payload + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_multipart_with_json_fields_and_name_lists():
    raw, ctype = multipart([("chat_name", b"a", ""), ("messages", json.dumps(MESSAGES).encode(), ""),
                            ("fallbacks", b"b", ""), ("fallbacks", b"c", ""), ("temperature", b"", "")])
    body = read(raw, ctype, True)
    assert body.data == {"chat_name": "a", "messages": MESSAGES, "fallbacks": ["b", "c"]}
    assert body.charset == "utf-8"


def test_multipart_parts_in_their_own_charset():
    raw, ctype = multipart([("chat_name", b"a", ""),
                            ("content", CHINESE.encode("gbk"), "text/plain; charset=gbk")])
    body = read(raw, ctype, True)
    assert body.data == {"chat_name": "a", "content": CHINESE}
    assert body.charset == "gb18030"


def test_multipart_undeclared_gbk_part_falls_back_to_gb18030():
    raw, ctype = multipart([("content", CHINESE.encode("gbk"), "")])
    assert read(raw, ctype, True).data == {"content": CHINESE}


def test_multipart_file_part_is_read_like_a_field():  # curl -F messages=@messages.json
    raw = (b'--b1\r\nContent-Disposition: form-data; name="messages"; filename="m.json"\r\n'
           b"Content-Type: application/json\r\n\r\n" + json.dumps(MESSAGES).encode() + b"\r\n--b1--\r\n")
    assert read(raw, "multipart/form-data; boundary=b1", True).data == {"messages": MESSAGES}


def test_multipart_without_its_boundary_is_refused():
    raw, _ = multipart([("chat_name", b"a", "")])
    err = refused(read, raw, "multipart/form-data", True)
    assert "boundary" in err.info.message


# -- the request around the body, answers -------------------------------------------------
def test_a_chunked_body_over_the_size_limit_is_a_413_not_a_truncated_body():
    app = flask.Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 10
    chunked = {"headers": {"Transfer-Encoding": "chunked"}, "environ_overrides": {"wsgi.input_terminated": True}}
    with app.test_request_context("/", method="POST", input_stream=io.BytesIO(b"x" * 50), **chunked):
        with pytest.raises(GatewayError) as info:
            bodies.request_bytes()
        assert info.value.type == "payload_too_large" and info.value.status == 413
    with app.test_request_context("/", method="POST", input_stream=io.BytesIO(b"x" * 5), **chunked):
        assert bodies.request_bytes() == b"x" * 5


@pytest.mark.parametrize("accept_charset, content_type, expected", [
    ("gbk", "text/plain; charset=gbk", "你好".encode("gbk")),
    ("big5, utf-8;q=0.5", "text/plain; charset=big5", "你好".encode("big5")),
    ("base64, rot13, utf-8", "text/plain; charset=utf-8", "你好".encode()),  # not text encodings: skipped
    (None, "text/plain; charset=utf-8", "你好".encode()),
])
def test_legacy_text_answer_in_the_asked_charset(accept_charset, content_type, expected):
    headers = {"Accept": "text/plain", **({"Accept-Charset": accept_charset} if accept_charset else {})}
    with flask.Flask(__name__).test_request_context("/", headers=headers):
        answer = bodies.legacy_text("你好")
    assert answer.content_type == content_type
    assert answer.get_data() == expected


@pytest.mark.parametrize("accept", [None, "*/*"])
def test_legacy_text_only_for_callers_that_prefer_text(accept):
    with flask.Flask(__name__).test_request_context("/", headers={"Accept": accept} if accept else {}):
        assert bodies.legacy_text("x") is None


def test_escape_non_ascii_keeps_the_same_json_in_ascii():
    app = flask.Flask(__name__)
    with app.app_context():
        answer = bodies.escape_non_ascii(flask.jsonify(output="你好 😀 é"))
    text = answer.get_data()
    assert text.isascii()
    assert json.loads(text) == {"output": "你好 😀 é"}
    assert b"\\ud83d\\ude00" in text  # outside the BMP: a surrogate pair, as JSON writes it
