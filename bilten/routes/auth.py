"""Authentication: register, login, refresh, logout, me, email verification, password reset."""

from __future__ import annotations

import logging
from typing import Annotated, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bilten import credentials, keys, mail, openapi, passwords, ratelimit, security, tokens, users
from bilten.errors import ApiError
from bilten.state import State, state
from bilten.users import User
from bilten.wire import JSONResponse, Struct, read_json

log = logging.getLogger(__name__)

VERIFY_TTL = 24 * 3600
KNOWN_ADDRESS_TTL = 90 * 24 * 3600
RESET_TTL = 3600

Email = Annotated[str, msgspec.Meta(max_length=254)]  # then judged by email-validator
Password = Annotated[
    str, msgspec.Meta(min_length=passwords.MIN_LENGTH, max_length=passwords.MAX_LENGTH)
]
Name = users.Name
Token = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class RegisterBody(Struct, kw_only=True):
    email: Email
    password: Password
    name: Name
    role: Literal["attendee", "organizer"] = "attendee"


class LoginBody(Struct, kw_only=True):
    email: Annotated[str, msgspec.Meta(max_length=254)]
    password: Annotated[str, msgspec.Meta(max_length=passwords.MAX_LENGTH)]


class RefreshBody(Struct, kw_only=True):
    refresh_token: Token


class TokenBody(Struct, kw_only=True):
    token: Token


class EmailBody(Struct, kw_only=True):
    email: Email


class ResetBody(Struct, kw_only=True):
    token: Token
    password: Password


class Session(msgspec.Struct, kw_only=True):
    user: User
    access_token: str
    refresh_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int


class Accepted(msgspec.Struct, kw_only=True):
    status: Literal["accepted"] = "accepted"


def client_ip(request: Request) -> str:
    """The subject of the per-address limits (an IPv6 client by its /64)."""
    return ratelimit.subject(request.client.host) if request.client else "unknown"


async def _session(app: State, conn: object, user: User) -> Session:
    started = await credentials.start_family(conn, user.id, app.settings.refresh_token_ttl)
    return Session(
        user=user,
        access_token=app.signer.issue(user.id, user.role, started.session),
        refresh_token=started.token,
        expires_in=app.settings.access_token_ttl,
    )


async def _mail_token(
    app: State, conn: object, user: User, purpose: str, ttl: int, template: str, page: str
) -> None:
    """Issue a one-time token and queue the mail carrying it, in the caller's transaction."""
    token = await credentials.issue_one_time(conn, user.id, purpose, ttl)
    await mail.enqueue(
        conn,
        key=f"{template}:{tokens.digest(token).hex()[:24]}",
        template=template,
        to=user.email,
        context={
            "name": user.name,
            "token": token,
            "link": f"{app.settings.public_url}/{page}?token={token}",
            "expires_minutes": ttl // 60,
        },
    )


async def _send_verification(app: State, conn: object, user: User) -> None:
    await _mail_token(
        app, conn, user, credentials.VERIFY_EMAIL, VERIFY_TTL, "verify_email", "verify-email"
    )


@openapi.endpoint(
    summary="Create an account (attendee or organizer) and sign in.",
    tag="auth",
    body=RegisterBody,
    response=Session,
    status=201,
    errors=("email_taken", "rate_limited"),
)
async def register(request: Request) -> Response:
    app = state(request)
    body = await read_json(request, RegisterBody)
    users.check_name(body.name)
    await ratelimit.enforce(
        app.redis, "register_ip", client_ip(request), app.settings.limit_register_ip
    )
    password_hash = await app.passwords.hash(body.password)
    async with app.db.acquire() as conn, conn.transaction():
        user = await users.create(
            conn, email=body.email, password_hash=password_hash, name=body.name, role=body.role
        )
        await _send_verification(app, conn, user)
        session = await _session(app, conn, user)
    return JSONResponse(session, status_code=201)


@openapi.endpoint(
    summary="Sign in with email and password.",
    tag="auth",
    body=LoginBody,
    response=Session,
    errors=("invalid_credentials", "rate_limited"),
    description="Repeated failures are limited per email and per IP (429 with Retry-After).",
)
async def login(request: Request) -> Response:
    app = state(request)
    body = await read_json(request, LoginBody)
    email = users.sign_in_email(body.email)
    ip = client_ip(request)
    # Each attempt is counted before the password is checked, so parallel guesses cannot slip
    # past the limit; a successful attempt is refunded, leaving only failures counted. Failures
    # count per email and address, per address, and, slower, per email from everywhere: that
    # last ceiling spares addresses the account signed in from before, so that strangers
    # guessing its password cannot lock its owner out.
    known = keys.login_known(email, ip)
    limits = [
        ("login_email_ip", f"{email}|{ip}", app.settings.limit_login_email_ip),
        ("login_ip", ip, app.settings.limit_login_ip),
    ]
    if not await app.redis.exists(known):
        limits.append(("login_email", email, app.settings.limit_login_email))
    outcomes = [await ratelimit.hit(app.redis, *limit) for limit in limits]
    denied = [o for o in outcomes if not o.allowed]
    if denied:
        raise ratelimit.limited(max(denied, key=lambda o: o.retry_after))
    async with app.db.acquire() as conn:
        found = await users.credentials(conn, email)
        ok = await app.passwords.verify(found[1] if found else None, body.password)
        if not ok or found is None:
            raise ApiError("invalid_credentials", "Wrong email or password.")
        user, password_hash = found
        if app.passwords.needs_rehash(password_hash):
            await users.set_password_hash(conn, user.id, await app.passwords.hash(body.password))
        session = await _session(app, conn, user)
    for limit in limits:
        await ratelimit.hit(app.redis, *limit, amount=-1)
    await app.redis.set(known, 1, ex=KNOWN_ADDRESS_TTL)
    return JSONResponse(session)


@openapi.endpoint(
    summary="Trade a refresh token for a new pair; the old one is spent.",
    tag="auth",
    body=RefreshBody,
    response=Session,
    errors=("unauthorized",),
    description="Presenting a spent refresh token revokes its whole family.",
)
async def refresh(request: Request) -> Response:
    app = state(request)
    body = await read_json(request, RefreshBody)
    async with app.db.acquire() as conn:
        try:
            rotated = await credentials.rotate(
                conn,
                body.refresh_token,
                app.settings.refresh_token_ttl,
                app.settings.session_max_age,
            )
        except credentials.RefreshRefused as refused:
            await app.sessions.revoke([refused.session])  # a stolen token: its session ends
            raise ApiError("unauthorized", "The refresh token is invalid or revoked.") from None
        user = await users.get(conn, rotated.user_id)
    if user is None:
        raise ApiError("unauthorized", "The refresh token is invalid or revoked.")
    return JSONResponse(
        Session(
            user=user,
            access_token=app.signer.issue(user.id, user.role, rotated.session),
            refresh_token=rotated.token,
            expires_in=app.settings.access_token_ttl,
        )
    )


@openapi.endpoint(
    summary="Sign out: revoke the refresh token's family.", tag="auth", body=RefreshBody, status=204
)
async def logout(request: Request) -> Response:
    app = state(request)
    body = await read_json(request, RefreshBody)
    async with app.db.acquire() as conn:
        ended = await credentials.revoke_family_of(conn, body.refresh_token)
    await app.sessions.revoke(ended)  # its access tokens stop working at once, everywhere
    return Response(status_code=204)


@openapi.endpoint(summary="The signed-in user.", tag="auth", response=User, auth=True)
async def me(request: Request) -> Response:
    who = security.authenticate(request)
    async with state(request).db.acquire() as conn:
        user = await users.get(conn, who.user_id)
    if user is None:
        raise ApiError("unauthorized", "The account no longer exists.")
    return JSONResponse(user)


@openapi.endpoint(
    summary="Confirm an email address with the token from the verification mail.",
    tag="auth",
    body=TokenBody,
    response=User,
    errors=("invalid_token",),
)
async def verify_email(request: Request) -> Response:
    body = await read_json(request, TokenBody)
    async with state(request).db.acquire() as conn, conn.transaction():
        user_id = await credentials.use_one_time(conn, body.token, credentials.VERIFY_EMAIL)
        if user_id is None:
            raise ApiError("invalid_token", "The verification token is invalid or expired.")
        await users.mark_verified(conn, user_id)
        user = await users.get(conn, user_id)
    return JSONResponse(user)


@openapi.endpoint(
    summary="Mail a password-reset token; always 202, whether or not the account exists.",
    tag="auth",
    body=EmailBody,
    response=Accepted,
    status=202,
    errors=("rate_limited",),
)
async def forgot_password(request: Request) -> Response:
    app = state(request)
    body = await read_json(request, EmailBody)
    email = users.valid_email(body.email)
    await ratelimit.enforce(
        app.redis, "forgot_ip", client_ip(request), app.settings.limit_forgot_ip
    )
    await ratelimit.enforce(app.redis, "forgot_email", email, app.settings.limit_forgot_email)
    # One statement whether or not the account exists (the token and the mail are made only if
    # it does): the answer takes the same time either way, and the mail is sent by the worker.
    token, digest = tokens.opaque()
    await app.db.execute(
        _FORGOT,
        email,
        digest,
        credentials.RESET_PASSWORD,
        RESET_TTL,
        f"password_reset:{digest.hex()[:24]}",
        token,
        f"{app.settings.public_url}/reset-password?token={token}",
        RESET_TTL // 60,
    )
    return JSONResponse(Accepted(), status_code=202)


_FORGOT = """
WITH u AS (SELECT id, email, name FROM users WHERE email = $1),
t AS (
    INSERT INTO user_tokens (token_hash, user_id, purpose, expires_at)
    SELECT $2, id, $3, now() + make_interval(secs => $4) FROM u)
INSERT INTO mail_jobs (job_key, template, recipient, context)
SELECT $5, 'password_reset', u.email, jsonb_build_object(
    'name', u.name, 'token', $6::text, 'link', $7::text, 'expires_minutes', $8::int)
FROM u
ON CONFLICT (job_key) DO NOTHING
"""


@openapi.endpoint(
    summary="Set a new password with the token from the reset mail; signs out everywhere.",
    tag="auth",
    body=ResetBody,
    status=204,
    errors=("invalid_token",),
)
async def reset_password(request: Request) -> Response:
    app = state(request)
    body = await read_json(request, ResetBody)
    await ratelimit.enforce(app.redis, "reset_ip", client_ip(request), app.settings.limit_reset_ip)
    # The token first: a made-up one costs an indexed read, never a password hash.
    async with app.db.acquire() as conn:
        user_id = await credentials.one_time_user(conn, body.token, credentials.RESET_PASSWORD)
    if user_id is None:
        raise _invalid_reset()
    await ratelimit.enforce(app.redis, "reset_user", user_id, app.settings.limit_forgot_email)
    password_hash = await app.passwords.hash(body.password)
    async with app.db.acquire() as conn, conn.transaction():
        if await credentials.use_one_time(conn, body.token, credentials.RESET_PASSWORD) is None:
            raise _invalid_reset()  # spent meanwhile
        await users.set_password_hash(conn, user_id, password_hash)
        ended = await credentials.revoke_all(conn, user_id)
        # Every other reset token of the account is spent with it.
        await credentials.spend_all(conn, user_id, credentials.RESET_PASSWORD)
        # Whoever reads the mail controls the address.
        await users.mark_verified(conn, user_id)
    await app.sessions.revoke(ended)
    return Response(status_code=204)


def _invalid_reset() -> ApiError:
    return ApiError("invalid_token", "The reset token is invalid or expired.")


routes = [
    Route("/auth/register", register, methods=["POST"]),
    Route("/auth/login", login, methods=["POST"]),
    Route("/auth/refresh", refresh, methods=["POST"]),
    Route("/auth/logout", logout, methods=["POST"]),
    Route("/auth/me", me, methods=["GET"]),
    Route("/auth/verify-email", verify_email, methods=["POST"]),
    Route("/auth/forgot-password", forgot_password, methods=["POST"]),
    Route("/auth/reset-password", reset_password, methods=["POST"]),
]
