"""Uploaded images: validated and re-encoded with Pillow, stored under their content hash.

Storage sits behind a two-method interface; the local implementation writes files into a
folder. Names are content hashes, so a stored object never changes and can be cached forever.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Protocol

from PIL import Image, ImageOps, UnidentifiedImageError

from bilten.errors import ApiError

MAX_UPLOAD_BYTES = 5 * 1024 * 1024
MAX_PIXELS = 40_000_000  # larger images are refused as decompression bombs
FORMATS = {
    "JPEG": ("jpg", "image/jpeg"),
    "PNG": ("png", "image/png"),
    "WEBP": ("webp", "image/webp"),
}
CONTENT_TYPES = {ext: content_type for ext, content_type in FORMATS.values()}
NAME = re.compile(r"^[0-9a-f]{64}\.(jpg|png|webp)$")


class Storage(Protocol):
    async def put(self, name: str, data: bytes) -> None: ...

    async def get(self, name: str) -> bytes | None: ...


class LocalStorage:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _write(self, name: str, data: bytes) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / name
        if target.exists():
            return  # same name, same content
        fd, temporary = tempfile.mkstemp(dir=self.folder, prefix=".upload-")
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(temporary, target)

    async def put(self, name: str, data: bytes) -> None:
        await asyncio.to_thread(self._write, name, data)

    async def get(self, name: str) -> bytes | None:
        if not NAME.match(name):
            return None
        path = self.folder / name
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            return None


def reencode(data: bytes) -> tuple[str, bytes]:
    """Decode an uploaded image and encode it afresh (dropping metadata and any payload hidden
    after the image); returns the stored name and bytes. CPU work: call it in a thread."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=list(FORMATS))
            if image.width * image.height > MAX_PIXELS:
                raise Image.DecompressionBombError("too many pixels")
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ApiError(
                "validation_error",
                f"The image has more than {MAX_PIXELS} pixels.",
                {"fields": [{"field": "file", "message": "image too large"}]},
            ) from None
        except UnidentifiedImageError:
            raise ApiError(
                "unsupported_media_type", "The file must be a JPEG, PNG or WebP image."
            ) from None
        except (OSError, ValueError, SyntaxError):
            raise ApiError(
                "validation_error",
                "The image is damaged or truncated.",
                {"fields": [{"field": "file", "message": "unreadable image"}]},
            ) from None
    # A camera's multi-picture JPEG opens as MPO: its first picture is kept, as a JPEG.
    kind = "JPEG" if image.format == "MPO" else image.format or "PNG"
    ext, _ = FORMATS[kind]
    try:
        # Turned as the camera said (the EXIF orientation, dropped with the rest of the
        # metadata), so a phone's photo is stored upright.
        decoded: Image.Image = ImageOps.exif_transpose(image)
        if kind == "JPEG" and decoded.mode not in ("RGB", "L"):
            decoded = decoded.convert("RGB")
        out = io.BytesIO()
        decoded.save(out, format=kind, **({"quality": 88} if kind in ("JPEG", "WEBP") else {}))
    except (OSError, ValueError) as exc:
        # Read, but not written again in its own format (a WebP wider than WebP allows, say).
        raise ApiError(
            "validation_error",
            f"The image cannot be stored: {exc}.",
            {"fields": [{"field": "file", "message": "image not storable"}]},
        ) from None
    encoded = out.getvalue()
    return f"{hashlib.sha256(encoded).hexdigest()}.{ext}", encoded
