"""Notifications about bookings: by email always, by SMS too when the profile has a phone.

Both go through the durable mail queue (``mail_jobs``), enqueued in the transaction that
confirms or cancels the booking, under keys derived from the booking id: a booking gets exactly
one confirmation and one cancellation notice however often anything is redelivered. The job
holds only the booking id; the sender builds the message when it sends (:func:`prepare` reads
what it tells, :func:`compose` renders it, QR codes included). SMS sits behind a small
interface; the built-in one writes to the log.
"""

from __future__ import annotations

import io
import logging
from typing import Any, Protocol

import segno

from bilten import mail
from bilten.db import Connection, Pool

log = logging.getLogger(__name__)

TEMPLATES = ("booking_confirmed", "booking_cancelled")


class Sms(Protocol):
    async def send(self, to: str, text: str) -> None: ...


class LoggingSms:
    """SMS written to the log: the stand-in until a gateway is configured."""

    async def send(self, to: str, text: str) -> None:
        log.info("SMS to %s: %s", to, text)


async def booking_changed(conn: Connection, template: str, booking_id: str, user_id: str) -> None:
    """Queue the notices of a confirmed or cancelled booking (in the caller's transaction)."""
    await bookings_changed(conn, template, [(booking_id, user_id)])


async def bookings_changed(conn: Connection, template: str, changed: list[tuple[str, str]]) -> None:
    """Queue the notices of many bookings, ``(booking id, user id)`` each, in one statement."""
    assert template in TEMPLATES
    if not changed:
        return
    await conn.execute(
        """INSERT INTO mail_jobs (job_key, template, recipient, context, channel)
           SELECT $1 || ':' || r.kind || n.booking_id, $1, r.recipient,
                  jsonb_build_object('booking_id', n.booking_id), r.channel
           FROM unnest($2::text[], $3::uuid[]) AS n(booking_id, user_id)
           JOIN users u ON u.id = n.user_id
           CROSS JOIN LATERAL (VALUES (u.email::text, 'email', ''), (u.phone, 'sms', 'sms:'))
                AS r(recipient, channel, kind)
           WHERE r.recipient IS NOT NULL
           ON CONFLICT (job_key) DO NOTHING""",
        template,
        [b for b, _ in changed],
        [u for _, u in changed],
    )


def qr_png(code: str) -> bytes:
    out = io.BytesIO()
    # A fixed mask pattern scans as well and costs a third of the time of searching the best.
    segno.make(code, error="m", mask=0).save(out, kind="png", scale=4, border=2)
    return out.getvalue()


def qr_pngs(codes: dict[str, str]) -> dict[str, bytes]:
    return {name: qr_png(code) for name, code in codes.items()}


def money(cents: int, currency: str) -> str:
    return f"{cents // 100}.{cents % 100:02d} {currency}"


async def prepare(
    pool: Pool, template: str, context: dict[str, Any], *, images: bool = True
) -> tuple[dict[str, Any], dict[str, str]]:
    """The full context of a booking notice, and the codes of its tickets to show as QR images
    (by name; ``images=False``, an SMS, which links to the tickets instead, shows none). The
    images are drawn by :func:`compose`."""
    if template not in TEMPLATES:
        return context, {}
    async with pool.acquire() as conn:
        booking = await conn.fetchrow(
            """SELECT b.id::text, b.total_cents, b.currency, u.name AS user_name,
                      e.title, e.starts_at, v.name AS venue, v.address, v.city, v.timezone
               FROM bookings b JOIN users u ON u.id = b.user_id
               JOIN events e ON e.id = b.event_id JOIN venues v ON v.id = e.venue_id
               WHERE b.id = $1""",
            context["booking_id"],
        )
        if booking is None:
            raise LookupError(f"booking {context['booking_id']} does not exist")
        tickets = await conn.fetch(
            "SELECT id::text, label, code, status FROM tickets WHERE booking_id = $1 "
            "ORDER BY label, id",
            context["booking_id"],
        )
    from zoneinfo import ZoneInfo

    starts = booking["starts_at"].astimezone(ZoneInfo(booking["timezone"]))
    full = {
        **context,
        "name": booking["user_name"],
        "event": booking["title"],
        "starts": starts.strftime("%A %d %B %Y, %H:%M (%Z)"),
        "venue": booking["venue"],
        "address": f"{booking['address']}, {booking['city']}",
        "total": money(booking["total_cents"], booking["currency"]),
        "tickets": [
            {"label": t["label"], "code": t["code"], "cid": f"ticket-{n}"}
            for n, t in enumerate(tickets)
        ],
    }
    codes: dict[str, str] = {}
    if images and template == "booking_confirmed":
        codes = {f"ticket-{n}": t["code"] for n, t in enumerate(tickets)}
    return full, codes


def compose(
    sender: str,
    template: str,
    to: str,
    context: dict[str, Any],
    key: str,
    codes: dict[str, str],
) -> mail.Rendered:
    """A notice as it is sent, its QR codes drawn: all of it CPU work (milliseconds a ticket),
    which the mail worker runs in a helper process (:mod:`bilten.workers.mail`)."""
    message = mail.render(sender, template, to, context, key=key, images=qr_pngs(codes))
    return mail.flatten(message)


def render_sms(template: str, context: dict[str, Any]) -> str:
    return " ".join(mail.render_text(f"{template}.sms.txt", context).split())
