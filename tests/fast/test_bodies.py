"""gateway.bodies: request bodies as old applications send them (charsets, forms, limits), without a server."""
from __future__ import annotations

import codecs
import io
import json
from urllib.parse import quote, quote_plus

import flask
import pytest

from gateway import bodies, body_forms
from gateway.bodies import read
from gateway.body_text import MAX_DEPTH, codec_of, decode
from contract.errors import GatewayError

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


# -- hostile bodies within the size limit: caps answer 413/400, never a 500 (issue 26.1) --------------
# What each costs in CPU is measured by ``python -m bench.bodies``, not asserted here.
MIB = 1 << 20  # the default GATEWAY_MAX_BODY_BYTES: the reviewer's hostile bodies were all within it


def too_large(call, *args) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        call(*args)
    assert info.value.type == "payload_too_large" and info.value.status == 413
    return info.value


def test_repeated_form_fields_are_collected_in_order():
    data = read(b"stop=a&content=x&stop=b&stop=c&fallbacks=f&fallbacks=g&stop=d", FORM, True).data
    assert data == {"stop": ["a", "b", "c", "d"], "content": "x", "fallbacks": ["f", "g"]}


def test_a_form_of_as_many_fields_as_the_cap_is_read():
    cap = body_forms.MAX_FORM_FIELDS
    assert read(b"&".join([b"stop=x"] * cap), FORM, True).data == {"stop": ["x"] * cap}


@pytest.mark.parametrize("raw", [
    pytest.param(b"&".join([b"a=1"] * (body_forms.MAX_FORM_FIELDS + 1)), id="cap+1"),
    pytest.param((b"a=1&" * (MIB // 4))[:MIB], id="1MiB-of-a=1"),  # 262 144 fields: 48.7 s of CPU before
    pytest.param(b"&" * (MIB - 1), id="1MiB-of-&"),                 # empty fields count too
])
def test_a_form_with_more_fields_than_the_cap_is_a_413_that_says_send_json(raw):
    err = too_large(read, raw, FORM, True)
    assert f"more than {body_forms.MAX_FORM_FIELDS} fields" in err.info.message
    assert "application/json" in err.info.message


def test_the_field_cap_holds_for_a_form_in_any_charset():
    err = too_large(read, "&".join(["stop=你"] * (body_forms.MAX_FORM_FIELDS + 1)).encode("gbk"), FORM + "; charset=gbk", True)
    assert f"more than {body_forms.MAX_FORM_FIELDS} fields" in err.info.message


@pytest.mark.parametrize("escaped", [
    quote(' \r\n\t{"chat_name":"a"}'),                    # blanks before the object, escaped
    quote_plus(' {"chat_name":"a"}'),                      # ... or as "+"
    quote(codecs.BOM_UTF8 + b'{"chat_name":"a"}'),         # an escaped byte order mark
    codecs.BOM_UTF8.decode() + quote('{"chat_name":"a"}'),  # a raw one before the escapes
    "%7b%22chat_name%22%3a%22a%22%7d",                     # lower-case escapes
])
def test_escaped_json_sent_as_a_form_is_still_told_from_a_form(escaped):
    assert read(escaped.encode(), FORM, True).data == {"chat_name": "a"}


@pytest.mark.parametrize("raw, data", [
    (b"%41" * (MIB // 3), {}),                      # 1 MiB of escapes, one lone name: a blank field
    (b"%20" * 1000 + b"x", {}),
    (b"content=" + b"%E4%BD%A0" * 1000, {"content": "你" * 1000}),
])
def test_long_escaped_forms_that_are_not_json(raw, data):
    assert read(raw, FORM, True).data == data


def multipart_raw(*parts: bytes, boundary: bytes = b"b1", end: bytes = b"--b1--\r\n") -> tuple[bytes, str]:
    """A multipart body of raw parts (headers, blank line, payload), each after its delimiter line."""
    return (b"".join(b"--" + boundary + b"\r\n" + part + b"\r\n" for part in parts) + end,
            f"multipart/form-data; boundary={boundary.decode()}")


def test_a_multipart_body_with_20000_nested_parentheses_in_a_part_header_is_read_not_a_500():
    # email's header parser recursed once per "(" (a comment in a comment ...): RecursionError, a 500
    raw, ctype = multipart_raw(b'Content-Disposition: form-data; name="chat_name" ' + b"(" * 20000 + b"\r\n\r\na",
                               b"Content-Type: text/plain; charset=utf-8 " + b"(" * 20000 +
                               b'\r\nContent-Disposition: form-data; name="content"\r\n\r\nhi')
    assert read(raw, ctype, True).data == {"chat_name": "a", "content": "hi"}


def test_nested_parentheses_in_the_requests_own_content_type_are_read_not_a_500():
    raw, _ = multipart_raw(b'Content-Disposition: form-data; name="chat_name"\r\n\r\na')
    ctype = "multipart/form-data; boundary=b1 " + "(" * 8000  # a header line gunicorn lets through (8190 bytes)
    assert read(raw, ctype, True).data == {"chat_name": "a"}


def test_a_multipart_part_with_80000_header_parameters_is_a_413():
    params = b"".join(b"; a%d=1" % i for i in range(80000))  # 12 s of CPU before
    raw, ctype = multipart_raw(b'Content-Disposition: form-data; name="chat_name"' + params + b"\r\n\r\na")
    assert len(raw) < MIB
    err = too_large(read, raw, ctype, True)
    assert f"{body_forms.MAX_PART_HEADER_BYTES} bytes" in err.info.message
    assert "application/json" in err.info.message


def test_the_part_header_cap_counts_all_parts_together():
    header = b'Content-Disposition: form-data; name="stop"; filename="' + b"x" * 900 + b'"'  # a long file name
    parts = body_forms.MAX_PART_HEADER_BYTES // len(header)  # as many as fit, and one more
    raw, ctype = multipart_raw(*[header + b"\r\n\r\nx"] * parts)
    assert read(raw, ctype, True).data == {"stop": ["x"] * parts}
    raw, ctype = multipart_raw(*[header + b"\r\n\r\nx"] * (parts + 1))
    assert f"{body_forms.MAX_PART_HEADER_BYTES} bytes together" in too_large(read, raw, ctype, True).info.message


def test_a_multipart_part_whose_headers_never_end_is_a_413():
    raw, ctype = multipart_raw(b'Content-Disposition: form-data; name="a"' + b"; x=1" * (MIB // 6))
    too_large(read, raw, ctype, True)


def test_a_multipart_body_of_as_many_parts_as_the_cap_is_read():
    cap = body_forms.MAX_FORM_FIELDS
    raw, ctype = multipart_raw(*[b'Content-Disposition: form-data; name="fallbacks"\r\n\r\nb'] * cap)
    assert read(raw, ctype, True).data == {"fallbacks": ["b"] * cap}


@pytest.mark.parametrize("parts", [body_forms.MAX_FORM_FIELDS + 1, MIB // 60])  # 1 MiB of small parts: 17 000 of them
def test_a_multipart_body_with_more_parts_than_the_cap_is_a_413(parts):
    raw, ctype = multipart_raw(*[b'Content-Disposition: form-data; name="a"\r\n\r\n1'] * parts)
    assert len(raw) <= MIB
    err = too_large(read, raw, ctype, True)
    assert f"more than {body_forms.MAX_FORM_FIELDS} fields" in err.info.message


@pytest.mark.parametrize("raw, data", [
    # bare LF line breaks (old PHP and Perl clients), a preamble and an epilogue
    (b'preamble\n--b1\nContent-Disposition: form-data; name="chat_name"\n\na\n--b1\n'
     b'Content-Disposition: form-data; name="content"\n\nline 1\nline 2\n--b1--\nepilogue', 
     {"chat_name": "a", "content": "line 1\nline 2"}),
    # a folded header, blanks after a delimiter, a part without a name (skipped), a payload with CRLFs
    (b'--b1  \r\nContent-Disposition: form-data;\r\n\tname="content"\r\n\r\na\r\n\r\nb\r\n'
     b'--b1\r\nContent-Disposition: form-data\r\n\r\nnameless\r\n--b1--', {"content": "a\r\n\r\nb"}),
    # Content-Transfer-Encoding, as old MIME libraries send it
    (b'--b1\r\nContent-Disposition: form-data; name="content"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
     + codecs.encode("你好".encode(), "base64") + b'\r\n--b1\r\nContent-Disposition: form-data; name="stop"\r\n'
     b'Content-Transfer-Encoding: quoted-printable\r\n\r\na=3Db\r\n--b1--\r\n', {"content": "你好", "stop": "a=b"}),
    # the boundary inside a payload but not at a line's start, a name with an escaped quote, an empty form
    (b'--b1\r\nContent-Disposition: form-data; name="a\\"b"\r\n\r\nx--b1 y\r\n--b1--\r\n', {'a"b': "x--b1 y"}),
    (b"--b1--\r\n", {}),
    # no closing delimiter: read to the end (less a last line break), as before
    (b'--b1\r\nContent-Disposition: form-data; name="chat_name"\r\n\r\na', {"chat_name": "a"}),
    (b'--b1\r\nContent-Disposition: form-data; name="chat_name"\r\n\r\na\r\n', {"chat_name": "a"}),
    (b"--b1\r\n", {}),
])
def test_multipart_as_old_clients_write_it(raw, data):
    assert read(raw, "multipart/form-data; boundary=b1", True).data == data


def test_multipart_whose_boundary_is_not_in_the_body_is_refused():
    raw, _ = multipart_raw(b'Content-Disposition: form-data; name="a"\r\n\r\n1')
    err = refused(read, raw, "multipart/form-data; boundary=other", True)
    assert "boundary" in err.info.message


def test_a_recursion_error_while_reading_a_body_is_a_400_not_a_500(monkeypatch):
    def deep(*args):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(body_forms, "_multipart", deep)
    raw, ctype = multipart_raw(b'Content-Disposition: form-data; name="a"\r\n\r\n1')
    assert "nests too deeply" in refused(read, raw, ctype, True).info.message


def test_a_json_list_then_plain_repeats_make_one_list_as_before():
    raw = f"stop={quote(json.dumps(['a', 'b']))}&stop=c&stop=d".encode()
    assert read(raw, FORM, True).data == {"stop": ["a", "b", "c", "d"]}
