"""Browser fixtures: Debian's Chromium driven by playwright, against a real ``bilten serve``.

Registered by ``conftest.py`` (``pytest_plugins``). Tests that use ``chromium`` are skipped,
with the reason, where Chromium or playwright is missing (``.ci/run`` installs Chromium).
Screenshots go to ``tests/artifacts/`` (git-ignored).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
PASSWORD = "a long enough password"
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class Site:
    """A running instance and helpers to make users on it through the API."""

    url: str

    def register(self, role: str = "attendee", name: str | None = None) -> dict[str, Any]:
        email = f"{role}-{uuid.uuid4().hex[:10]}@example.com"
        response = httpx.post(
            f"{self.url}/auth/register",
            json={"email": email, "password": PASSWORD, "name": name or role.title(), "role": role},
            timeout=10,
        )
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        body["email"] = email
        body["headers"] = {"Authorization": f"Bearer {body['access_token']}"}
        return body

    def api(self, method: str, path: str, who: dict[str, Any] | None = None, **kw: Any) -> Any:
        headers = dict(who["headers"]) if who else {}
        headers.update(kw.pop("headers", {}))
        response = httpx.request(method, self.url + path, headers=headers, timeout=30, **kw)
        assert response.status_code < 400, (
            f"{method} {path}: {response.status_code} {response.text}"
        )
        return response.json() if response.content else None


@pytest.fixture
def site(spawn_server: Any) -> Site:
    server = spawn_server(
        BILTEN_LIMIT_API_IP="0/60",
        BILTEN_LIMIT_REGISTER_IP="0/60",
        BILTEN_LIMIT_LOGIN_IP="0/60",
        BILTEN_ARGON2_MEMORY_KIB="1024",
        BILTEN_ARGON2_TIME_COST="1",
    )
    return Site(server.url)


@pytest.fixture
def chromium(site: Site) -> Iterator[Any]:
    """A headless Chromium, started after the test's server: while playwright's synchronous
    API is active its event loop counts as running, so the asyncio fixtures the server needs
    (databases, Redis) must be set up before it starts and torn down after it stops."""
    path = chromium_path()
    if path is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (make install)")
    with sync_playwright() as driver:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        browser = driver.chromium.launch(executable_path=path, headless=True, args=args)
        try:
            yield browser
        finally:
            browser.close()


def sign_in(page: Any, site: Site, who: dict[str, Any]) -> None:
    """Through the sign-in form, as a person would."""
    page.goto(f"{site.url}/#/signin")
    page.get_by_label("Email").fill(who["email"])
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("button", name="Sign out").wait_for()


def shoot(page: Any, name: str) -> None:
    """Screenshots of the page as it is, at desktop and at phone width."""
    ARTIFACTS.mkdir(exist_ok=True)
    size = page.viewport_size
    for label, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        page.set_viewport_size(viewport)
        page.wait_for_timeout(150)
        page.screenshot(path=str(ARTIFACTS / f"{name}-{label}.png"), full_page=True)
    if size:
        page.set_viewport_size(size)


def watch_console(page: Any) -> list[str]:
    """Errors the page logs (CSP violations, uncaught exceptions), for a test to assert on."""
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    return problems
