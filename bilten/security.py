"""Who is calling: the bearer token of a request, and the one way a route requires a role."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import HTTPConnection

from bilten.errors import ApiError
from bilten.state import state
from bilten.tokens import InvalidToken
from bilten.wire import header

ROLES = ("attendee", "organizer", "admin")


@dataclass(frozen=True)
class Principal:
    user_id: str
    role: str
    session: str = ""
    expires_at: float = float("inf")


def bearer(conn: HTTPConnection) -> str | None:
    value = header(conn, b"authorization")
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError("unauthorized", "The Authorization header must be 'Bearer <token>'.")
    return token.strip()


def principal_from_token(conn: HTTPConnection, token: str) -> Principal:
    app = state(conn)
    try:
        claims = app.signer.verify(token)
    except InvalidToken:
        raise ApiError("unauthorized", "The access token is invalid or expired.") from None
    if claims.role not in ROLES or claims.session in app.sessions:
        raise ApiError("unauthorized", "The access token is invalid, expired or signed out.")
    return Principal(claims.user_id, claims.role, claims.session, claims.expires_at)


def authenticate(conn: HTTPConnection) -> Principal:
    """The caller, or 401 ``unauthorized``."""
    token = bearer(conn)
    if token is None:
        raise ApiError("unauthorized", "This needs an access token (Authorization: Bearer ...).")
    return principal_from_token(conn, token)


def optional(conn: HTTPConnection) -> Principal | None:
    """The caller if a token was sent (a bad one is still a 401), else ``None``."""
    token = bearer(conn)
    return None if token is None else principal_from_token(conn, token)


def require(conn: HTTPConnection, *roles: str) -> Principal:
    """The caller, who must hold one of ``roles`` (admin always may): else 401 or 403."""
    who = authenticate(conn)
    if who.role != "admin" and who.role not in roles:
        raise ApiError("forbidden", f"This needs the {' or '.join(roles)} role.")
    return who
