"""A real SMTP server (aiosmtpd) on loopback for tests, keeping what it receives."""

import asyncio
import contextlib
import email
import email.policy

from aiosmtpd.smtp import SMTP


class Inbox:
    """An aiosmtpd handler that keeps the messages it accepts, or answers each with ``reply``."""

    def __init__(self, reply: str | None = None, rcpt_reply: str | None = None):
        self.reply = reply
        self.rcpt_reply = rcpt_reply
        self.messages: list[email.message.EmailMessage] = []
        self.raw: list[bytes] = []  # as received
        self.encrypted: list[bool] = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.reply:
            return self.reply
        self.raw.append(envelope.original_content)
        self.messages.append(
            email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        )
        self.encrypted.append(server.transport.get_extra_info("ssl_object") is not None)
        return "250 OK"


@contextlib.asynccontextmanager
async def smtp_server(handler, *, implicit_tls=None, **options):
    """An SMTP server in this event loop; yields its port."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="localhost", **options),
        "127.0.0.1",
        0,
        ssl=implicit_tls,
    )
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()
