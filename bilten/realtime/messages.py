"""The WebSocket protocol: what clients send (a tagged union) and what the hub answers.

Every message is a JSON object with a ``type``. Messages to sockets are kept as ready ASGI
``websocket.send`` events, so one encoded message is shared by every socket it goes to.
"""

from __future__ import annotations

import uuid
from typing import Annotated

import msgspec

ROOM_PREFIX = "event:"


class _In(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, tag_field="type"):
    pass


class Subscribe(_In, kw_only=True, tag="subscribe"):
    room: Annotated[str, msgspec.Meta(max_length=100)]
    # The last seat-map version the client holds: it then gets only what it missed.
    version: Annotated[int, msgspec.Meta(ge=0)] | None = None
    # Seat changes with seats named by their index in the seat map (bilten.realtime.indexed).
    indexed: bool = False


class Unsubscribe(_In, kw_only=True, tag="unsubscribe"):
    room: Annotated[str, msgspec.Meta(max_length=100)]


class Ping(_In, kw_only=True, tag="ping"):
    pass


class Auth(_In, kw_only=True, tag="auth"):
    token: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]


ClientMessage = Subscribe | Unsubscribe | Ping | Auth
_decoder = msgspec.json.Decoder(ClientMessage)


def decode(raw: str | bytes) -> ClientMessage:
    """A client message; raises :class:`msgspec.DecodeError` (or its ValidationError)."""
    message: ClientMessage = _decoder.decode(raw)
    return message


def room_event(room: str) -> str | None:
    """The event id of a room name ``event:<uuid>``, normalised; None when it is not one."""
    if not room.startswith(ROOM_PREFIX):
        return None
    try:
        return str(uuid.UUID(room[len(ROOM_PREFIX) :]))
    except ValueError:
        return None


class _Out(msgspec.Struct, kw_only=True, tag_field="type"):
    pass


class Hello(_Out, kw_only=True, tag="hello"):
    instance: str
    user_id: str | None
    idle_timeout: float
    max_subscriptions: int
    max_message: int


class Authenticated(_Out, kw_only=True, tag="authenticated"):
    user_id: str


class Subscribed(_Out, kw_only=True, tag="subscribed"):
    room: str
    version: int


class Unsubscribed(_Out, kw_only=True, tag="unsubscribed"):
    room: str


class Error(_Out, kw_only=True, tag="error", omit_defaults=True):
    code: str
    message: str
    room: str | None = None


class QueueServed(_Out, kw_only=True, tag="queue.served"):
    event_id: str
    served: int


ServerMessage = Hello | Authenticated | Subscribed | Unsubscribed | Error | QueueServed

_encoder = msgspec.json.Encoder()


class Frame:
    """One message for sockets, made once: as the ASGI event, and as the bytes of a WebSocket
    text frame (server frames are not masked, and the hub turns compression off, so these
    bytes are the same for every socket)."""

    __slots__ = ("event", "indexed", "wire")

    def __init__(self, text: str, payload: bytes | None = None) -> None:
        if payload is None:
            payload = text.encode()
        self.event = {"type": "websocket.send", "text": text}
        size = len(payload)
        if size < 126:
            head = bytes((0x81, size))
        elif size < 65536:
            head = bytes((0x81, 126)) + size.to_bytes(2, "big")
        else:
            head = bytes((0x81, 127)) + size.to_bytes(8, "big")
        self.wire = head + payload
        # A seat delta's form for sockets that name seats by index, once it was needed
        # (bilten.realtime.rooms).
        self.indexed: Frame | None = None

    def payload(self) -> bytes:
        """The message's bytes (the frame without its head)."""
        size = self.wire[1]
        return self.wire[2 if size < 126 else 4 if size == 126 else 10 :]


def frame(text: str) -> Frame:
    return Frame(text)


def frame_of(payload: bytes) -> Frame:
    """From a pub/sub message: UTF-8 JSON already."""
    return Frame(payload.decode(), payload)


def encode(message: ServerMessage) -> Frame:
    return frame_of(_encoder.encode(message))


def error(code: str, message: str, room: str | None = None) -> Frame:
    return encode(Error(code=code, message=message, room=room))


PONG = frame('{"type":"pong"}')
_SNAPSHOT_HEAD = b'{"type":"seats.snapshot",'


def snapshot(body: bytes) -> Frame:
    """A ``seats.snapshot`` from an encoded seat map ``{"event_id", "version", "seats"}``."""
    assert body[:1] == b"{"
    return frame_of(_SNAPSHOT_HEAD + body[1:])


class DeltaHead(msgspec.Struct):
    """What the hub reads of a message on an event's channel; the rest is passed on untouched:
    a seat-map delta (``seats``, with its version), or news of the queue's claims
    (:mod:`bilten.claimnews`: no version)."""

    type: str = "seats"
    version: int = -1


delta_head = msgspec.json.Decoder(DeltaHead)
