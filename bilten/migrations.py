"""Schema migrations: ``sql/migrations/NNNN_name.sql``, applied in order, once each.

Each file runs in its own transaction and is recorded in ``schema_migrations`` with a checksum,
all under a PostgreSQL advisory lock so instances starting together never race. A recorded
migration whose file has since changed is an error: migrations are append-only.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from bilten.db import Connection

log = logging.getLogger(__name__)

LOCK_KEY = 0x62696C74656E  # "bilten"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def _directory() -> Path:
    package = Path(__file__).parent
    installed = package / "sql" / "migrations"  # inside a built wheel
    return installed if installed.is_dir() else package.parent / "sql" / "migrations"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"


class MigrationError(RuntimeError):
    pass


def load(directory: Path | None = None) -> list[Migration]:
    directory = directory or _directory()
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise MigrationError(f"migration file name must look like 0001_name.sql: {path.name}")
        found.append(Migration(int(match[1]), match[2], path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError("two migration files share a version number")
    return found


_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


async def _applied(conn: Connection) -> dict[int, str]:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await conn.fetch("SELECT version, checksum FROM schema_migrations")
    return {row["version"]: row["checksum"] for row in rows}


def _verify(applied: dict[int, str], migrations: list[Migration]) -> list[Migration]:
    for m in migrations:
        if m.version in applied and applied[m.version] != m.checksum:
            raise MigrationError(f"migration {m.label} changed after it was applied")
    return [m for m in migrations if m.version not in applied]


async def pending(conn: Connection, migrations: list[Migration] | None = None) -> list[Migration]:
    """Migrations not yet applied to the database behind ``conn``."""
    migrations = load() if migrations is None else migrations
    return _verify(await _applied(conn), migrations)


async def migrate(conn: Connection, migrations: list[Migration] | None = None) -> list[Migration]:
    """Apply every pending migration; returns the ones applied (none when up to date)."""
    migrations = load() if migrations is None else migrations
    await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
    try:
        await conn.execute(_CREATE_TABLE)
        todo = _verify(await _applied(conn), migrations)
        for m in todo:
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    m.version,
                    m.name,
                    m.checksum,
                )
            log.info("applied migration %s", m.label)
        return todo
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
