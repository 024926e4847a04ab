"""Request bodies as old applications really send them, read in one place.

The gateway's users call it from old programs that can only make plain HTTP calls. What
they send, and what this module reads:

- JSON in the charset their platform uses, named in the Content-Type
  (``application/json; charset=gbk``: GBK, GB18030, Big5, Shift-JIS, UTF-16 ...). With no
  charset the body is UTF-8, and when it is not, GB18030 (a superset of GBK and GB2312, what
  old Windows programs in China send) is tried before giving up.
- On chat routes, a JSON object sent as ``application/x-www-form-urlencoded`` (``curl -d``,
  PHP's curl, Java's HttpURLConnection) is read as JSON (``json_in_form`` says how it is told
  from a form); real ``application/x-www-form-urlencoded`` and ``multipart/form-data`` bodies
  with the JSON body's fields: scalars are text that the pydantic models convert as usual;
  list and object fields (``messages``, ``fallbacks``, ``chat_names``, ``tools`` ...) are
  JSON text in a field. The admin routes keep to JSON (``gateway.doors``).
- Every body is held to the same limits: the size (``MAX_CONTENT_LENGTH``, 413) and a
  nesting depth (400): a body nested a thousand levels deep parses, but then breaks whatever
  walks it recursively (pickling it for Ray did, a 500). Forms are also held to a number of
  fields (``MAX_FORM_FIELDS``) and multipart ones to the size of their parts' headers
  (``MAX_PART_HEADER_BYTES``), both 413, checked before the fields are parsed: every step here
  is linear in the body, so that any body within the size limit is read in well under 100 ms of
  CPU (``python -m bench.bodies`` measures the hostile ones). A repeated field used to copy its
  list on each repeat and email's header parser recursed once per ``(``: a 1 MiB form of
  ``a=1&a=1...`` took 48.7 s, a part header of 20 000 ``(`` was a RecursionError (a 500).

Answers: a caller whose body was not UTF-8 gets JSON with every non-ASCII character escaped
(``\\uXXXX``), readable by any decoder (``escape_non_ascii``); a legacy caller that asks for
``Accept: text/plain`` gets its answer as bare text in the charset it asks for
(``legacy_text``).

Here: the request's bytes, which reader a body goes to, and the answers. Charsets, JSON and the
nesting limit are ``gateway.body_text``; forms (their fields, their caps, multipart's parser) are
``gateway.body_forms``.
"""
from __future__ import annotations

import codecs
import re
from typing import Optional

from flask import Response, request
from werkzeug.http import parse_options_header

from contract.errors import GatewayError
from . import body_forms
from .body_text import Body, check_depth, decode, parse_json

_TOKEN = re.compile(r"^[A-Za-z0-9._:\-]{1,40}$")


def request_bytes() -> bytes:
    """The request's body; a chunked one (no Content-Length) that reaches the size limit is a 413.

    Werkzeug stops reading such a body at ``MAX_CONTENT_LENGTH`` without a word: what it
    returns is a truncated body, which would be answered as "not valid JSON".
    """
    raw = request.get_data(cache=True)
    limit = request.max_content_length
    if request.content_length is None and limit is not None and len(raw) >= limit:
        raise GatewayError("payload_too_large", f"the body is larger than {limit} bytes")
    return raw


def read(raw: bytes, content_type: Optional[str], forms: bool) -> Body:
    """The body's fields; ``forms``: whether form bodies are taken (chat routes) or read as JSON."""
    mimetype, params = parse_options_header(content_type or "")
    mimetype = mimetype.lower()
    charset = params.get("charset") or None
    if forms and mimetype == "application/x-www-form-urlencoded":
        sent_json = body_forms.json_in_form(raw)
        if sent_json is not None:
            return read(sent_json, f"application/json; charset={charset}" if charset else "application/json", False)
        body = body_forms.urlencoded(raw, charset)
    elif forms and mimetype == "multipart/form-data":
        body = body_forms.multipart(raw, params.get("boundary"), charset)
    else:
        if not raw.strip():
            raise GatewayError("invalid_request", "the body must be a JSON object")
        text, codec = decode(raw, charset)
        data = parse_json(text, "the body")
        if not isinstance(data, dict):
            raise GatewayError("invalid_request", "the body must be a JSON object")
        body = Body(data, codec)
    check_depth(body.data)
    return body


# -- answers ----------------------------------------------------------------------------
_NON_ASCII = re.compile(r"[^\x00-\x7f]")


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000  # outside the BMP: a surrogate pair, as JSON writes it
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def escape_non_ascii(response: Response) -> Response:
    """A JSON answer with ``\\uXXXX`` for each non-ASCII character (the same JSON, in ASCII only).

    Non-ASCII characters are only ever inside JSON strings, so each can be escaped in place.
    Streams (``text/event-stream``) and bare text answers are left as they are.
    """
    if response.is_json and not response.is_streamed:
        text = response.get_data(as_text=True)
        if not text.isascii():
            response.set_data(_NON_ASCII.sub(_escape, text))
    return response


def legacy_text(text: str) -> Optional[Response]:
    """The legacy chat answer as bare text when the caller prefers ``text/plain`` (else ``None``: a JSON string).

    The charset is the first of ``Accept-Charset`` that Python knows (UTF-8 by default); a
    character it cannot encode becomes ``?``.
    """
    accept = request.accept_mimetypes
    if not accept or accept.best_match(["application/json", "text/plain"]) != "text/plain":
        return None
    for asked, quality in request.accept_charsets:  # best first
        if quality <= 0 or asked == "*" or not _TOKEN.match(asked):
            continue
        try:
            body = text.encode(codecs.lookup(asked).name, "replace")  # a text encoding, not base64 or rot13
        except (LookupError, UnicodeError, ValueError, TypeError):
            continue
        return Response(body, content_type=f"text/plain; charset={asked.lower()}")
    return Response(text.encode("utf-8"), content_type="text/plain; charset=utf-8")
