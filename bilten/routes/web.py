"""The web app: one page at ``/`` and its static files under ``/assets/<digest>/``.

The files in ``bilten/web`` are read once, at import, and served from memory. Their URLs carry a
digest of all of them, so a browser may keep them for a year (``immutable``): a new release has
a new digest and the page it loads names only new URLs. Modules import each other by relative
paths, which stay inside the same digest. A request for another digest (a page loaded from an
instance of another release during a rolling restart) gets the files this instance has,
uncached, rather than a 404.

The page and its files run under a strict ``Content-Security-Policy``: scripts and styles from
this origin only (no inline code), images from this origin, ``data:`` and ``blob:`` (QR codes are
fetched with the bearer token and shown as blobs), connections to this origin (``/ws`` too).
"""

from __future__ import annotations

import hashlib
import mimetypes
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bilten.errors import ApiError

ROOT = Path(__file__).resolve().parent.parent / "web"
_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
    ".json": "application/json",
}

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data: blob:; media-src 'self' blob:; connect-src 'self'; "
    "manifest-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


def _load(root: Path) -> tuple[dict[str, tuple[bytes, str]], str]:
    """Every served file by its path under ``root`` (not the page itself), and their digest."""
    files: dict[str, tuple[bytes, str]] = {}
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = path.relative_to(root).as_posix()
        if name == "index.html" or path.suffix not in _TYPES:
            continue
        body = path.read_bytes()
        files[name] = (body, _TYPES[path.suffix] or mimetypes.types_map[path.suffix])
        digest.update(name.encode() + b"\0" + body + b"\0")
    return files, digest.hexdigest()[:16]


FILES, DIGEST = _load(ROOT)
PREFIX = f"/assets/{DIGEST}"
PAGE = (ROOT / "index.html").read_text().replace("{{assets}}", PREFIX).encode()
_PAGE_HEADERS = {"Content-Security-Policy": CSP, "Cache-Control": "no-cache"}
_FOREVER = "public, max-age=31536000, immutable"


async def page(request: Request) -> Response:
    return Response(PAGE, media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)


async def asset(request: Request) -> Response:
    found = FILES.get(request.path_params["path"])
    if found is None:
        raise ApiError("not_found", "No such file.")
    body, media_type = found
    current = request.path_params["digest"] == DIGEST
    return Response(
        body,
        media_type=media_type,
        headers={
            "Content-Security-Policy": CSP,
            "Cache-Control": _FOREVER if current else "no-cache",
        },
    )


routes = [
    Route("/", page, methods=["GET"], include_in_schema=False),
    Route("/assets/{digest}/{path:path}", asset, methods=["GET"], include_in_schema=False),
]
