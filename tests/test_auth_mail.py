"""Email verification and password reset end to end: the API, the mail queue, a real SMTP
server, and the token read back out of the delivered mail."""

import asyncio
import re

import pytest
from asgi_lifespan import LifespanManager
from httpx import ASGITransport, AsyncClient

from bilten import db
from bilten.app import create_app
from tests.conftest import truncate
from tests.smtp import Inbox, smtp_server

PASSWORD = "correct horse battery"
NEW_PASSWORD = "a brand new password"


@pytest.fixture
async def mailbox(settings, database_url):
    """A client over an app whose mail worker delivers to a real SMTP server, and its inbox."""
    await truncate(database_url, "users", "mail_jobs")
    inbox = Inbox()
    async with smtp_server(inbox) as port:
        live = settings.replace(smtp_url=f"smtp://127.0.0.1:{port}", mail_poll_interval=0.05)
        async with LifespanManager(create_app(live)) as manager:
            transport = ASGITransport(app=manager.app)
            async with AsyncClient(transport=transport, base_url="http://bilten.test") as client:
                yield client, inbox


async def next_mail(inbox, count, timeout=5.0):
    for _ in range(int(timeout / 0.02)):
        if len(inbox.messages) >= count:
            return inbox.messages[count - 1]
        await asyncio.sleep(0.02)
    raise AssertionError(f"mail number {count} did not arrive")


def token_in(message):
    text = message.get_body(preferencelist=("plain",)).get_content()
    html = message.get_body(preferencelist=("html",)).get_content()
    token = re.search(r"token=([A-Za-z0-9_-]{43})", text)[1]
    assert token in html
    return token


async def register(client, email="ann@example.com"):
    response = await client.post(
        "/auth/register", json={"email": email, "password": PASSWORD, "name": "Ann"}
    )
    assert response.status_code == 201
    return response.json()


async def test_email_verification_by_mail(mailbox):
    client, inbox = mailbox
    session = await register(client)
    message = await next_mail(inbox, 1)
    assert message["To"] == "ann@example.com"
    token = token_in(message)
    verified = await client.post("/auth/verify-email", json={"token": token})
    assert verified.status_code == 200
    assert verified.json()["email_verified"] is True
    me = await client.get(
        "/auth/me", headers={"Authorization": f"Bearer {session['access_token']}"}
    )
    assert me.json()["email_verified"] is True
    again = await client.post("/auth/verify-email", json={"token": token})
    assert again.status_code == 400
    assert again.json()["error"]["code"] == "invalid_token"
    forged = await client.post("/auth/verify-email", json={"token": token[:-1] + "A"})
    assert forged.status_code == 400


async def test_password_reset_by_mail_end_to_end(mailbox, settings):
    client, inbox = mailbox
    old_session = await register(client)
    await next_mail(inbox, 1)  # the verification mail
    forgot = await client.post("/auth/forgot-password", json={"email": "ANN@example.com"})
    assert forgot.status_code == 202
    message = await next_mail(inbox, 2)
    assert "reset" in message["Subject"].lower()
    token = token_in(message)
    reset = await client.post(
        "/auth/reset-password", json={"token": token, "password": NEW_PASSWORD}
    )
    assert reset.status_code == 204
    old = await client.post("/auth/login", json={"email": "ann@example.com", "password": PASSWORD})
    assert old.status_code == 401
    new = await client.post(
        "/auth/login", json={"email": "ann@example.com", "password": NEW_PASSWORD}
    )
    assert new.status_code == 200
    # Every session from before the reset is gone, its access tokens too, at once.
    stale = await client.post("/auth/refresh", json={"refresh_token": old_session["refresh_token"]})
    assert stale.status_code == 401
    old_access = {"Authorization": f"Bearer {old_session['access_token']}"}
    assert (await client.get("/auth/me", headers=old_access)).status_code == 401
    reused = await client.post(
        "/auth/reset-password", json={"token": token, "password": "yet another password"}
    )
    assert reused.status_code == 400
    assert reused.json()["error"]["code"] == "invalid_token"


async def test_forgot_password_for_an_unknown_email_looks_the_same_and_sends_nothing(mailbox):
    client, inbox = mailbox
    known_session = await register(client)
    await next_mail(inbox, 1)
    unknown = await client.post("/auth/forgot-password", json={"email": "ghost@example.com"})
    known = await client.post("/auth/forgot-password", json={"email": "ann@example.com"})
    assert unknown.status_code == known.status_code == 202
    assert unknown.json() == known.json()
    await next_mail(inbox, 2)
    await asyncio.sleep(0.3)
    assert [m["To"] for m in inbox.messages] == ["ann@example.com", "ann@example.com"]
    assert known_session


async def test_an_expired_reset_token_is_refused(mailbox, settings):
    client, inbox = mailbox
    await register(client)
    await client.post("/auth/forgot-password", json={"email": "ann@example.com"})
    token = token_in(await next_mail(inbox, 2))
    conn = await db.connect(settings.database_url)
    try:
        await conn.execute(
            "UPDATE user_tokens SET expires_at = now() - interval '1 second' "
            "WHERE purpose = 'reset_password'"
        )
    finally:
        await conn.close()
    response = await client.post(
        "/auth/reset-password", json={"token": token, "password": NEW_PASSWORD}
    )
    assert response.status_code == 400


async def test_forgot_password_is_rate_limited_per_email(mailbox):
    client, _ = mailbox
    statuses = [
        (await client.post("/auth/forgot-password", json={"email": "x@example.com"})).status_code
        for _ in range(5)
    ]
    assert statuses == [202, 202, 202, 429, 429]


async def test_a_reset_spends_every_other_reset_token(mailbox):
    client, inbox = mailbox
    await register(client)
    await next_mail(inbox, 1)
    for _ in range(2):
        forgot = await client.post("/auth/forgot-password", json={"email": "ann@example.com"})
        assert forgot.status_code == 202
    await next_mail(inbox, 3)
    first, second = (token_in(m) for m in inbox.messages[1:3])
    assert first != second
    used = await client.post(
        "/auth/reset-password", json={"token": second, "password": NEW_PASSWORD}
    )
    assert used.status_code == 204
    stale = await client.post(
        "/auth/reset-password", json={"token": first, "password": "yet another password"}
    )
    assert stale.status_code == 400
