"""The ``bilten`` command: serve, dev, migrate, seed-demo."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import getpass
import ipaddress
import logging
import os
import secrets
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bilten import __version__, db, embedded, logs, mail, migrations, redisurl
from bilten.settings import Settings, SettingsError, from_env, parse_roles

log = logging.getLogger("bilten")

DEV_DATABASE = "bilten"


class Fatal(Exception):
    """Stops the command with one line on stderr and a non-zero exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _where(url: str) -> str:
    parts = urlsplit(url)
    if parts.hostname:
        return f"{parts.hostname}:{parts.port or ''}".rstrip(":")
    return db.redact(url)


async def preflight(settings: Settings, *, require_migrated: bool = True) -> None:
    """Fail fast, in one line, when PostgreSQL or Redis is unreachable or unmigrated."""
    from bilten import redisconn

    try:
        conn = await db.connect(settings.database_url)
    except Exception as exc:
        raise Fatal(f"cannot reach PostgreSQL at {_where(settings.database_url)}: {exc}") from None
    try:
        if require_migrated:
            waiting = await migrations.pending(conn)
            if waiting:
                raise Fatal(
                    f"the database is not migrated ({len(waiting)} pending, first "
                    f"{waiting[0].label}); run `bilten migrate` first"
                )
    except migrations.MigrationError as exc:
        raise Fatal(str(exc)) from None
    finally:
        await conn.close()
    client = redisconn.client(settings.redis_url, max_connections=2, socket_timeout=5)
    try:
        await client.ping()
    except Exception as exc:
        where = redisurl.where(settings.redis_url)
        raise Fatal(f"cannot reach Redis at {where}: {exc}") from None
    finally:
        await client.aclose()


async def _migrate(settings: Settings) -> None:
    try:
        conn = await db.connect(settings.database_url)
    except Exception as exc:
        raise Fatal(f"cannot reach PostgreSQL at {_where(settings.database_url)}: {exc}") from None
    try:
        applied = await migrations.migrate(conn)
    except migrations.MigrationError as exc:
        raise Fatal(str(exc)) from None
    finally:
        await conn.close()
    if applied:
        log.info("applied %d migration(s): %s", len(applied), ", ".join(m.label for m in applied))
    else:
        log.info("the database is up to date")


def _require_urls(settings: Settings) -> None:
    missing = [
        name
        for name, url in (
            ("BILTEN_DATABASE_URL", settings.database_url),
            ("BILTEN_REDIS_URL", settings.redis_url),
        )
        if not url
    ]
    if missing:
        raise Fatal(
            f"{' and '.join(missing)} must be set (or run `bilten dev` for embedded servers)", 2
        )
    if not settings.secret_key:
        raise Fatal("BILTEN_SECRET_KEY must be set (32+ random characters)", 2)


def bind(host: str, port: int) -> socket.socket:
    """The listening address, taken before anything else starts: a port in use is one line.

    The socket is bound but not yet listening, so a client is refused, not left waiting,
    until the app has started and uvicorn listens on it.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise Fatal(f"cannot listen on {host}: {exc.strerror}", 2) from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise Fatal(
                f"port {port} on {host} is already in use: stop what is using it, "
                "or choose another with --port"
            ) from None
        raise Fatal(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def bind_from(settings: Settings, args: argparse.Namespace) -> socket.socket:
    """``--host``/``--port``, else ``BILTEN_HOST``/``BILTEN_PORT``; port 0 picks a free one."""
    return bind(args.host or settings.host, settings.port if args.port is None else args.port)


def make_server(
    settings: Settings,
    host: str,
    port: int,
    app: Any = None,
    on_ready: Callable[[], None] | None = None,
) -> Any:
    """A uvicorn server for the app; SIGTERM/SIGINT drain it (see ``timeout_graceful_shutdown``).
    ``on_ready`` runs once the app has started and the socket listens."""
    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from bilten.app import create_app
    from bilten.realtime.protocol import LeanWebSocketProtocol

    proxies = [ipaddress.ip_network(n) for n in settings.trusted_proxies]

    class DrainingHttp(HttpToolsProtocol):
        """uvicorn's HTTP/1.1 protocol, less its cutting a balancer's idle connections on a stop.

        A balancer reuses its pooled keep-alive connections at any moment, so one of them may
        carry a request at the very instant it is closed: that request is lost, and a balancer
        does not resend a POST (its client gets a 502). So during a drain a connection from a
        trusted proxy (BILTEN_TRUSTED_PROXIES) is left to its keep-alive timeout, which the
        proxy's own shorter one beats (deploy/nginx.conf: 4 s against 5), and a request that
        still comes on it is answered with ``Connection: close``. A WebSocket upgrade arriving
        then is closed unanswered, which the balancer retries on another instance (a GET).
        Anyone else's idle connection is closed at once, as uvicorn does.
        """

        draining = False

        def shutdown(self) -> None:
            self.draining = True
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.keep_alive = False
            elif not self._from_proxy():
                self.transport.close()
            elif self.timeout_keep_alive_task is None:  # no request yet: no timer either
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler
                )

        def _from_proxy(self) -> bool:
            try:
                peer = ipaddress.ip_address(self.client[0]) if self.client else None
            except ValueError:  # a unix socket
                return False
            return peer is not None and any(peer in network for network in proxies)

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            if self.draining and self.cycle is not None and self.cycle.scope is self.scope:
                self.cycle.keep_alive = False

        def handle_websocket_upgrade(self) -> None:
            if self.draining:
                self.transport.close()
                return
            super().handle_websocket_upgrade()

    config = uvicorn.Config(
        app or create_app(settings),
        host=host,
        port=port,
        loop="uvloop",
        http=DrainingHttp,
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=int(settings.shutdown_timeout),
        # A connection idle between requests is closed after this long (a slow client holds
        # no socket for free; a request itself is bounded by the body limits and timeouts).
        timeout_keep_alive=5,
        # X-Forwarded-For is believed only from the proxies named in BILTEN_TRUSTED_PROXIES
        # (walking it back from the nearest hop): otherwise any client could pick its own IP.
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=list(settings.trusted_proxies) or None,
        # uvicorn's sans-I/O WebSocket protocol, keeping less per idle socket.
        ws=LeanWebSocketProtocol,
        # Compression would cost a zlib context per socket and one deflate per message per
        # socket, where the hub sends the same bytes to everyone.
        ws_per_message_deflate=False,
        # A frame past four times the message limit is cut off by the protocol (closed, 1009)
        # before it is read whole; between the two, the hub answers with an error.
        ws_max_size=settings.ws_max_message * 4,
        # Clients send pings (see BILTEN_WS_IDLE_TIMEOUT); protocol pings only when asked for.
        ws_ping_interval=settings.ws_ping_interval or None,
        ws_ping_timeout=settings.ws_ping_interval or None,
    )

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started and on_ready is not None:
                on_ready()

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            """uvicorn's, less its raising the signal again once drained: a stop asked for
            is a clean exit (status 0, no KeyboardInterrupt traceback from Ctrl-C)."""
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            stops = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in stops}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            # Requests parked on Prefer: wait answer now instead of holding the stop up.
            on_stop = getattr(getattr(config.app, "state", None), "on_stop", None)
            if on_stop is not None:
                with contextlib.suppress(RuntimeError):  # no loop running: nothing is parked
                    asyncio.get_running_loop().call_soon_threadsafe(on_stop)

    return Server(config)


# Collect cycles less often than CPython's default (700 allocations): under load a server holds
# thousands of live requests, and each young collection walks them all (measured: +25-50%
# requests per second on the booking path, in bench/flash_sale.py and a wrk run of its door).
GC_THRESHOLDS = (50_000, 50, 100)


def run_server(
    settings: Settings,
    sock: socket.socket,
    on_ready: Callable[[], None] | None = None,
) -> None:
    host, port = sock.getsockname()[:2]
    server = make_server(settings, host, port, on_ready=on_ready)
    gc.collect()
    gc.freeze()  # what is loaded by now lives as long as the process: never scan it again
    gc.set_threshold(*GC_THRESHOLDS)
    with sock:
        server.run(sockets=[sock])
    if not server.started:
        raise Fatal("the server did not start (see the log above)")


@contextlib.contextmanager
def _embedded_if_needed(settings: Settings) -> Iterator[tuple[Settings, embedded.Embedded]]:
    """Start embedded servers for whatever URL is not configured; yields complete settings."""
    need_pg, need_redis = not settings.database_url, not settings.redis_url
    if not (need_pg or need_redis):
        yield settings, embedded.Embedded()
        return
    folder = settings.data_dir
    try:
        with embedded.servers(folder, postgres=need_pg, redis=need_redis) as found:
            if need_pg:
                url = db.with_database(found.database_url, DEV_DATABASE)
                asyncio.run(db.ensure_database(url))
                settings = settings.replace(database_url=url)
            if need_redis:
                settings = settings.replace(redis_url=found.redis_url)
            yield settings, found
    except embedded.EmbeddedError as exc:
        raise Fatal(str(exc)) from None


def _dev_secret(folder: Path) -> str:
    """The signing key of a dev data folder: made once, kept private, reused on restart."""
    path = folder / "secret_key"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.write(secrets.token_urlsafe(48))
    return path.read_text().strip()


def cmd_serve(settings: Settings, args: argparse.Namespace) -> None:
    if args.roles:
        settings = settings.replace(roles=parse_roles(args.roles))
    _require_urls(settings)
    if not settings.payment_provider_chosen:
        raise Fatal(
            "BILTEN_PAYMENT_PROVIDER must be set: stripe, or test to sell for the built-in test "
            "provider's fake cards (no money)",
            2,
        )
    try:
        if settings.smtp_url:  # a malformed SMTP URL stops us here, in one line
            mail.SmtpTransport.from_url(settings.smtp_url)
    except SettingsError as exc:
        raise Fatal(str(exc), 2) from None
    sock = bind_from(settings, args)
    asyncio.run(preflight(settings))
    run_server(settings, sock)


def cmd_dev(settings: Settings, args: argparse.Namespace) -> None:
    # Absolute once, here: the embedded servers run inside their data folders.
    settings = settings.replace(data_dir=Path(args.data_dir or settings.data_dir).resolve())
    sock = bind_from(settings, args)
    if not settings.secret_key:
        settings = settings.replace(secret_key=_dev_secret(settings.data_dir))
    with _embedded_if_needed(settings) as (settings, found):
        asyncio.run(_migrate(settings))
        if args.seed_demo:
            asyncio.run(_seed_demo(settings))
        banner = ready_banner(settings, sock, found)
        run_server(settings, sock, on_ready=lambda: print(banner, flush=True))


def ready_banner(settings: Settings, sock: socket.socket, found: embedded.Embedded) -> str:
    """What ``bilten dev`` prints once it serves: where, its docs, its data, how to stop."""
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    lines = [
        f"Bilten is ready at {url}",
        f"  web app   {url}/",
        f"  API docs  {url}/docs",
        f"  data      {settings.data_dir}",
    ]
    if found.postgres_data and not found.postgres_data.is_relative_to(settings.data_dir):
        lines.append(f"            (PostgreSQL's cluster in {found.postgres_data.parent})")
    if not found.database_url:
        lines.append(f"  database  {_where(settings.database_url)}")
    if not found.redis_url:
        lines.append(f"  redis     {redisurl.where(settings.redis_url)}")
    lines.append("  stop      Ctrl-C")
    return "\n".join(lines)


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> None:
    _require_urls_db(settings)
    asyncio.run(_migrate(settings))


def _require_urls_db(settings: Settings) -> None:
    if not settings.database_url:
        raise Fatal("BILTEN_DATABASE_URL must be set (`bilten dev` migrates its own database)", 2)


async def _seed_demo(settings: Settings) -> None:
    from bilten import demo

    conn = await db.connect(settings.database_url)
    try:
        if await migrations.pending(conn):
            raise Fatal("the database is not migrated; run `bilten migrate` first")
        event_id, created = await demo.seed(conn, settings)
    finally:
        await conn.close()
    print(
        f"demo event {event_id} {'is published' if created else 'exists already'}; "
        f"organizer {demo.EMAIL} / {demo.PASSWORD!r}",
        flush=True,
    )


def cmd_seed_demo(settings: Settings, args: argparse.Namespace) -> None:
    _require_urls_db(settings)
    asyncio.run(_seed_demo(settings))


def _read_password() -> str:
    """From a prompt (asked twice) on a terminal, else the first line of standard input: never
    from the command line, which other users of the machine can read."""
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != first:
            raise Fatal("the passwords differ", 2)
        return first
    return sys.stdin.readline().rstrip("\r\n")


async def _revoke_sessions(settings: Settings, ended: list[str]) -> None:
    """Announce ended sessions to the instances, when Redis is configured here (without it the
    sessions still end at their refresh; their access tokens run out within their lifetime)."""
    if not ended or not settings.redis_url:
        return
    from bilten import redisconn
    from bilten.sessions import Revocations

    client = redisconn.client(settings.redis_url, max_connections=2)
    try:
        await Revocations(client, settings.access_token_ttl).revoke(ended)
    finally:
        await client.aclose()


def cmd_create_admin(settings: Settings, args: argparse.Namespace) -> None:
    from bilten import credentials, passwords, users
    from bilten.errors import ApiError

    _require_urls_db(settings)
    password = _read_password()
    if not passwords.MIN_LENGTH <= len(password) <= passwords.MAX_LENGTH:
        raise Fatal(
            f"the password must be {passwords.MIN_LENGTH} to {passwords.MAX_LENGTH} characters", 2
        )
    try:
        email = users.valid_email(args.email)
    except ApiError as exc:
        raise Fatal(exc.message, 2) from None

    async def create() -> str:
        password_hash = await passwords.from_settings(settings).hash(password)
        conn = await db.connect(settings.database_url)
        try:
            async with conn.transaction():
                found = await users.credentials(conn, email)
                if found is None:
                    user = await users.create(
                        conn,
                        email=email,
                        password_hash=password_hash,
                        name=args.name,
                        role="admin",
                    )
                    return f"created admin {user.email}"
                await users.set_role(conn, found[0].id, "admin")
                await users.set_password_hash(conn, found[0].id, password_hash)
                # A new role: the tokens that carry the old one must go (signed out everywhere).
                ended = await credentials.revoke_all(conn, found[0].id)
            await _revoke_sessions(settings, ended)
            return f"made {found[0].email} an admin and set its password"
        finally:
            await conn.close()

    print(asyncio.run(create()), flush=True)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="bilten",
        description="Bilten: event ticketing and seat booking. Configuration comes from BILTEN_* "
        "environment variables (see the README).",
    )
    top.add_argument("--version", action="version", version=f"bilten {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="serve the API against BILTEN_DATABASE_URL and BILTEN_REDIS_URL",
        description="Serve HTTP, WebSocket and background workers. Refuses to start when the "
        "database or Redis cannot be reached or the database is not migrated.",
    )
    serve.add_argument("--host", help="address to bind (default BILTEN_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default BILTEN_PORT or 8000)")
    serve.add_argument(
        "--roles",
        help="comma-separated parts to run: api,realtime,workers (default: all, or BILTEN_ROLES)",
    )
    serve.set_defaults(run=cmd_serve)

    dev = sub.add_parser(
        "dev",
        help="start embedded PostgreSQL and Redis (unless URLs are set), migrate, serve",
        description="For a laptop: embedded PostgreSQL and Redis keep their data in the data "
        "folder (default .bilten/) and stop with the command, Ctrl-C included.",
    )
    dev.add_argument("--host", help="address to bind (default BILTEN_HOST or 127.0.0.1)")
    dev.add_argument("--port", type=int, help="port to bind (default BILTEN_PORT or 8000)")
    dev.add_argument("--data-dir", help="data folder (default BILTEN_DATA_DIR or .bilten)")
    dev.add_argument(
        "--seed-demo", action="store_true", help="also create the demo event (see seed-demo)"
    )
    dev.set_defaults(run=cmd_dev)

    migrate = sub.add_parser(
        "migrate",
        help="apply pending database migrations (idempotent)",
        description="Apply the migrations in sql/migrations in order, each in a transaction, "
        "under an advisory lock. Running it again changes nothing.",
    )
    migrate.set_defaults(run=cmd_migrate)

    seed = sub.add_parser(
        "seed-demo",
        help="create a demo organizer, venue and published event",
        description="Create an organizer account (demo@bilten.test), a 200-seat venue and a "
        "published event with two price tiers and a standing ticket type.",
    )
    seed.set_defaults(run=cmd_seed_demo)

    admin = sub.add_parser(
        "create-admin",
        help="create an admin account, or make an existing account an admin",
        description="Admins are made only here, never through the API. An existing account "
        "with this email becomes an admin and gets the given password. The password (10 to "
        "256 characters) is asked for on a terminal, else read from the first line of "
        "standard input; never given on the command line.",
    )
    admin.add_argument("--email", required=True)
    admin.add_argument("--name", default="Administrator")
    admin.set_defaults(run=cmd_create_admin)
    return top


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # SIGTERM stops like Ctrl-C: uvicorn drains first and then re-raises the signal it caught,
    # which lands here and unwinds through the embedded servers' cleanup.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        settings = from_env()
    except SettingsError as exc:
        print(f"bilten: error: {exc}", file=sys.stderr)
        return 2
    logs.setup(settings.log_level, settings.log_format)
    try:
        args.run(settings, args)
    except Fatal as exc:
        print(f"bilten: error: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 0  # a requested stop, after a graceful shutdown
    return 0


if __name__ == "__main__":
    sys.exit(main())
