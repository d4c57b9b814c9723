import asyncio

import pytest

from bilten import db, migrations
from bilten.migrations import Migration, MigrationError
from tests.conftest import drop_database, new_database


@pytest.fixture
def fresh_url(services):
    url = new_database(services)
    yield url
    drop_database(services, url)


async def test_migrate_is_idempotent(fresh_url):
    conn = await db.connect(fresh_url)
    try:
        applied = await migrations.migrate(conn)
        assert [m.label for m in applied] == [m.label for m in migrations.load()]
        assert await migrations.migrate(conn) == []
        assert await migrations.pending(conn) == []
        rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
        assert [(r["version"], r["name"]) for r in rows] == [
            (m.version, m.name) for m in migrations.load()
        ]
    finally:
        await conn.close()


async def test_instances_migrating_at_once_apply_each_migration_once(fresh_url):
    slow = [
        Migration(1, "first", "CREATE TABLE t1 (id int); SELECT pg_sleep(0.2);"),
        Migration(2, "second", "CREATE TABLE t2 (id int);"),
    ]
    conns = [await db.connect(fresh_url) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrations.migrate(c, slow) for c in conns))
        assert sorted(len(r) for r in results) == [0, 0, 0, 2]
        count = await conns[0].fetchval("SELECT count(*) FROM schema_migrations")
        assert count == 2
    finally:
        for c in conns:
            await c.close()


async def test_a_failing_migration_leaves_nothing_half_written(fresh_url):
    broken = [
        Migration(1, "good", "CREATE TABLE good (id int);"),
        Migration(2, "bad", "CREATE TABLE half (id int); SELECT no_such_function();"),
    ]
    conn = await db.connect(fresh_url)
    try:
        with pytest.raises(Exception, match="no_such_function"):
            await migrations.migrate(conn, broken)
        assert await conn.fetchval("SELECT to_regclass('good') IS NOT NULL")
        assert await conn.fetchval("SELECT to_regclass('half') IS NULL")
        assert [m.version for m in await migrations.pending(conn, broken)] == [2]
    finally:
        await conn.close()


async def test_an_edited_migration_is_refused(fresh_url):
    conn = await db.connect(fresh_url)
    try:
        await migrations.migrate(conn, [Migration(1, "one", "CREATE TABLE one (id int);")])
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await migrations.pending(conn, [Migration(1, "one", "CREATE TABLE one (x int);")])
    finally:
        await conn.close()


def test_migration_files_are_well_named_and_numbered_in_order():
    found = migrations.load()
    assert found, "there is at least one migration"
    assert [m.version for m in found] == list(range(1, len(found) + 1))


async def test_an_events_bookings_are_read_by_index(database_url):
    """The organizer's stats and recovery's claim of a cancelled event's bookings read that
    event's bookings alone (with sequential scans off, as on a large table)."""
    import uuid

    from bilten import analytics, db

    conn = await db.connect(database_url)
    try:
        await conn.execute("SET enable_seqscan = off")
        event_id = uuid.uuid4()
        for query in (analytics._BY_TIER, analytics._PER_MINUTE, analytics._REFUNDS):
            plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + query, event_id))
            assert "bookings_event" in plan, plan
        claim = """EXPLAIN SELECT id FROM bookings WHERE saga_state = 'CONFIRMED'
                   AND event_id IN (SELECT id FROM events WHERE status = 'cancelled')"""
        plan = "\n".join(r[0] for r in await conn.fetch(claim))
        assert "bookings_event" in plan, plan
    finally:
        await conn.close()
