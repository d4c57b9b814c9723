"""Settings, read once from the environment into a frozen object.

Nothing else in Bilten reads ``os.environ``: the CLI calls :func:`from_env` and passes the
result down explicitly.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bilten import redisurl

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
ROLES = frozenset({"api", "realtime", "workers"})


class SettingsError(ValueError):
    """Invalid configuration: the message is one line meant for the operator."""


@dataclasses.dataclass(frozen=True)
class Rate:
    """At most ``limit`` hits per ``window`` seconds; ``limit == 0`` switches the limit off."""

    limit: int
    window: int

    def __str__(self) -> str:
        return f"{self.limit}/{self.window}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    # Empty URLs mean "start the embedded servers" (``bilten dev`` and the tests only).
    database_url: str = ""
    redis_url: str = ""
    db_pool_min: int = 2
    db_pool_max: int = 10
    redis_pool_max: int = 50
    # Signs access tokens; older keys still verify tokens they signed (rotation).
    secret_key: str = dataclasses.field(default="", repr=False)
    old_secret_keys: tuple[str, ...] = dataclasses.field(default=(), repr=False)
    # Seals secrets kept in the database (ticket-signing keys); empty: the secret key does.
    data_key: str = dataclasses.field(default="", repr=False)
    old_data_keys: tuple[str, ...] = dataclasses.field(default=(), repr=False)
    access_token_ttl: int = 15 * 60
    session_max_age: int = 90 * 24 * 3600  # a session ends this long after sign-in, however used
    refresh_token_ttl: int = 30 * 24 * 3600
    # argon2id cost; changing it rehashes each password at its next login.
    argon2_time_cost: int = 3
    argon2_memory_kib: int = 64 * 1024
    argon2_parallelism: int = 2
    limit_login_email_ip: Rate = Rate(5, 60)  # failed logins of one email from one address
    limit_login_ip: Rate = Rate(30, 60)
    # Failed logins of one email from everywhere: slower and higher, and not applied to an
    # address this account signed in from before, so that strangers cannot lock its owner out.
    limit_login_email: Rate = Rate(100, 3600)
    limit_register_ip: Rate = Rate(20, 3600)
    limit_forgot_email: Rate = Rate(3, 3600)
    limit_forgot_ip: Rate = Rate(20, 3600)
    limit_reset_ip: Rate = Rate(20, 3600)
    # Per organizer (admins are not limited): venues, and their seats, and events made a day.
    quota_venues: Rate = Rate(20, 86400)
    quota_seats: Rate = Rate(100_000, 86400)
    quota_events: Rate = Rate(100, 86400)
    limit_api_ip: Rate = Rate(1200, 60)
    smtp_url: str = dataclasses.field(default="", repr=False)
    mail_from: str = "Bilten <no-reply@bilten.localhost>"
    mail_dir: Path | None = None  # where mail goes without SMTP; None: <data_dir>/mail
    mail_max_attempts: int = 8
    mail_poll_interval: float = 1.0
    mail_share: float = 0.25  # of the time mail may take while a sale is on (bilten.pacing)
    public_url: str = "http://127.0.0.1:8000"
    media_dir: Path | None = None  # uploaded images; None: <data_dir>/media
    payment_provider: str = "test"  # test | stripe
    # False when BILTEN_PAYMENT_PROVIDER was not set: `serve` then refuses to sell tickets for
    # the test provider's fake cards (dev and the tests use it as their default).
    payment_provider_chosen: bool = True
    stripe_api_key: str = dataclasses.field(default="", repr=False)
    stripe_base_url: str = "https://api.stripe.com"
    stripe_webhook_secret: str = dataclasses.field(default="", repr=False)
    payment_timeout: float = 10.0
    payment_retries: int = 3
    # How long a queue batch waits out a provider outage (charging again, same key) before its
    # unanswered charges fail `unavailable`; below the 120 s its seats are held for.
    payment_outage_wait: float = 60.0
    # The test provider's delay: its median, and when a p99 is given a log-normal spread with
    # that 99th percentile, plus a share of calls that hang until the call's timeout.
    test_payment_latency_ms: int = 0
    test_payment_latency_p99_ms: int = 0
    test_payment_hang_share: float = 0.0
    hold_ttl: int = 600
    booking_workers: int = 4  # queue-draining coroutines per instance
    queue_max: int = 10_000  # waiting requests per event before 503
    queue_in_flight: int = 8  # batches' worth of one event's requests paying while more reserve
    queue_lease_ms: int = 10_000  # a dead worker's events are taken over after this
    # The WebSocket hub: a connection whose unsent messages reach ws_send_queue is closed (1013).
    ws_send_queue: int = 256
    ws_max_subscriptions: int = 20  # rooms per connection
    ws_max_message: int = 4096  # bytes per client message; larger ones get an error reply
    ws_idle_timeout: float = 120.0  # closed after this long without a client message
    ws_ping_interval: int = 0  # seconds between protocol pings (0: none, clients ping us)
    ws_history: int = 256  # seat-map deltas kept per event for resubscribing clients
    ws_max_per_ip: int = 50  # open connections from one client address (more: closed, 4429)
    ws_max_rate: int = 20  # messages a second from one connection, in bursts of twice that
    ws_origins: tuple[str, ...] = ()  # Origin headers allowed to connect; none: any
    cors_origins: tuple[str, ...] = ()  # sites whose pages may call the API; none: CORS off
    log_level: str = "INFO"
    log_format: str = "json"  # json | text
    data_dir: Path = Path(".bilten")
    # Proxies (addresses or networks) whose X-Forwarded-For names the client; none: the peer
    # of the socket is the client, and forwarded headers are ignored.
    trusted_proxies: tuple[str, ...] = ()
    # Who may read /metrics: these addresses or networks, or a bearer token when set.
    metrics_allow: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    metrics_token: str = ""
    host: str = "127.0.0.1"  # where serve and dev listen unless --host says otherwise
    port: int = 8000
    roles: frozenset[str] = ROLES
    ready_timeout: float = 1.0
    shutdown_timeout: float = 10.0
    instance_id: str = dataclasses.field(default_factory=lambda: secrets.token_hex(4))

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if value <= 0:
        raise SettingsError(f"{name} must be positive, got {raw}")
    return value


def _share(env: Mapping[str, str], name: str, default: float) -> float:
    value = _float(env, name, default)
    if value > 1:
        raise SettingsError(f"{name} must be a share between 0 and 1, got {value}")
    return value


def _url(env: Mapping[str, str], names: tuple[str, ...], schemes: tuple[str, ...]) -> str:
    for name in names:
        url = env.get(name, "").strip()
        if not url:
            continue
        parts = urlsplit(url)
        if parts.scheme not in schemes:
            raise SettingsError(
                f"{name} must start with {' or '.join(s + '://' for s in schemes)}, "
                f"got {parts.scheme or 'no scheme'}"
            )
        return url
    return ""


def _redis_url(env: Mapping[str, str]) -> str:
    """One server, a cluster or a Sentinel-watched primary (:mod:`bilten.redisurl`)."""
    names = ("BILTEN_REDIS_URL", "REDIS_URL")
    url = _url(env, names, redisurl.SCHEMES)
    if url:
        try:
            redisurl.parse(url)
        except ValueError as exc:
            name = next(n for n in names if env.get(n, "").strip())
            raise SettingsError(f"{name}: {exc}") from None
    return url


def _rate(env: Mapping[str, str], name: str, default: Rate) -> Rate:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    limit, _, window = raw.partition("/")
    if not (limit.isdigit() and window.isdigit() and int(window) > 0):
        raise SettingsError(f"{name} must look like 5/60 (hits per seconds), got {raw!r}")
    return Rate(int(limit), int(window))


def parse_roles(raw: str) -> frozenset[str]:
    roles = frozenset(r.strip() for r in raw.split(",") if r.strip())
    unknown = roles - ROLES
    if unknown or not roles:
        raise SettingsError(
            f"roles must be a comma-separated subset of {','.join(sorted(ROLES))}, got {raw!r}"
        )
    return roles


def _latency(env: Mapping[str, str], name: str) -> dict[str, Any]:
    """``150`` (every call takes 150 ms) or ``150,2000,0.001`` (median 150 ms, 99th
    percentile 2 s, one call in a thousand hangs until its timeout)."""
    raw = env.get(name, "").strip()
    if not raw:
        return {}
    parts = [p.strip() for p in raw.split(",")]
    try:
        median = int(parts[0])
        p99 = int(parts[1]) if len(parts) > 1 else 0
        hangs = float(parts[2]) if len(parts) > 2 else 0.0
    except ValueError:
        raise SettingsError(f"{name} must look like 150 or 150,2000,0.001, got {raw!r}") from None
    if len(parts) > 3 or median < 0 or (p99 and p99 < median) or not 0 <= hangs < 1:
        raise SettingsError(f"{name} must look like 150 or 150,2000,0.001, got {raw!r}")
    return {
        "test_payment_latency_ms": median,
        "test_payment_latency_p99_ms": p99,
        "test_payment_hang_share": hangs,
    }


def _origins(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """Comma-separated origins (scheme://host[:port]), without a trailing slash."""
    return tuple(o.strip().rstrip("/") for o in env.get(name, "").split(",") if o.strip())


def _networks(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """Comma-separated addresses or networks (CIDR), each checked."""
    found = []
    for item in env.get(name, "").split(","):
        item = item.strip()
        if not item:
            continue
        try:
            found.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise SettingsError(f"{name}: {item!r} is not an address or a network") from None
    return tuple(found)


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    level = env.get("BILTEN_LOG_LEVEL", "INFO").upper()
    if level not in LOG_LEVELS:
        raise SettingsError(
            f"BILTEN_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {level!r}"
        )
    log_format = env.get("BILTEN_LOG_FORMAT", "json").lower()
    if log_format not in ("json", "text"):
        raise SettingsError(f"BILTEN_LOG_FORMAT must be json or text, got {log_format!r}")
    pool_min = _int(env, "BILTEN_DB_POOL_MIN", 2, minimum=0)
    pool_max = _int(env, "BILTEN_DB_POOL_MAX", 10, minimum=1)
    if pool_min > pool_max:
        raise SettingsError(
            f"BILTEN_DB_POOL_MIN ({pool_min}) exceeds BILTEN_DB_POOL_MAX ({pool_max})"
        )
    settings = Settings(
        database_url=_url(env, ("BILTEN_DATABASE_URL", "DATABASE_URL"), ("postgres", "postgresql")),
        redis_url=_redis_url(env),
        db_pool_min=pool_min,
        db_pool_max=pool_max,
        redis_pool_max=_int(env, "BILTEN_REDIS_POOL_MAX", 50, minimum=1),
        secret_key=env.get("BILTEN_SECRET_KEY", ""),
        old_secret_keys=tuple(
            k.strip() for k in env.get("BILTEN_OLD_SECRET_KEYS", "").split(",") if k.strip()
        ),
        access_token_ttl=_int(env, "BILTEN_ACCESS_TOKEN_TTL", 15 * 60, minimum=10),
        data_key=env.get("BILTEN_DATA_KEY", ""),
        old_data_keys=tuple(
            k.strip() for k in env.get("BILTEN_OLD_DATA_KEYS", "").split(",") if k.strip()
        ),
        refresh_token_ttl=_int(env, "BILTEN_REFRESH_TOKEN_TTL", 30 * 24 * 3600, minimum=60),
        session_max_age=_int(env, "BILTEN_SESSION_MAX_AGE", 90 * 24 * 3600, minimum=60),
        argon2_time_cost=_int(env, "BILTEN_ARGON2_TIME_COST", 3, minimum=1),
        argon2_memory_kib=_int(env, "BILTEN_ARGON2_MEMORY_KIB", 64 * 1024, minimum=1024),
        argon2_parallelism=_int(env, "BILTEN_ARGON2_PARALLELISM", 2, minimum=1),
        limit_login_email_ip=_rate(env, "BILTEN_LIMIT_LOGIN_EMAIL_IP", Rate(5, 60)),
        limit_login_email=_rate(env, "BILTEN_LIMIT_LOGIN_EMAIL", Rate(100, 3600)),
        limit_login_ip=_rate(env, "BILTEN_LIMIT_LOGIN_IP", Rate(30, 60)),
        limit_register_ip=_rate(env, "BILTEN_LIMIT_REGISTER_IP", Rate(20, 3600)),
        limit_forgot_email=_rate(env, "BILTEN_LIMIT_FORGOT_EMAIL", Rate(3, 3600)),
        limit_forgot_ip=_rate(env, "BILTEN_LIMIT_FORGOT_IP", Rate(20, 3600)),
        limit_reset_ip=_rate(env, "BILTEN_LIMIT_RESET_IP", Rate(20, 3600)),
        quota_venues=_rate(env, "BILTEN_QUOTA_VENUES", Rate(20, 86400)),
        quota_seats=_rate(env, "BILTEN_QUOTA_SEATS", Rate(100_000, 86400)),
        quota_events=_rate(env, "BILTEN_QUOTA_EVENTS", Rate(100, 86400)),
        limit_api_ip=_rate(env, "BILTEN_LIMIT_API_IP", Rate(1200, 60)),
        smtp_url=_url(env, ("BILTEN_SMTP_URL",), ("smtp", "smtps")),
        mail_from=env.get("BILTEN_MAIL_FROM", "") or "Bilten <no-reply@bilten.localhost>",
        mail_dir=Path(env["BILTEN_MAIL_DIR"]) if env.get("BILTEN_MAIL_DIR") else None,
        mail_max_attempts=_int(env, "BILTEN_MAIL_MAX_ATTEMPTS", 8, minimum=1),
        mail_poll_interval=_float(env, "BILTEN_MAIL_POLL_INTERVAL", 1.0),
        mail_share=_share(env, "BILTEN_MAIL_SHARE", 0.25),
        public_url=env.get("BILTEN_PUBLIC_URL", "").rstrip("/") or "http://127.0.0.1:8000",
        media_dir=Path(env["BILTEN_MEDIA_DIR"]) if env.get("BILTEN_MEDIA_DIR") else None,
        payment_provider=env.get("BILTEN_PAYMENT_PROVIDER", "").strip() or "test",
        payment_provider_chosen=bool(env.get("BILTEN_PAYMENT_PROVIDER", "").strip()),
        stripe_api_key=env.get("BILTEN_STRIPE_API_KEY", ""),
        stripe_base_url=_url(env, ("BILTEN_STRIPE_BASE_URL",), ("http", "https")).rstrip("/")
        or "https://api.stripe.com",
        stripe_webhook_secret=env.get("BILTEN_STRIPE_WEBHOOK_SECRET", ""),
        payment_timeout=_float(env, "BILTEN_PAYMENT_TIMEOUT", 10.0),
        payment_retries=_int(env, "BILTEN_PAYMENT_RETRIES", 3, minimum=0),
        payment_outage_wait=_float(env, "BILTEN_PAYMENT_OUTAGE_WAIT", 60.0),
        **_latency(env, "BILTEN_TEST_PAYMENT_LATENCY_MS"),
        hold_ttl=_int(env, "BILTEN_HOLD_TTL", 600, minimum=5),
        booking_workers=_int(env, "BILTEN_BOOKING_WORKERS", 4, minimum=1),
        queue_max=_int(env, "BILTEN_QUEUE_MAX", 10_000, minimum=1),
        queue_in_flight=_int(env, "BILTEN_QUEUE_IN_FLIGHT", 8, minimum=1),
        queue_lease_ms=_int(env, "BILTEN_QUEUE_LEASE_MS", 10_000, minimum=500),
        ws_send_queue=_int(env, "BILTEN_WS_SEND_QUEUE", 256, minimum=1),
        ws_max_subscriptions=_int(env, "BILTEN_WS_MAX_SUBSCRIPTIONS", 20, minimum=1),
        ws_max_message=_int(env, "BILTEN_WS_MAX_MESSAGE", 4096, minimum=64),
        ws_max_per_ip=_int(env, "BILTEN_WS_MAX_PER_IP", 50, minimum=1),
        ws_max_rate=_int(env, "BILTEN_WS_MAX_RATE", 20, minimum=1),
        cors_origins=_origins(env, "BILTEN_CORS_ORIGINS"),
        ws_origins=_origins(env, "BILTEN_WS_ORIGINS"),
        ws_idle_timeout=_float(env, "BILTEN_WS_IDLE_TIMEOUT", 120.0),
        ws_ping_interval=_int(env, "BILTEN_WS_PING_INTERVAL", 0, minimum=0),
        ws_history=_int(env, "BILTEN_WS_HISTORY", 256, minimum=1),
        log_level=level,
        log_format=log_format,
        data_dir=Path(env.get("BILTEN_DATA_DIR", ".bilten")),
        trusted_proxies=_networks(env, "BILTEN_TRUSTED_PROXIES"),
        metrics_allow=_networks(env, "BILTEN_METRICS_ALLOW") or ("127.0.0.0/8", "::1/128"),
        metrics_token=env.get("BILTEN_METRICS_TOKEN", ""),
        host=env.get("BILTEN_HOST", "").strip() or "127.0.0.1",
        port=_int(env, "BILTEN_PORT", 8000, minimum=0),  # 0: a free one
        roles=parse_roles(env.get("BILTEN_ROLES", "api,realtime,workers")),
        ready_timeout=_float(env, "BILTEN_READY_TIMEOUT", 1.0),
        shutdown_timeout=_float(env, "BILTEN_SHUTDOWN_TIMEOUT", 10.0),
    )
    if settings.port > 65535:
        raise SettingsError(f"BILTEN_PORT must be at most 65535, got {settings.port}")
    if settings.payment_provider not in ("test", "stripe"):
        raise SettingsError(
            f"BILTEN_PAYMENT_PROVIDER must be test or stripe, got {settings.payment_provider!r}"
        )
    if settings.payment_provider == "stripe" and not settings.stripe_api_key:
        raise SettingsError("BILTEN_STRIPE_API_KEY must be set when BILTEN_PAYMENT_PROVIDER=stripe")
    for key in (settings.secret_key, *settings.old_secret_keys):
        if key and len(key) < 32:
            raise SettingsError("BILTEN_SECRET_KEY and BILTEN_OLD_SECRET_KEYS need 32+ characters")
    for key in (settings.data_key, *settings.old_data_keys):
        if key and len(key) < 32:
            raise SettingsError("BILTEN_DATA_KEY and BILTEN_OLD_DATA_KEYS need 32+ characters")
    return settings
