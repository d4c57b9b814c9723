"""What ``BILTEN_REDIS_URL`` may say: one server, a Sentinel-watched primary, or a Redis Cluster.

* ``redis://[user:password@]host:port/db``, ``rediss://…`` (TLS), ``unix:///path?db=N``: one
  server.
* ``redis+cluster://[user:password@]host:port[,host:port…]`` (``rediss+cluster://`` for TLS):
  a Redis Cluster; the nodes listed are where to start, the others are discovered. Database 0
  only (a cluster has no other).
* ``redis+sentinel://[user:password@]host:port[,host:port…]/service[/db]``
  (``rediss+sentinel://``): the primary that the Sentinels call ``service``. The user and
  password are the primary's; the Sentinels are asked without.

Read when the settings load, so a bad URL stops the start-up with one line; without redis-py,
which only :mod:`bilten.redisconn` imports (the settings, and ``bilten --help``, load fast).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

SCHEMES = (
    "redis",
    "rediss",
    "unix",
    "redis+cluster",
    "rediss+cluster",
    "redis+sentinel",
    "rediss+sentinel",
)
CLUSTER_PORT = 6379
SENTINEL_PORT = 26379


@dataclass(frozen=True)
class Target:
    """Where a URL points: ``kind`` is ``server``, ``cluster`` or ``sentinel``."""

    kind: str
    nodes: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False


def parse(url: str) -> Target:
    """What ``url`` names; ValueError says what is wrong with it."""
    scheme, _, rest = url.partition("://")
    if scheme not in SCHEMES:
        raise ValueError(f"must start with one of {', '.join(s + '://' for s in SCHEMES)}")
    if not rest:
        raise ValueError("names no server")
    if "+" not in scheme:
        return Target("server")
    kind = scheme.split("+", 1)[1]
    netloc, _, path = rest.partition("/")
    path, _, query = path.partition("?")
    if query:
        raise ValueError(f"{scheme}:// takes no query string")
    userinfo, _, hosts = netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    port = CLUSTER_PORT if kind == "cluster" else SENTINEL_PORT
    nodes = tuple(_node(part, port) for part in hosts.split(","))
    segments = [unquote(s) for s in path.split("/") if s]
    service, db = "", 0
    if kind == "cluster":
        if segments not in ([], ["0"]):
            raise ValueError("a cluster has database 0 only: nothing may follow its nodes")
    else:
        if not segments or len(segments) > 2:
            raise ValueError(f"{scheme}://host:port[,host:port]/<service name>[/db] expected")
        service = segments[0]
        if len(segments) == 2:
            if not segments[1].isdigit():
                raise ValueError(f"the database must be a number, got {segments[1]!r}")
            db = int(segments[1])
    return Target(
        kind,
        nodes,
        service,
        db,
        unquote(username) or None,
        unquote(password) or None,
        scheme.startswith("rediss"),
    )


def _node(raw: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(f"//{raw.strip()}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in {raw!r}") from None
    if not parts.hostname:
        raise ValueError(f"a node needs a host, got {raw!r}")
    return parts.hostname, port or default_port


def where(url: str) -> str:
    """The servers a URL names, without its credentials (for messages)."""
    try:
        target = parse(url)
    except ValueError:
        return "?"
    if target.kind == "server":
        parts = urlsplit(url)
        return f"{parts.hostname}:{parts.port or ''}".rstrip(":") if parts.hostname else parts.path
    nodes = ",".join(f"{host}:{port}" for host, port in target.nodes)
    return f"{nodes}/{target.service}" if target.service else nodes
