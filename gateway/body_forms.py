"""Form bodies as old clients send them: ``application/x-www-form-urlencoded`` and ``multipart/form-data``.

On chat routes (``gateway.bodies.read``), a JSON object sent as ``application/x-www-form-urlencoded``
(``curl -d``, PHP's curl, Java's HttpURLConnection) is read as JSON (``json_in_form`` says how it is
told from a form); real ``application/x-www-form-urlencoded`` and ``multipart/form-data`` bodies
with the JSON body's fields: scalars are text that the pydantic models convert as usual; list and
object fields (``messages``, ``fallbacks``, ``chat_names``, ``tools`` ...) are JSON text in a field.
Each field is read in the form's charset (``gateway.body_text.decode``).

Forms are held to a number of fields (``MAX_FORM_FIELDS``) and multipart ones to the size of their
parts' headers (``MAX_PART_HEADER_BYTES``), both 413, checked before the fields are parsed: every
step here is linear in the body (see ``gateway.bodies``).
"""
from __future__ import annotations

import binascii
import codecs
import itertools
import re
from typing import Optional
from urllib.parse import parse_qsl, unquote_to_bytes

from werkzeug.http import parse_options_header

from contract.errors import GatewayError
from .body_text import MAX_DEPTH, UTF8, Body, decode, parse_json

#: fields of a urlencoded form, parts of a multipart one (413 past it). A chat form has about 20 fields
#: (a few repeated ``fallbacks``/``chat_names``: one per endpoint); many more is no chat call but a
#: body that only costs CPU. The same number as werkzeug's ``max_form_parts`` and Django's
#: ``DATA_UPLOAD_MAX_NUMBER_FIELDS``. A caller with more to send sends JSON, which has no such cap.
MAX_FORM_FIELDS = 1000
#: the headers of a multipart body's parts, all together (413 past it): a part's headers are about
#: 50-150 bytes (``Content-Disposition: form-data; name="..."; filename="..."`` and a Content-Type),
#: so this is room for ``MAX_FORM_FIELDS`` parts of 130 bytes, or a chat form's 20 parts of 6 KiB.
#: Checked before they are parsed: parsing header parameters costs about 0.2 us a byte in Python,
#: a whole 1 MiB body of them 0.2 s; 128 KiB of them 25 ms.
MAX_PART_HEADER_BYTES = 128 * 1024

FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data"})

#: list and object fields of the chat bodies: in a form, their value is JSON text
JSON_FIELDS = frozenset({"messages", "fallbacks", "chat_names", "stop", "tools", "tool_choice",
                         "response_format", "stream_options"})
#: lists of names: in a form, plain values (repeated or single) are the list's items
NAME_LISTS = frozenset({"fallbacks", "chat_names"})
#: form fields that may be plain text even when they start like JSON
_TEXT_TOO = frozenset({"stop", "tool_choice"})


def _too_many_fields() -> GatewayError:
    return GatewayError("payload_too_large", f"the form has more than {MAX_FORM_FIELDS} fields, more than the gateway "
                                             f"reads from a form; send the body as JSON (Content-Type: "
                                             f"application/json), which has no such limit")


def urlencoded(raw: bytes, charset: Optional[str]) -> Body:
    """A urlencoded form's fields (``_urlencoded``)."""
    return _form(_urlencoded, raw, charset)


def multipart(raw: bytes, boundary: Optional[str], charset: Optional[str]) -> Body:
    """A multipart form's fields (``_multipart``)."""
    return _form(_multipart, raw, boundary, charset)


def _form(parse, *args) -> Body:
    """A form read by ``parse``; a recursion in a parser (email's header parser had one per ``(``) is a 400."""
    try:
        return parse(*args)
    except RecursionError:
        raise GatewayError("invalid_request", f"the body nests too deeply (at most {MAX_DEPTH} levels)") from None


#: the start of a JSON object, percent-escaped or not: a byte order mark, blanks, "{"
_ESCAPED_OBJECT = re.compile(rb"(?:\xef\xbb\xbf|%ef%bb%bf)?(?:[+ \t\r\n]|%(?:20|09|0a|0d))*(?:\{|%7b)", re.IGNORECASE)


def json_in_form(raw: bytes) -> Optional[bytes]:
    """The JSON object a form-typed body really is, else ``None`` (a real form).

    ``curl -d '{...}'``, PHP's curl and Java's HttpURLConnection send JSON with
    ``Content-Type: application/x-www-form-urlencoded``. Told apart by the first character: a JSON
    object starts with ``{`` (after blanks or a UTF-8 byte order mark), and a form starts with a
    field's name, which no form names ``{...``. ``curl --data-urlencode '{...}'`` sends the JSON
    percent-escaped as one field without ``=`` or ``&``: read once unescaped. Either way the body
    is then JSON, and a broken one is answered as broken JSON, not as a form missing its fields.
    """
    if raw.removeprefix(codecs.BOM_UTF8).lstrip(b" \t\r\n").startswith(b"{"):
        return raw
    if b"=" not in raw and b"&" not in raw and _ESCAPED_OBJECT.match(raw):  # (unescaped only if it starts like JSON)
        unescaped = unquote_to_bytes(raw.replace(b"+", b" "))
        if unescaped.removeprefix(codecs.BOM_UTF8).lstrip(b" \t\r\n").startswith(b"{"):
            return unescaped
    return None


def _urlencoded(raw: bytes, charset: Optional[str]) -> Body:
    """``a=1&b=%C4%E3``: percent-escapes are bytes in the form's charset (UTF-8, else GB18030), like raw bytes.

    At most ``MAX_FORM_FIELDS`` fields, counted (``&``) before any is parsed.
    """
    try:
        fields = parse_qsl(raw.decode("latin-1"), keep_blank_values=True, encoding="latin-1",
                           max_num_fields=MAX_FORM_FIELDS)
    except ValueError:  # "Max number of fields exceeded"
        raise _too_many_fields() from None
    pairs = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in fields]
    # one codec for the whole form: "&" joins fields without making or breaking a multibyte character
    _, codec = decode(b"&".join(k + b"=" + v for k, v in pairs), charset)
    try:
        return Body(_fields([(k.decode(codec), v.decode(codec)) for k, v in pairs]), codec)
    except (UnicodeError, ValueError):  # (a codec such as UTF-16 cannot read fields one by one)
        raise GatewayError("invalid_request", f"a form's fields cannot be read one by one as {codec}: send the "
                                              f"form in UTF-8 or GB18030, or the body as JSON") from None


#: a line break as old clients write it: CRLF, or a bare LF or CR
_LINE_BREAK = re.compile(rb"\r\n|\n|\r")
#: the end of a part's headers
_BLANK_LINE = re.compile(rb"\r\n\r\n|\n\n|\r\r")
#: a header line folded onto the next
_FOLDED = re.compile(rb"(?:\r\n|\n|\r)[ \t]+")


def _multipart(raw: bytes, boundary: Optional[str], charset: Optional[str]) -> Body:
    """Each part read with its own charset, else the request's, else UTF-8 then GB18030; file parts too (``curl -F x=@file``).

    A small parser, linear in the body: the delimiter lines are found by one regular expression,
    at most ``MAX_FORM_FIELDS`` parts are taken, their headers (at most ``MAX_PART_HEADER_BYTES``
    together) are split into lines, and only Content-Disposition and Content-Type are parsed, by
    werkzeug's ``parse_options_header`` (a loop, linear, no recursion; comments are no parameters).
    email's parser, used before, was superlinear in a header's parameters and recursed once per
    nested ``(``; werkzeug's own multipart decoder parses each part's headers as it meets them,
    with no way to bound all parts' headers together before they are parsed.
    Bare LF line breaks, a preamble and an epilogue, folded headers and a missing closing
    delimiter are read as email's parser read them; so is Content-Transfer-Encoding (base64,
    quoted-printable), which old MIME libraries still send.
    """
    if not boundary:
        raise GatewayError("invalid_request", "the multipart/form-data body could not be read: "
                                              "send it with the boundary its Content-Type names")
    delimiter = re.compile(rb"(?:\A|\r\n|\n|\r)--" + re.escape(boundary.encode("latin-1", "replace")) +
                           rb"(--)?[ \t]*(?:\r\n|\n|\r|\Z)")
    found = delimiter.finditer(raw)
    first = next(found, None)
    if first is None:
        raise GatewayError("invalid_request", "the multipart/form-data body could not be read: "
                                              "send it with the boundary its Content-Type names")
    pairs, codecs_used, header_bytes = [], set(), 0
    start, closed = first.end(), bool(first.group(1))
    for count, match in enumerate(itertools.chain(found, [None])):
        if closed:  # the closing delimiter: what follows is the epilogue
            break
        if count == MAX_FORM_FIELDS:
            raise _too_many_fields()
        # no closing delimiter: the part runs to the end, less the line break that would have come before it
        end = match.start() if match else max(start, len(raw) - _final_line_break(raw))
        closed = match is None or bool(match.group(1))
        headers, payload, header_bytes = _part(raw, start, end, header_bytes)
        if match:
            start = match.end()
        name = parse_options_header(headers.get("content-disposition"))[1].get("name")
        if name is None:
            continue
        part_charset = parse_options_header(headers.get("content-type"))[1].get("charset")
        text, codec = decode(_transfer_decoded(payload, headers.get("content-transfer-encoding"), name),
                             part_charset or charset)
        codecs_used.add(codec)
        pairs.append((name, text))
    utf8 = codecs_used <= UTF8
    return Body(_fields(pairs), "utf-8" if utf8 else next(iter(codecs_used - UTF8)))


def _final_line_break(raw: bytes) -> int:
    """The length of the line break ``raw`` ends with (0: none)."""
    return next((len(end) for end in (b"\r\n", b"\n", b"\r") if raw.endswith(end)), 0)


def _part(raw: bytes, start: int, end: int, header_bytes: int) -> tuple[dict[str, str], bytes, int]:
    """A part's headers (lower-case names, the first of each), its payload, and the headers' bytes so far."""
    if no_headers := _LINE_BREAK.match(raw, start, end):
        return {}, raw[no_headers.end():end], header_bytes
    room = MAX_PART_HEADER_BYTES - header_bytes
    blank = _BLANK_LINE.search(raw, start, min(end, start + room + 4))  # (never looks further than the cap)
    head_end = blank.start() if blank else end  # no blank line: a part of headers only
    header_bytes += head_end - start
    if header_bytes > MAX_PART_HEADER_BYTES:
        raise GatewayError("payload_too_large", f"the multipart/form-data parts' headers are larger than "
                                                f"{MAX_PART_HEADER_BYTES} bytes together, more than the gateway "
                                                f"reads; send the body as JSON (Content-Type: application/json)")
    headers: dict[str, str] = {}
    for line in _FOLDED.sub(b" ", raw[start:head_end]).splitlines():
        name, colon, value = line.partition(b":")
        if colon:
            headers.setdefault(name.strip(b" \t").decode("latin-1").lower(),
                               value.strip(b" \t").decode("utf-8", "replace"))
    return headers, raw[blank.end():end] if blank else b"", header_bytes


def _transfer_decoded(payload: bytes, encoding: Optional[str], name: str) -> bytes:
    """A part's payload without its Content-Transfer-Encoding (7bit, 8bit and binary are none)."""
    encoding = (encoding or "").strip().lower()
    try:
        if encoding == "base64":
            return binascii.a2b_base64(payload)
        if encoding == "quoted-printable":
            return binascii.a2b_qp(payload)
    except (binascii.Error, ValueError):
        raise GatewayError("invalid_request", f"the form field {name[:40]!r} is not valid {encoding}; "
                                              f"send it as it is, without a Content-Transfer-Encoding") from None
    return payload


def _fields(pairs: list[tuple[str, str]]) -> dict:
    """Form fields as the JSON body's: empty ones left out, JSON text parsed, repeated names and name lists as lists."""
    data: dict = {}
    repeated: dict[str, list] = {}  # the fields given more than once: their lists, in ``data`` too
    for key, value in pairs:
        if value == "":
            continue  # old forms send every field, the ones left blank too
        if key in JSON_FIELDS and value.lstrip()[:1] in ("[", "{"):
            try:
                parsed = parse_json(value, f"the form field {key!r}")
            except GatewayError:
                if key not in _TEXT_TOO:
                    raise
                parsed = value  # ``stop=[END]``: a plain string that starts like JSON
            if key in NAME_LISTS and isinstance(parsed, list):
                data.setdefault(key, []).extend(parsed)
                continue
            value = parsed
        if key in NAME_LISTS:
            data.setdefault(key, []).append(value)
        elif key in repeated:
            repeated[key].append(value)  # in place: a list copied on each repeat made 1 MiB of a=1&a=1... 48 s
        elif key in data:  # the second time: a list (a JSON list given first is extended, as before)
            first = data[key]
            data[key] = repeated[key] = (list(first) if isinstance(first, list) else [first]) + [value]
        else:
            data[key] = value
    return data
