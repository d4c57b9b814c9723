"""Users, profiles and addresses: plain functions over a connection."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

import asyncpg
import email_validator
import msgspec

from bilten.db import Connection
from bilten.errors import ApiError
from bilten.wire import invalid_field

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
# Control characters (a line break could start a line of its own in a mail's text) and the
# bidirectional overrides and isolates (they reorder how the text around them is shown).
_UNSHOWABLE = re.compile("[\x00-\x1f\x7f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def check_name(name: str) -> None:
    """A person's name, shown in mail and pages: something to read, nothing that changes how
    the text around it reads; 422 naming the field otherwise."""
    if not name.strip() or _UNSHOWABLE.search(name):
        raise invalid_field(
            "name", "must show something, without control or text-direction characters"
        )


EMAIL_UNIQUE = "users_email_key"
ONE_DEFAULT_ADDRESS = "addresses_one_default"


class User(msgspec.Struct, kw_only=True):
    id: str
    email: str
    name: str
    role: str
    email_verified: bool


class Profile(User, kw_only=True):
    phone: str | None
    locale: str | None
    created_at: datetime


class Address(msgspec.Struct, kw_only=True):
    id: str
    label: str
    line1: str
    line2: str | None
    city: str
    region: str | None
    postal_code: str
    country: str
    is_default: bool
    created_at: datetime


USER = "id::text, email::text, name, role, email_verified"
PROFILE = USER + ", phone, locale, created_at"
ADDRESS = (
    "id::text, label, line1, line2, city, region, postal_code, country, is_default, created_at"
)
ADDRESS_FIELDS = ("label", "line1", "line2", "city", "region", "postal_code", "country")


def normalise_email(email: str) -> str:
    """The form an address is stored and looked up in (for sign-in, where it is not judged)."""
    return email.strip().lower()


def sign_in_email(raw: str) -> str:
    """The form to look an address up by at sign-in: the one it was stored in when it is a
    valid address (email-validator's normalisation), else as typed (it will match nothing)."""
    try:
        return valid_email(raw)
    except ApiError:
        return normalise_email(raw)


def valid_email(raw: str, field: str = "email") -> str:
    """An address checked by email-validator (syntax, no list characters, no reserved domain
    but ``.test``) and normalised; 422 naming ``field`` otherwise. Deliverability is not
    checked: that would need DNS at sign-up, and the verification mail proves it anyway."""
    try:
        checked = email_validator.validate_email(
            raw.strip(), check_deliverability=False, test_environment=True
        )
    except email_validator.EmailNotValidError as exc:
        raise ApiError(
            "validation_error",
            f"{field}: {exc}",
            {"fields": [{"field": field, "message": str(exc)}]},
        ) from None
    return normalise_email(checked.normalized)


def _user(row: Any) -> User:
    return User(**{k: row[k] for k in User.__struct_fields__})


async def create(conn: Connection, *, email: str, password_hash: str, name: str, role: str) -> User:
    try:
        row = await conn.fetchrow(
            f"""INSERT INTO users (email, password_hash, name, role) VALUES ($1, $2, $3, $4)
                RETURNING {USER}""",
            valid_email(email),
            password_hash,
            name,
            role,
        )
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name == EMAIL_UNIQUE:
            raise ApiError("email_taken", "An account with this email exists.") from None
        raise
    return _user(row)


async def get(conn: Connection, user_id: str) -> User | None:
    row = await conn.fetchrow(f"SELECT {USER} FROM users WHERE id = $1", user_id)
    return _user(row) if row else None


async def credentials(conn: Connection, email: str) -> tuple[User, str] | None:
    """The user with this email and their password hash."""
    row = await conn.fetchrow(
        f"SELECT {USER}, password_hash FROM users WHERE email = $1", normalise_email(email)
    )
    return (_user(row), row["password_hash"]) if row else None


async def set_password_hash(conn: Connection, user_id: str, password_hash: str) -> None:
    await conn.execute(
        "UPDATE users SET password_hash = $2, updated_at = now() WHERE id = $1",
        user_id,
        password_hash,
    )


async def mark_verified(conn: Connection, user_id: str) -> None:
    await conn.execute(
        "UPDATE users SET email_verified = true, updated_at = now() WHERE id = $1", user_id
    )


async def set_role(conn: Connection, user_id: str, role: str) -> None:
    await conn.execute(
        "UPDATE users SET role = $2, updated_at = now() WHERE id = $1", user_id, role
    )


async def profile(conn: Connection, user_id: str) -> Profile | None:
    row = await conn.fetchrow(f"SELECT {PROFILE} FROM users WHERE id = $1", user_id)
    return Profile(**dict(row)) if row else None


async def update_profile(conn: Connection, user_id: str, changes: dict[str, Any]) -> Profile:
    """Apply ``changes`` (a subset of name, phone, locale; None clears phone and locale)."""
    allowed = {k: v for k, v in changes.items() if k in ("name", "phone", "locale")}
    if allowed:
        sets = ", ".join(f"{k} = ${i}" for i, k in enumerate(allowed, start=2))
        await conn.execute(
            f"UPDATE users SET {sets}, updated_at = now() WHERE id = $1",
            user_id,
            *allowed.values(),
        )
    found = await profile(conn, user_id)
    assert found is not None
    return found


MAX_ADDRESSES = 50  # a user's addresses (the list is one page of them all)


async def addresses(conn: Connection, user_id: str) -> list[Address]:
    rows = await conn.fetch(
        f"SELECT {ADDRESS} FROM addresses WHERE user_id = $1 ORDER BY created_at, id", user_id
    )
    return [Address(**dict(r)) for r in rows]


async def _clear_default(conn: Connection, user_id: str, keep: str | None) -> None:
    await conn.execute(
        "UPDATE addresses SET is_default = false WHERE user_id = $1 AND is_default "
        "AND id IS DISTINCT FROM $2::uuid",
        user_id,
        keep,
    )


def _default_conflict() -> ApiError:
    return ApiError("conflict", "Another request changed the default address; try again.")


async def add_address(conn: Connection, user_id: str, fields: dict[str, Any]) -> Address:
    """Add an address; making it the default unsets the previous default in the same
    transaction. At most :data:`MAX_ADDRESSES` a user (409): counted under the user's row lock,
    so requests at the same moment cannot pass it together."""
    async with conn.transaction():
        await conn.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user_id)
        count = await conn.fetchval("SELECT count(*) FROM addresses WHERE user_id = $1", user_id)
        if count >= MAX_ADDRESSES:
            raise ApiError(
                "conflict",
                f"At most {MAX_ADDRESSES} addresses; delete one first.",
                {"max_addresses": MAX_ADDRESSES},
            )
        if fields.get("is_default"):
            await _clear_default(conn, user_id, None)
        columns = [*ADDRESS_FIELDS, "is_default"]
        try:
            row = await conn.fetchrow(
                f"""INSERT INTO addresses (user_id, {", ".join(columns)})
                    VALUES ($1, {", ".join(f"${i}" for i in range(2, len(columns) + 2))})
                    RETURNING {ADDRESS}""",
                user_id,
                *(fields.get(c) for c in ADDRESS_FIELDS),
                bool(fields.get("is_default")),
            )
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name == ONE_DEFAULT_ADDRESS:
                raise _default_conflict() from None
            raise
    return Address(**dict(row))


async def update_address(
    conn: Connection, user_id: str, address_id: str, changes: dict[str, Any]
) -> Address | None:
    """Change an address of this user; None when the user has no such address."""
    allowed = {k: v for k, v in changes.items() if k in (*ADDRESS_FIELDS, "is_default")}
    async with conn.transaction():
        if allowed.get("is_default"):
            await _clear_default(conn, user_id, address_id)
        sets = ", ".join(f"{k} = ${i}" for i, k in enumerate(allowed, start=3)) or "id = id"
        try:
            row = await conn.fetchrow(
                f"UPDATE addresses SET {sets} WHERE id = $1 AND user_id = $2 RETURNING {ADDRESS}",
                address_id,
                user_id,
                *allowed.values(),
            )
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name == ONE_DEFAULT_ADDRESS:
                raise _default_conflict() from None
            raise
    return Address(**dict(row)) if row else None


async def delete_address(conn: Connection, user_id: str, address_id: str) -> bool:
    status = await conn.execute(
        "DELETE FROM addresses WHERE id = $1 AND user_id = $2", address_id, user_id
    )
    return bool(status == "DELETE 1")
