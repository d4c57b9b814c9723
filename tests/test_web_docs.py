"""The API docs at /docs in a real browser: Swagger UI from this instance, signing in once.

Registering from try-it-out, with the example it shows, authorizes the calls that follow: the
developer never copies a token. The page's files and headers are tested in test_ops.py.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.browser import Site, shoot, watch_console

pytestmark = pytest.mark.slow


def execute(operation: Any, status: str) -> Any:
    """Press Execute (try-it-out is on) and wait for an answer with ``status``."""
    operation.get_by_role("button", name="Execute").click()
    answer = operation.locator(".live-responses-table .response").first
    answer.locator(".response-col_status").filter(has_text=status).wait_for()
    return answer


def test_register_in_try_it_out_then_call_as_that_user(chromium: Any, site: Site) -> None:
    page = chromium.new_page(viewport={"width": 1280, "height": 860})
    problems = watch_console(page)
    page.goto(f"{site.url}/docs")
    page.locator(".opblock").first.wait_for()
    assert page.locator(".opblock").count() > 30, "operations are listed"
    assert "Sign in once" in page.locator(".signin-note").inner_text()

    register = page.locator("#operations-auth-post__auth_register")
    register.locator(".opblock-summary").click()
    example = register.locator("textarea.body-param__text").input_value()
    email = re.search(r'"email": "(dev-[a-z0-9]+@example\.com)"', example)
    assert email, example
    assert "access_token" in execute(register, "201").inner_text()

    me = page.locator("#operations-auth-get__auth_me")
    me.locator(".opblock-summary").click()
    assert email[1] in execute(me, "200").locator(".response-col_description").inner_text()
    assert "Authorization: Bearer ey" in me.locator(".curl-command").inner_text()
    shoot(page, "docs")
    assert problems == []
