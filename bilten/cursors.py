"""Opaque keyset-pagination cursors: the (time, id) of the last item of a page."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime
from typing import Annotated

import msgspec

from bilten.errors import ApiError

_encoder = msgspec.json.Encoder()
# Typed strictly: a forged cursor must be a 422, never a malformed query parameter.
_decoder = msgspec.json.Decoder(tuple[Annotated[datetime, msgspec.Meta(tz=True)], uuid.UUID])


def encode(when: datetime, item_id: str) -> str:
    return base64.urlsafe_b64encode(_encoder.encode((when, item_id))).decode().rstrip("=")


def decode(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        when, item_id = _decoder.decode(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return when.astimezone(UTC), item_id  # no UTC time (offsets at the ends): 422
    except (ValueError, OverflowError, msgspec.DecodeError):
        raise ApiError(
            "validation_error",
            "cursor: not a cursor this API issued",
            {"fields": [{"field": "cursor", "message": "not a cursor this API issued"}]},
        ) from None
