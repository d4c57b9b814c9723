"""The API docs at ``/docs``: Swagger UI (from the ``swagger-ui-bundle`` package) on our page.

The page and its files are read once, at import, and served from memory under
``/docs/assets/<digest>/``, like the web app's (see ``bilten.routes.web``): the digest covers
every file, so a browser may keep them for a year. Nothing comes from elsewhere, and the page
runs no inline script or style.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent
VENDOR = Path(str(swagger_ui_path))
_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
}
_OURS = ("docs.js", "docs.css")
_THEIRS = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png", "favicon-16x16.png")

# Swagger UI sets styles through the DOM (allowed) and draws its icons from data: URLs.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


def _load() -> tuple[dict[str, tuple[bytes, str]], str]:
    files: dict[str, tuple[bytes, str]] = {}
    digest = hashlib.sha256()
    for folder, names in ((ROOT, _OURS), (VENDOR, _THEIRS)):
        for name in names:
            body = (folder / name).read_bytes()
            files[name] = (body, _TYPES[Path(name).suffix])
            digest.update(name.encode() + b"\0" + body + b"\0")
    return files, digest.hexdigest()[:16]


FILES, DIGEST = _load()
PREFIX = f"/docs/assets/{DIGEST}"
PAGE = (ROOT / "index.html").read_text().replace("{{assets}}", PREFIX).encode()
