"""Test harness: real PostgreSQL and Redis, embedded unless the environment names servers.

* ``BILTEN_TEST_DATABASE_URL``: a database on a server where the tests may create and drop
  databases (``postgresql://postgres@127.0.0.1:5432/postgres``, say);
* ``BILTEN_TEST_REDIS_URL``: a Redis database the tests may flush (``redis://127.0.0.1:6379/15``).

Without them, one embedded PostgreSQL and one embedded Redis are started for the session.
Each test module gets its own database, copied from a migrated template; each test starts
with an empty Redis database.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from asgi_lifespan import LifespanManager

from bilten import db, embedded, migrations
from bilten.app import create_app
from bilten.settings import Rate, Settings

pytest_plugins = ["tests.browser"]

ROOT = Path(__file__).resolve().parent.parent
TEST_SECRET = "test-secret-key-0123456789abcdef-0123456789abcdef-0123456789abcdef"


@dataclass(frozen=True)
class Services:
    database_url: str  # the server's maintenance database
    redis_url: str


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    database_url = os.environ.get("BILTEN_TEST_DATABASE_URL", "")
    redis_url = os.environ.get("BILTEN_TEST_REDIS_URL", "")
    if database_url and redis_url:
        yield Services(database_url, redis_url)
        return
    with embedded.servers(None, postgres=not database_url, redis=not redis_url) as found:
        yield Services(database_url or found.database_url, redis_url or found.redis_url)


async def _admin(url: str, *statements: str) -> None:
    conn = await db.connect(url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def _create_migrated(url: str) -> None:
    conn = await db.connect(url)
    try:
        await migrations.migrate(conn)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def template_database(services: Services) -> Iterator[str]:
    name = f"bilten_tpl_{secrets.token_hex(4)}"
    asyncio.run(_admin(services.database_url, f'CREATE DATABASE "{name}"'))
    asyncio.run(_create_migrated(db.with_database(services.database_url, name)))
    yield name
    asyncio.run(_admin(services.database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def new_database(services: Services, template: str = "template1") -> str:
    """Create a fresh database (a copy of ``template``) and return its URL."""
    name = f"bilten_test_{secrets.token_hex(4)}"
    asyncio.run(_admin(services.database_url, f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
    return db.with_database(services.database_url, name)


def drop_database(services: Services, url: str) -> None:
    name = url.rsplit("/", 1)[1].split("?", 1)[0]
    asyncio.run(_admin(services.database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="module")
def database_url(services: Services, template_database: str) -> Iterator[str]:
    """A migrated database of this test module's own."""
    url = new_database(services, template_database)
    yield url
    drop_database(services, url)


async def truncate(database_url: str, *tables: str) -> None:
    """Empty tables (and what references them) so a test starts from a known state."""
    conn = await db.connect(database_url)
    try:
        await conn.execute(f"TRUNCATE {', '.join(tables)} CASCADE")
    finally:
        await conn.close()


@pytest.fixture
async def redis_url(services: Services) -> str:
    client = aioredis.Redis.from_url(services.redis_url)
    await client.flushdb()
    await client.aclose()
    return services.redis_url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def settings(database_url: str, redis_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        redis_url=redis_url,
        db_pool_min=1,
        db_pool_max=5,
        log_format="text",
        shutdown_timeout=5,
        secret_key=TEST_SECRET,
        # Cheap hashing keeps the suite fast; the production cost is the settings' default.
        argon2_time_cost=1,
        argon2_memory_kib=1024,
        argon2_parallelism=1,
        # Many users come from one test client: the per-IP limits have tests of their own.
        limit_register_ip=Rate(0, 3600),
        limit_api_ip=Rate(0, 60),
    )


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client over the app, with the app's lifespan running."""
    async with LifespanManager(create_app(settings)) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bilten.test") as c:
            yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BILTEN_", "DATABASE_URL", "REDIS_URL"))
    }
    env.update(
        BILTEN_DATABASE_URL=settings.database_url,
        BILTEN_REDIS_URL=settings.redis_url,
        BILTEN_DB_POOL_MAX="4",
        BILTEN_SHUTDOWN_TIMEOUT="5",
        BILTEN_SECRET_KEY=settings.secret_key,
        BILTEN_PAYMENT_PROVIDER=settings.payment_provider,
    )
    env.update(extra)
    return env


def wait_ready(base_url: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(base_url + "/health/ready", timeout=1).status_code == 200:
                return
        time.sleep(0.05)
    raise AssertionError(f"{base_url} was not ready within {timeout} s")


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def serving(folder: Path, servers: list[tuple[str, int, dict[str, str]]]) -> Iterator[list[Server]]:
    """``bilten serve`` processes started side by side, one per (name, port, environment),
    each logging to ``folder/<name>.log``; ready when yielded, stopped on the way out."""
    started: list[Server] = []
    try:
        for name, port, env in servers:
            log_path = folder / f"{name}.log"
            with open(log_path, "wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "bilten", "serve", "--port", str(port)],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=ROOT,
                )
            started.append(Server(f"http://127.0.0.1:{port}", proc, log_path))
        for server in started:
            try:
                wait_ready(server.url, server.process)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{server.log}") from None
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def spawn_server(settings: Settings, tmp_path: Path) -> Iterator:
    """Start real ``bilten serve`` processes: ``spawn_server(**env)`` returns a :class:`Server`."""
    started: list[Server] = []

    def spawn(*args: str, **extra_env: str) -> Server:
        port = free_port()
        log_path = tmp_path / f"server-{port}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "bilten", "serve", "--port", str(port), *args],
                env=server_env(settings, **extra_env),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        server = Server(f"http://127.0.0.1:{port}", proc, log_path)
        started.append(server)
        try:
            wait_ready(server.url, proc)
        except AssertionError as exc:
            server.stop()
            raise AssertionError(f"{exc}\n{server.log}") from None
        return server

    yield spawn
    for server in started:
        server.stop()
