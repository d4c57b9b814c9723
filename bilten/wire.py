"""Bodies in and out: msgspec Structs decoded from JSON requests, encoded into responses."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec
from starlette.requests import ClientDisconnect, HTTPConnection, Request
from starlette.responses import Response

from bilten.errors import ApiError

T = TypeVar("T")

JSON_MAX_BYTES = 1024 * 1024
_encoder = msgspec.json.Encoder()
_UNKNOWN = re.compile(r"^Object contains unknown field `([^`]*)`")
_PATH = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)


class Struct(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base of request bodies: unknown fields are an error, not silently dropped.

    ``kw_only`` does not pass to subclasses: declare them ``class X(Struct, kw_only=True)``.
    """


_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


def _decoder(type_: Any) -> msgspec.json.Decoder[Any]:
    decoder = _decoders.get(type_)
    if decoder is None:
        decoder = _decoders[type_] = msgspec.json.Decoder(type_)
    return decoder


def _invalid(exc: msgspec.ValidationError) -> ApiError:
    match = _PATH.match(str(exc))
    assert match is not None
    field = (match["path"] or "").lstrip(".") or None
    unknown = _UNKNOWN.match(match["message"])
    if unknown:  # name the unexpected field itself, not the object holding it
        field = f"{field}.{unknown[1]}" if field else unknown[1]
    message = match["message"].replace("`", "")
    return ApiError(
        "validation_error",
        f"{field}: {message}" if field else message,
        {"fields": [{"field": field, "message": message}]},
    )


def decode(raw: bytes, type_: type[T]) -> T:
    """Decode JSON bytes into ``type_``, raising the API's 400/422 errors.

    Text holding NUL is refused here, at the door, whatever the field: PostgreSQL cannot store
    it, and a request that fails only when a worker writes it would fail late, far from its
    sender. (JSON carries NUL only escaped, so bodies without ``\\u0000`` are not searched.)
    """
    try:
        value: T = _decoder(type_).decode(raw)
    except msgspec.ValidationError as exc:
        raise _invalid(exc) from None
    except msgspec.DecodeError as exc:
        raise ApiError("bad_request", f"Malformed JSON body: {exc}") from None
    if b"\\u0000" in raw:
        field = _nul_in(msgspec.to_builtins(value), "")
        if field is not None:
            raise _nul_error(field)
    return value


def _nul_error(field: str) -> ApiError:
    return invalid_field(field, "text may not contain NUL characters")


def invalid_field(field: str, message: str) -> ApiError:
    """The 422 of one field (``""`` for the body as a whole)."""
    return ApiError(
        "validation_error",
        f"{field}: {message}" if field else message,
        {"fields": [{"field": field or None, "message": message}]},
    )


def check_times(value: msgspec.Struct) -> None:
    """422 for a time of ``value`` that exists only in its own offset: ``0001-01-01T00:00+14:00``
    is before the first moment a UTC time can name, and PostgreSQL keeps times in UTC."""
    for field in msgspec.structs.fields(value):
        when = getattr(value, field.name)
        if isinstance(when, datetime):
            try:
                when.astimezone(UTC)
            except OverflowError:
                raise invalid_field(field.encode_name, "out of range once in UTC") from None


def _nul_in(value: Any, path: str) -> str | None:
    """The path of the first string holding NUL (keys included), or None."""
    if isinstance(value, str):
        return path if "\0" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            inner = f"{path}.{key}" if path else str(key)
            if "\0" in str(key):
                return inner
            found = _nul_in(item, inner)
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = _nul_in(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def header(conn: HTTPConnection, name: bytes) -> str | None:
    """The first value of a request header (``name`` in lower case), or None. The headers are
    made a dict once per request: the hot routes read four or five, and Starlette's ``Headers``
    searches the whole list for each."""
    scope = conn.scope
    found = scope.get("bilten.headers")
    if found is None:
        found = scope["bilten.headers"] = {k.lower(): v for k, v in reversed(scope["headers"])}
    value = found.get(name)
    return None if value is None else value.decode("latin-1")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit``. Read
    from the ASGI messages themselves (Starlette's stream is an async generator around them),
    and kept where Starlette's ``Request.body()`` finds it."""
    declared = header(request, b"content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise ApiError("bad_request", "Content-Length must be a number.")
        digits = declared.lstrip("0")  # compared as text first: int() of 5,000 digits fails
        if len(digits) > len(str(limit)) or int(digits or "0") > limit:
            raise ApiError("payload_too_large", f"The body exceeds {limit} bytes.")
    chunks = []
    size = 0
    receive = request.receive
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ApiError("payload_too_large", f"The body exceeds {limit} bytes.")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = request._body = b"".join(chunks)
    return body


async def read_json(request: Request, type_: type[T], limit: int = JSON_MAX_BYTES) -> T:
    content_type = header(request, b"content-type") or ""
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise ApiError("bad_request", "Content-Type must be application/json.")
    return decode(await read_body(request, limit), type_)


def read_query(request: Request, type_: type[T]) -> T:
    """The query string as ``type_`` (strings converted to numbers and times); 422 naming the
    parameter otherwise."""
    params = dict(request.query_params)
    field = _nul_in(params, "")
    if field is not None:
        raise _nul_error(field)
    try:
        return msgspec.convert(params, type_, strict=False)
    except msgspec.ValidationError as exc:
        raise _invalid(exc) from None


def encode(data: Any) -> bytes:
    return _encoder.encode(data)


RawHeaders = list[tuple[bytes, bytes]]


def body_headers(body: bytes, media_type: bytes = b"application/json") -> RawHeaders:
    return [(b"content-length", str(len(body)).encode()), (b"content-type", media_type)]


class Ready(Response):
    """A body encoded once and answered many times, with its headers made once as well: a
    cached read spends nothing on either. Each answer has its own copy of the headers, as a
    layer on the way out may add to them."""

    def __init__(self, body: bytes, headers: RawHeaders, status_code: int = 200) -> None:
        self.status_code = status_code
        self.background = None
        self.body = body
        self.raw_headers = list(headers)


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _encoder.encode(content)
