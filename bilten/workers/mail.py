"""The mail sender: claims due jobs from ``mail_jobs``, sends them, records each outcome.

A claim sets a lease (``locked_until``) and counts the attempt. A sender that dies mid-send
leaves the lease to run out, and the job is claimed again: delivery is at least once, and the
job's fixed Message-ID lets mail software spot the rare duplicate. A temporary failure
reschedules the job with exponential backoff; a permanent one, or running out of
``mail_max_attempts``, marks it ``dead`` with ``last_error``. A finished job (sent or dead) has
its context emptied, since it may hold tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from concurrent.futures import Executor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from bilten import helper, mail, metrics, notifications
from bilten.db import Pool
from bilten.settings import Settings
from bilten.state import State
from bilten.supervisor import Worker

log = logging.getLogger(__name__)

BATCH = 20
CONCURRENCY = 5  # SMTP connections at once; relays throttle clients that open many
# A claim must outlast the slowest batch: BATCH / CONCURRENCY rounds of mail.SMTP_TIMEOUT.
LEASE = 300.0
BACKOFF_BASE = 15.0  # seconds; after attempt n the job waits BACKOFF_BASE * 2**n: 30 s, 1 min...
BACKOFF_MAX = 3600.0
JITTER = 0.1  # up to 10 % more, so jobs that failed together do not retry together

_CLAIM = """
UPDATE mail_jobs
SET attempts = attempts + 1, locked_until = now() + make_interval(secs => $2)
WHERE id IN (
    SELECT id FROM mail_jobs
    WHERE status = 'pending' AND run_at <= now()
      AND (locked_until IS NULL OR locked_until < now())
    ORDER BY run_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
RETURNING id, job_key, template, recipient, context, attempts, channel
"""
# Sent by any sender is final, even one whose lease ran out.
_SENT = """
UPDATE mail_jobs
SET status = 'sent', sent_at = now(), locked_until = NULL, context = '{}'
WHERE id = $1
"""
# The failure updates match the attempt they record, so a sender whose lease ran out cannot
# undo the claim of the sender that took the job over.
_RETRY = """
UPDATE mail_jobs
SET run_at = now() + make_interval(secs => $3), locked_until = NULL, last_error = $4
WHERE id = $1 AND attempts = $2 AND status = 'pending'
"""
_DEAD = """
UPDATE mail_jobs
SET status = 'dead', locked_until = NULL, last_error = $3, context = '{}'
WHERE id = $1 AND attempts = $2 AND status = 'pending'
"""
_RELEASE = """
UPDATE mail_jobs SET locked_until = NULL
WHERE id = $1 AND attempts = $2 AND status = 'pending'
"""


async def claim(pool: Pool, *, limit: int = BATCH, lease: float = LEASE) -> list[Any]:
    """Take up to ``limit`` due jobs for ``lease`` seconds; each claim counts as an attempt."""
    jobs: list[Any] = await pool.fetch(_CLAIM, limit, lease)
    return jobs


def retry_delay(attempts: int, base: float = BACKOFF_BASE, ceiling: float = BACKOFF_MAX) -> float:
    return min(base * 2.0**attempts, ceiling) * (1 + JITTER * random.random())


async def _deliver(
    pool: Pool,
    settings: Settings,
    transport: mail.Transport,
    job: Any,
    backoff: float,
    sms: notifications.Sms,
    executor: Executor | None = None,
) -> None:
    job_id, attempts, template = job["id"], job["attempts"], job["template"]
    try:
        by_sms = job["channel"] == "sms"
        context, codes = await notifications.prepare(
            pool, template, dict(job["context"]), images=not by_sms
        )
        if by_sms:
            context["tickets_url"] = f"{settings.public_url}/#/tickets"
            await sms.send(job["recipient"], notifications.render_sms(template, context))
        else:
            # Rendered and encoded in the helper process, QR codes drawn: the serving process
            # only sends the bytes.
            message = await asyncio.get_running_loop().run_in_executor(
                executor,
                notifications.compose,
                settings.mail_from,
                template,
                job["recipient"],
                context,
                job["job_key"],
                codes,
            )
            await transport.send(message)
    except BrokenProcessPool:
        # The helper process died (killed, out of memory): the job is not at fault. It is freed
        # for the next try, and the worker stops, to be restarted with a new helper.
        await asyncio.shield(pool.execute(_RELEASE, job_id, attempts))
        raise
    except Exception as exc:
        error = mail.describe(exc)
        if isinstance(exc, mail.PermanentError) or attempts >= settings.mail_max_attempts:
            await asyncio.shield(pool.execute(_DEAD, job_id, attempts, error))
            metrics.MAIL_DEAD.labels(template).inc()
            log.error(
                "mail job %s (%s) is dead after %d attempts: %s", job_id, template, attempts, error
            )
        else:
            delay = retry_delay(attempts, backoff)
            await asyncio.shield(pool.execute(_RETRY, job_id, attempts, delay, error))
            metrics.MAIL_FAILED.labels(template).inc()
            log.warning(
                "mail job %s (%s) attempt %d failed, retrying in %.0f s: %s",
                job_id,
                template,
                attempts,
                delay,
                error,
            )
    else:
        await asyncio.shield(pool.execute(_SENT, job_id))
        metrics.MAIL_SENT.labels(template).inc()
        log.info("mail job %s (%s) sent", job_id, template)


async def run_once(
    pool: Pool,
    settings: Settings,
    transport: mail.Transport,
    *,
    limit: int = BATCH,
    lease: float = LEASE,
    backoff: float = BACKOFF_BASE,
    sms: notifications.Sms | None = None,
    executor: Executor | None = None,
) -> int:
    """Claim the due jobs (up to ``limit``), send them, and return how many were claimed."""
    sms = sms or notifications.LoggingSms()
    jobs = await claim(pool, limit=limit, lease=lease)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def deliver(job: Any) -> None:
        try:
            async with gate:
                await _deliver(pool, settings, transport, job, backoff, sms, executor)
        except asyncio.CancelledError:
            # Shutting down: free the job for the next sender now, not when the lease ends.
            await asyncio.shield(pool.execute(_RELEASE, job["id"], job["attempts"]))
            raise

    async with asyncio.TaskGroup() as group:
        for job in jobs:
            group.create_task(deliver(job))
    return len(jobs)


def worker(
    app: State,
    transport: mail.Transport,
    *,
    limit: int = BATCH,
    lease: float = LEASE,
    backoff: float = BACKOFF_BASE,
) -> Worker:
    """Send mail until ``stop``; after a batch short of ``limit``, wait for the poll interval."""

    async def run(stop: asyncio.Event) -> None:
        # Rendering a message and drawing its QR codes is pure-Python CPU work (milliseconds a
        # ticket): a process of its own keeps it from slowing the requests this process serves.
        executor = await helper.start(notifications.qr_png, "warm-up")
        try:
            while not stop.is_set():
                began = time.monotonic()
                claimed = await run_once(
                    app.db,
                    app.settings,
                    transport,
                    limit=limit,
                    lease=lease,
                    backoff=backoff,
                    executor=executor,
                )
                await app.pacer.rest(time.monotonic() - began)  # a sale goes first
                if claimed < limit:  # the queue is drained
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), app.settings.mail_poll_interval)
        finally:
            executor.shutdown(wait=False, cancel_futures=True)

    return run
