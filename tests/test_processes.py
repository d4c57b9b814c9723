"""Real ``bilten`` processes: serve, migrate, dev with its embedded servers, shutdown."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from bilten import db, embedded, keys, migrations
from tests.conftest import ROOT, drop_database, free_port, new_database, server_env, wait_ready
from tests.procs import children, still_alive

pytestmark = pytest.mark.slow


def run_cli(*args, env, timeout=60, stdin=""):
    return subprocess.run(
        [sys.executable, "-m", "bilten", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
    )


@pytest.fixture
def fresh_url(services):
    url = new_database(services)
    yield url
    drop_database(services, url)


def test_serve_refuses_an_unmigrated_database_in_one_line(settings, fresh_url):
    result = run_cli(
        "serve",
        "--port",
        str(free_port()),
        env=server_env(settings.replace(database_url=fresh_url)),
    )
    assert result.returncode == 1
    pending = len(migrations.load())
    assert result.stderr.strip().splitlines() == [
        f"bilten: error: the database is not migrated ({pending} pending, first 0001_init); "
        "run `bilten migrate` first"
    ]


def test_migrate_twice_then_serve(settings, fresh_url):
    env = server_env(settings.replace(database_url=fresh_url), BILTEN_LOG_FORMAT="text")
    first = run_cli("migrate", env=env)
    assert first.returncode == 0, first.stderr
    assert "applied" in first.stderr
    second = run_cli("migrate", env=env)
    assert second.returncode == 0, second.stderr
    assert "up to date" in second.stderr


@pytest.mark.parametrize(
    ("env", "status", "fragment"),
    [
        ({"BILTEN_DB_POOL_MAX": "lots"}, 2, "BILTEN_DB_POOL_MAX must be an integer"),
        ({"BILTEN_DATABASE_URL": ""}, 2, "BILTEN_DATABASE_URL"),
        (
            {"BILTEN_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/x"},
            1,
            "cannot reach PostgreSQL at 127.0.0.1:1",
        ),
        ({"BILTEN_REDIS_URL": "redis://127.0.0.1:1/0"}, 1, "cannot reach Redis at 127.0.0.1:1"),
        # A forgotten setting must not sell tickets for fake cards in production.
        ({"BILTEN_PAYMENT_PROVIDER": ""}, 2, "BILTEN_PAYMENT_PROVIDER must be set"),
    ],
)
def test_bad_configuration_exits_with_one_clear_line(settings, env, status, fragment):
    result = run_cli("serve", "--port", str(free_port()), env={**server_env(settings), **env})
    assert result.returncode == status
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("bilten: error: ") and fragment in lines[0]


@pytest.mark.parametrize("command", ["dev", "serve"])
def test_a_port_in_use_is_one_line_and_status_1(settings, command):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(command, "--port", str(port), env=server_env(settings), timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"bilten: error: port {port} on 127.0.0.1 is already in use: stop what is using it, "
        "or choose another with --port"
    ]


def test_help_for_every_command():
    for command in ("serve", "dev", "migrate", "seed-demo", "create-admin"):
        result = subprocess.run(
            [sys.executable, "-m", "bilten", command, "--help"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert result.returncode == 0
        assert f"usage: bilten {command}" in result.stdout


async def test_two_instances_share_one_database_and_register_themselves(spawn_server, redis):
    a = spawn_server()
    b = spawn_server("--roles", "api")
    async with httpx.AsyncClient() as http:
        for server in (a, b):
            response = await http.get(server.url + "/health/ready")
            assert response.status_code == 200
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        ids = await redis.zrange(keys.INSTANCES, 0, -1)
        if len(ids) == 2:
            break
        await asyncio.sleep(0.05)
    assert len(ids) == 2
    roles = {(await redis.hget(keys.instance(i.decode()), "roles")).decode() for i in ids}
    assert roles == {"api,realtime,workers", "api"}
    assert a.stop() == 0
    assert b.stop() == 0
    assert await redis.zrange(keys.INSTANCES, 0, -1) == []
    assert "instance" in a.log and "stopped" in a.log


def dev_env(**extra):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BILTEN_", "DATABASE_URL", "REDIS_URL"))
    }
    env.update(BILTEN_LOG_FORMAT="text", **extra)
    return env


def start_dev(data_dir: Path, log: Path):
    port = free_port()
    out = open(log, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bilten", "dev", "--port", str(port), "--data-dir", str(data_dir)],
        env=dev_env(),
        cwd=ROOT,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    out.close()
    began = time.monotonic()
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, timeout=90)
    except AssertionError:
        proc.kill()
        raise AssertionError(log.read_text()) from None
    return proc, port, time.monotonic() - began


@pytest.fixture
def shared_tmp():
    # A world-traversable folder: PostgreSQL may run as another user when tests run as root.
    path = Path(tempfile.mkdtemp(prefix="bilten-dev-test-"))
    path.chmod(0o755)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


async def _write_and_read(url: str, value: str | None) -> str | None:
    conn = await db.connect(url)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS kept (v text)")
        if value is not None:
            await conn.execute("INSERT INTO kept VALUES ($1)", value)
        return await conn.fetchval("SELECT v FROM kept LIMIT 1")
    finally:
        await conn.close()


def test_dev_keeps_data_and_leaves_no_process_behind(shared_tmp):
    data = shared_tmp / "data"
    log = shared_tmp / "dev.log"
    proc, _, cold = start_dev(data, log)
    try:
        servers = children(proc.pid)  # the database servers, and the mail worker's QR process
        lines = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in servers]
        assert any(b"bin/postgres" in line for line in lines), log.read_text()
        assert any(b"redis-server" in line for line in lines), log.read_text()
        url = f"postgresql://postgres@/bilten?host={data}&port=5432"
        assert asyncio.run(_write_and_read(url, "kept across restarts")) == "kept across restarts"
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(30) == 0, log.read_text()
        assert "Traceback" not in log.read_text()  # a stop asked for is no error
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not still_alive(servers)

    proc, _, warm = start_dev(data, log)
    try:
        assert asyncio.run(_write_and_read(url, None)) == "kept across restarts"
        servers = children(proc.pid)
        print(f"dev ready: cold {cold:.2f} s, warm {warm:.2f} s")
    finally:
        proc.kill()  # even kill -9 must not leave the servers running
        proc.wait()
    assert not still_alive(servers)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs PostgreSQL as another user")
def test_dev_as_root_never_loosens_a_private_folder(shared_tmp):
    private = shared_tmp / "home"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    data = private / "project" / ".bilten"
    log = shared_tmp / "dev.log"
    proc, _, _ = start_dev(data, log)
    try:
        assert (private.stat().st_mode & 0o777) == 0o700
        assert "not reachable" in log.read_text()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    assert (private.stat().st_mode & 0o777) == 0o700
    subprocess.run(["rm", "-rf", str(embedded._private_fallback("pgdata", data))], check=False)
    subprocess.run(["rm", "-rf", str(embedded._private_fallback("pgdata", data))], check=False)


async def test_create_admin_then_sign_in_as_admin(settings, client):
    env = server_env(settings, BILTEN_ARGON2_MEMORY_KIB="1024", BILTEN_ARGON2_TIME_COST="1")
    args = ("create-admin", "--email", "Root@Example.com")
    # The password comes on standard input, never on the command line.
    result = await asyncio.to_thread(run_cli, *args, env=env, stdin="admin password 1\n")
    assert result.returncode == 0, result.stderr
    assert "created admin root@example.com" in result.stdout
    login = await client.post(
        "/auth/login", json={"email": "root@example.com", "password": "admin password 1"}
    )
    assert login.status_code == 200
    assert login.json()["user"]["role"] == "admin"
    # Again: an existing account is promoted and gets the new password.
    again = await asyncio.to_thread(
        run_cli, "create-admin", "--email", "root@example.com", env=env, stdin="another password"
    )
    assert again.returncode == 0 and "made root@example.com an admin" in again.stdout
    short = await asyncio.to_thread(
        run_cli, "create-admin", "--email", "x@example.com", env=env, stdin="short\n"
    )
    assert short.returncode == 2 and "10 to 256" in short.stderr
    listed = await asyncio.to_thread(
        run_cli, "create-admin", "--email", "x@example.com,", env=env, stdin="long enough pw\n"
    )
    assert listed.returncode == 2 and "invalid characters" in listed.stderr
    legacy = await asyncio.to_thread(
        run_cli, "create-admin", "--email", "y@example.com", "--password", "on the line", env=env
    )
    assert legacy.returncode == 2  # there is no such option: a password is never an argument


async def test_seed_demo_creates_a_published_event_once(settings, client):
    env = server_env(settings, BILTEN_ARGON2_MEMORY_KIB="1024", BILTEN_ARGON2_TIME_COST="1")
    first = await asyncio.to_thread(run_cli, "seed-demo", env=env)
    assert first.returncode == 0, first.stderr
    assert "is published" in first.stdout
    event_id = first.stdout.split()[2]
    again = await asyncio.to_thread(run_cli, "seed-demo", env=env)
    assert again.returncode == 0 and f"demo event {event_id} exists already" in again.stdout
    event = (await client.get(f"/events/{event_id}")).json()
    assert event["status"] == "published"
    assert event["seat_count"] == event["available_seats"] == 464
    seats = (await client.get(f"/events/{event_id}/seats")).json()["seats"]
    assert {s["tier"] for s in seats} == {"Premium", "Stalls", "Balcony"}
    login = await client.post(
        "/auth/login", json={"email": "demo@bilten.test", "password": "demo password"}
    )
    assert login.status_code == 200 and login.json()["user"]["role"] == "organizer"


async def test_a_booking_while_redis_is_out_of_reach_is_503(client, settings, spawn_server):
    """The door needs Redis: without it a booking is refused 503 ``unavailable``, not 500."""
    from bilten import tokens
    from tests.test_bookings import published_event

    event_id, seats, _, _ = await published_event(client)
    with embedded.servers(None, postgres=False, redis=True) as own:
        server = spawn_server(BILTEN_REDIS_URL=own.redis_url)
    # Its Redis is gone now; PostgreSQL is still there.
    token = tokens.signer(settings).issue(
        "8d7f3c2a-0000-4000-8000-000000000001", "attendee", "a-session"
    )
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(
            f"{server.url}/bookings",
            headers={"Authorization": f"Bearer {token}", "Idempotency-Key": "k"},
            json={
                "event_id": event_id,
                "seat_ids": seats[:1],
                "payment": {"method": "card", "token": "tok_visa"},
            },
        )
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "unavailable"
    assert response.headers["retry-after"]
    assert "unhandled error" not in server.log


async def test_a_stop_does_not_wait_for_parked_requests(spawn_server):
    """SIGTERM answers requests parked on ``Prefer: wait`` at once (202, still queued), so the
    process stops in moments rather than when their waits run out."""
    from tests.test_bookings import buyer, published_event

    server = spawn_server(  # an API without workers: the request stays queued
        BILTEN_ROLES="api",
        BILTEN_SHUTDOWN_TIMEOUT="25",
        BILTEN_LIMIT_REGISTER_IP="0/60",
        BILTEN_ARGON2_MEMORY_KIB="1024",
        BILTEN_ARGON2_TIME_COST="1",
    )
    async with httpx.AsyncClient(base_url=server.url, timeout=40) as http:
        event_id, seats, _, _ = await published_event(http)
        auth = await buyer(http)
        parked = asyncio.ensure_future(
            http.post(
                "/bookings",
                headers={**auth, "Idempotency-Key": "parked", "Prefer": "wait=30"},
                json={
                    "event_id": event_id,
                    "seat_ids": seats[:1],
                    "payment": {"method": "card", "token": "tok_visa"},
                },
            )
        )
        await asyncio.sleep(1.0)
        assert not parked.done(), parked.result().text if parked.done() else ""
        began = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        response = await parked
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "queued"
        assert await asyncio.to_thread(server.process.wait, 10) == 0
        assert time.monotonic() - began < 5


def test_ctrl_c_twice_stops_dev_at_once_without_a_traceback(shared_tmp):
    """An impatient second Ctrl-C forces the exit: everything still stops, and the forced
    cancellation of the app is no error to report."""
    data = shared_tmp / "data"
    log = shared_tmp / "dev.log"
    proc, _, _ = start_dev(data, log)
    servers = children(proc.pid)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.wait(30)
    assert not still_alive(servers)
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
