"""PostgreSQL: the connection pool and small helpers around asyncpg."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import msgspec

from bilten.settings import Settings

CONNECT_TIMEOUT = 5.0

Pool = Any  # asyncpg ships no type information
Connection = Any


async def _init_connection(conn: Connection) -> None:
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(
            type_name,
            schema="pg_catalog",
            encoder=lambda v: msgspec.json.encode(v).decode(),
            decoder=msgspec.json.decode,
        )


async def connect(url: str, timeout: float = CONNECT_TIMEOUT) -> Connection:
    conn = await asyncpg.connect(url, timeout=timeout)
    await _init_connection(conn)
    return conn


async def _no_reset(conn: Connection) -> None:
    """Connections go back to the pool as they are: Bilten keeps no session state (advisory locks
    are transaction-scoped, nothing LISTENs), so asyncpg's reset query would be a round trip
    per request for nothing."""


async def create_pool(settings: Settings) -> Pool:
    return await asyncpg.create_pool(
        settings.database_url,
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        init=_init_connection,
        reset=_no_reset,
        timeout=CONNECT_TIMEOUT,
        # A dropped server connection surfaces as an error on the next query, not a hang.
        max_inactive_connection_lifetime=300,
    )


def with_database(url: str, name: str) -> str:
    """The same server URL pointing at database ``name``."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def redact(url: str) -> str:
    """A URL fit for a log line or an error message: no password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


async def ensure_database(url: str) -> None:
    """Create the database named in ``url`` unless it exists (for ``bilten dev``)."""
    name = urlsplit(url).path.lstrip("/")
    conn = await connect(with_database(url, "postgres"))
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
