"""Refresh-token families and one-time tokens (email verification, password reset).

Only digests of the tokens are stored; the client holds the only copy of each secret.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from bilten import tokens
from bilten.db import Connection

VERIFY_EMAIL = "verify_email"
RESET_PASSWORD = "reset_password"


class RefreshRefused(Exception):
    """The refresh token is unknown, expired, revoked, or was spent before (family revoked:
    ``session`` names it, so that its access tokens can be revoked too)."""

    def __init__(self, session: str = "") -> None:
        super().__init__(session)
        self.session = session


@dataclass(frozen=True)
class Rotated:
    user_id: str
    token: str
    session: str  # the family's id, carried by the access tokens issued for it


async def start_family(conn: Connection, user_id: str, ttl: int) -> Rotated:
    """A new session: its first refresh token."""
    token, digest = tokens.opaque()
    family = uuid.uuid4()
    await conn.execute(
        """INSERT INTO refresh_tokens (token_hash, family_id, user_id, expires_at)
           VALUES ($1, $2, $3, now() + make_interval(secs => $4))""",
        digest,
        family,
        user_id,
        ttl,
    )
    return Rotated(user_id, token, str(family))


async def rotate(conn: Connection, token: str, ttl: int, max_age: int) -> Rotated:
    """Spend ``token`` and issue its successor in the same family.

    A token presented a second time means two parties hold it: the whole family is revoked, and
    that revocation is committed even though the caller gets an error. A family older than
    ``max_age`` seconds ends however it was used: sessions do not slide forever.

    The user's row is locked first, shared: a revocation (a logout, a password reset) locks it
    exclusively, so the two never overlap. Without that, a revocation that started while this
    ran would miss the successor inserted here, and the session would outlive it.
    """
    async with conn.transaction():
        owned = await conn.fetchval(
            """SELECT 1 FROM users u JOIN refresh_tokens r ON r.user_id = u.id
               WHERE r.token_hash = $1 FOR SHARE OF u""",
            tokens.digest(token),
        )
        if owned is None:
            raise RefreshRefused
        row = await conn.fetchrow(
            """SELECT family_id, user_id::text, spent_at IS NOT NULL AS spent,
                      revoked_at IS NOT NULL AS revoked, expires_at < now() AS expired,
                      (SELECT min(created_at) FROM refresh_tokens f
                       WHERE f.family_id = r.family_id) < now() - make_interval(secs => $2)
                          AS too_old
               FROM refresh_tokens r WHERE token_hash = $1 FOR UPDATE""",
            tokens.digest(token),
            max_age,
        )
        if row is None or row["revoked"] or row["expired"] or row["too_old"]:
            raise RefreshRefused
        if row["spent"]:
            await revoke_family(conn, row["family_id"])
            reused = True
        else:
            reused = False
            await conn.execute(
                "UPDATE refresh_tokens SET spent_at = now() WHERE token_hash = $1",
                tokens.digest(token),
            )
            successor, digest = tokens.opaque()
            await conn.execute(
                """INSERT INTO refresh_tokens (token_hash, family_id, user_id, expires_at)
                   VALUES ($1, $2, $3, now() + make_interval(secs => $4))""",
                digest,
                row["family_id"],
                row["user_id"],
                ttl,
            )
    if reused:
        raise RefreshRefused(str(row["family_id"]))
    return Rotated(row["user_id"], successor, str(row["family_id"]))


async def revoke_family(conn: Connection, family_id: uuid.UUID) -> None:
    await conn.execute(
        "UPDATE refresh_tokens SET revoked_at = now() WHERE family_id = $1 AND revoked_at IS NULL",
        family_id,
    )


async def revoke_family_of(conn: Connection, token: str) -> list[str]:
    """End the session of ``token``; its id (none for an unknown token). The user's row is
    locked first (see :func:`rotate`)."""
    async with conn.transaction():
        row = await conn.fetchrow(
            "SELECT family_id::text, user_id FROM refresh_tokens WHERE token_hash = $1",
            tokens.digest(token),
        )
        if row is None:
            return []
        await conn.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", row["user_id"])
        await conn.execute(
            """UPDATE refresh_tokens SET revoked_at = now()
               WHERE family_id = $1 AND revoked_at IS NULL""",
            row["family_id"],
        )
    return [row["family_id"]]


async def revoke_all(conn: Connection, user_id: str) -> list[str]:
    """End every session of the user; their ids. The user's row is locked first (see
    :func:`rotate`)."""
    async with conn.transaction():
        await conn.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user_id)
        rows = await conn.fetch(
            """UPDATE refresh_tokens SET revoked_at = now()
               WHERE user_id = $1 AND revoked_at IS NULL
               RETURNING family_id::text""",
            user_id,
        )
    return sorted({r["family_id"] for r in rows})


async def issue_one_time(conn: Connection, user_id: str, purpose: str, ttl: int) -> str:
    token, digest = tokens.opaque()
    await conn.execute(
        """INSERT INTO user_tokens (token_hash, user_id, purpose, expires_at)
           VALUES ($1, $2, $3, now() + make_interval(secs => $4))""",
        digest,
        user_id,
        purpose,
        ttl,
    )
    return token


async def one_time_user(conn: Connection, token: str, purpose: str) -> str | None:
    """The user of a one-time token still good to use, without spending it."""
    user_id: str | None = await conn.fetchval(
        """SELECT user_id::text FROM user_tokens
           WHERE token_hash = $1 AND purpose = $2 AND used_at IS NULL AND expires_at > now()""",
        tokens.digest(token),
        purpose,
    )
    return user_id


async def spend_all(conn: Connection, user_id: str, purpose: str) -> None:
    """Spend every outstanding token of ``purpose`` of the user."""
    await conn.execute(
        """UPDATE user_tokens SET used_at = now()
           WHERE user_id = $1 AND purpose = $2 AND used_at IS NULL""",
        user_id,
        purpose,
    )


async def use_one_time(conn: Connection, token: str, purpose: str) -> str | None:
    """Spend a one-time token; the user's id, or None when unknown, used or expired."""
    user_id: str | None = await conn.fetchval(
        """UPDATE user_tokens SET used_at = now()
           WHERE token_hash = $1 AND purpose = $2 AND used_at IS NULL AND expires_at > now()
           RETURNING user_id::text""",
        tokens.digest(token),
        purpose,
    )
    return user_id
