"""The app factory and its lifespan: the one place long-lived resources open and close."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from bilten import (
    cache,
    db,
    errors,
    keys,
    mail,
    migrations,
    outbox,
    passwords,
    payments,
    redisconn,
    routes,
    sealing,
    seatmap,
    tokens,
)
from bilten.batching import Gathered
from bilten.budget import Budget
from bilten.helper import Helper
from bilten.holddesk import HoldDesk
from bilten.intake import Recorder
from bilten.media import LocalStorage
from bilten.middleware import ApiBudget, App
from bilten.pacing import Pacer
from bilten.pipelining import AutoPipeline
from bilten.pubsub import Hub
from bilten.realtime import Realtime
from bilten.routes import realtime as realtime_routes
from bilten.sagas import batch, booking, recovery
from bilten.sessions import Revocations
from bilten.settings import Settings
from bilten.state import State
from bilten.supervisor import Supervisor
from bilten.waiters import Waiters
from bilten.workers import bookings as bookings_worker
from bilten.workers import heartbeat
from bilten.workers import mail as mail_worker

log = logging.getLogger(__name__)


class NotMigrated(RuntimeError):
    pass


def redis_client(settings: Settings) -> aioredis.Redis:
    return redisconn.client(
        settings.redis_url, max_connections=settings.redis_pool_max, health_check_interval=30
    )


async def start_workers(app: State, realtime: Realtime) -> None:
    await cache.listen(app.hub, app.caches)
    await app.sessions.attach(app.hub)
    await app.hub.subscribe(keys.BOOKING_DONE, app.waiters.on_message)
    app.supervisor.start("pubsub", app.hub.worker())
    app.supervisor.start("heartbeat", heartbeat.worker(app, realtime))
    if "realtime" in app.settings.roles:
        app.hub.on_connect.append(lambda: realtime.on_redis_connect(app))
        # A revoked session's sockets close at once (4401), not at the next tick.
        app.sessions.listeners.append(lambda _: realtime.sign_out(app, time.time()))
        app.supervisor.start("realtime", realtime.worker(app))
    if "workers" in app.settings.roles:
        transport = mail.transport_from_settings(app.settings)
        app.supervisor.start("mail", mail_worker.worker(app, transport))
        if "api" in app.settings.roles:
            # Ticket codes are signed in a helper process where the loop also serves requests;
            # a process of workers alone has the time, and signs them itself, sooner.
            app.supervisor.start("helper", app.helper.worker())
        app.supervisor.start("outbox", outbox.relay(app.settings.database_url, app.redis))
        app.supervisor.start("recovery", recovery.worker(app))
        for n in range(app.settings.booking_workers):
            app.supervisor.start(
                f"bookings-{n}",
                bookings_worker.worker(app, batch.begin_batch, booking.add_announcements),
            )


@contextlib.asynccontextmanager
async def lifespan(
    settings: Settings, web: Starlette
) -> AsyncIterator[dict[str, State | Realtime]]:
    pool = await db.create_pool(settings)
    try:
        async with pool.acquire() as conn:
            waiting = await migrations.pending(conn)
        if waiting:
            raise NotMigrated(
                f"the database is not migrated ({len(waiting)} pending, first "
                f"{waiting[0].label}); run `bilten migrate`"
            )
        redis = redis_client(settings)
        try:
            hub = Hub(redis)
            caches = cache.Caches(seat_heads=seatmap.Heads(pool))
            app = State(
                settings=settings,
                db=pool,
                redis=redis,
                pipeline=AutoPipeline(redis),
                intake=Recorder(pool),
                holding=HoldDesk(pool, redis, caches, settings.hold_ttl),
                finishing=Gathered(),
                supervisor=Supervisor(),
                signer=tokens.signer(settings),
                keyring=sealing.keyring(settings),
                passwords=passwords.from_settings(settings),
                caches=caches,
                media=LocalStorage(settings.media_dir or settings.data_dir / "media"),
                hub=hub,
                payments=payments.provider_from_settings(settings, redis),
                waiters=Waiters(),
                sessions=Revocations(redis, settings.access_token_ttl),
                budget=Budget(redis, "api_ip", settings.limit_api_ip),
                pacer=Pacer(settings.mail_share),
                helper=Helper(),
                started_at=time.time(),
            )
            # The hub reads the state; the state does not know the hub (one way only).
            realtime = Realtime(settings, hub)
            await start_workers(app, realtime)
            # Serve only once changes announced by other instances reach us; if Redis is slow
            # to answer, cached entries still age out.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(app.hub.connected.wait(), 1)
            log.info(
                "instance %s started (roles %s)",
                settings.instance_id,
                ",".join(sorted(settings.roles)),
            )
            # Called (thread-safely) when a stop is asked for: see bilten.cli.make_server.
            web.state.on_stop = app.waiters.release_all
            try:
                yield {"bilten": app, "realtime": realtime}
            finally:
                await app.supervisor.stop(settings.shutdown_timeout)
                await app.budget.aclose()
                await app.payments.aclose()
                log.info("instance %s stopped", settings.instance_id)
        finally:
            await redis.aclose()
    finally:
        await pool.close()


def create_app(settings: Settings) -> Starlette:
    # Other sites' pages may call the API only when named (BILTEN_CORS_ORIGINS); bearer tokens,
    # not cookies, so no credentials are allowed.
    cors = (
        [
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST", "PATCH", "DELETE"],
                allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Prefer"],
                expose_headers=["X-Request-Id", "Retry-After"],
                max_age=600,
            )
        ]
        if settings.cors_origins
        else []
    )
    return App(
        routes=routes.build(settings.roles),
        middleware=[*cors, Middleware(ApiBudget)],
        exception_handlers=errors.HANDLERS,
        lifespan=lambda app: lifespan(settings, app),
        # Idle sockets by the ten thousand: each keeps only the frames of what it passed.
        sockets=realtime_routes.sockets if "realtime" in settings.roles else None,
        hsts=settings.public_url.startswith("https://"),
    )
