"""Outgoing mail: the durable queue, rendering from templates, and the transports that send.

A mail is queued as a row of ``mail_jobs`` inside the caller's own transaction, so it is sent
if and only if the change that caused it commits; :mod:`bilten.workers.mail` sends it.
Templates live in ``templates/mail/``: ``<name>.subject.txt``, ``<name>.txt`` and
``<name>.html`` (autoescaped).

Failures are temporary (retried with backoff) unless the receiving server refuses the
recipient or the message with a 5xx reply: that is a :class:`PermanentError`, and the job is
dead at once, since sending the same message to the same address again cannot succeed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.policy
import email.utils
import hashlib
import logging
import os
import re
import secrets
import time
from collections.abc import Mapping
from email.message import EmailMessage
from pathlib import Path
from typing import Any, NamedTuple, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import aiosmtplib
import jinja2

from bilten.db import Connection
from bilten.settings import Settings, SettingsError

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates" / "mail"
SMTP_TIMEOUT = 30.0  # seconds for one whole send, connection to QUIT

_templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default=False),
    # A missing variable is an error, not a mail with an empty link in it.
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
)
_UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9._@-]")

_ENQUEUE = """
INSERT INTO mail_jobs (job_key, template, recipient, context)
VALUES ($1, $2, $3, $4)
ON CONFLICT (job_key) DO NOTHING
RETURNING id
"""


async def enqueue(
    conn: Connection, *, key: str, template: str, to: str, context: dict[str, Any]
) -> bool:
    """Queue a mail; ``False`` when a job with this ``key`` exists already (sent or not).

    ``conn`` comes from the pool (its jsonb codec encodes ``context``); the caller owns the
    transaction, so the mail goes out only if that transaction commits.
    """
    job_id = await conn.fetchval(_ENQUEUE, key, template, to, context)
    return job_id is not None


class PermanentError(Exception):
    """The receiving side refused the message for good; sending it again cannot help."""


class Transport(Protocol):
    async def send(self, message: Rendered) -> None: ...


def _domain(address: str) -> str:
    _, addr = email.utils.parseaddr(address)
    return addr.rpartition("@")[2] or "bilten.localhost"


def message_id(key: str, sender: str) -> str:
    """A Message-ID fixed by the job key, so every retry of one job carries the same one."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return f"<{digest}@{_domain(sender)}>"


def render_text(name: str, context: Mapping[str, Any]) -> str:
    """One template of the mail folder, rendered (text templates, e.g. for SMS)."""
    return _templates.get_template(name).render(context)


def render(
    sender: str,
    template: str,
    to: str,
    context: Mapping[str, Any],
    *,
    key: str | None = None,
    images: Mapping[str, bytes] | None = None,
) -> EmailMessage:
    """Build a text + HTML message from ``sender`` (``BILTEN_MAIL_FROM``); ``images`` are PNGs
    the HTML shows as ``cid:<name>``.

    The message is made to travel as it is: lines end in CRLF and bodies are encoded to 7-bit
    (quoted-printable or base64 where they are not ASCII), so any SMTP server takes its bytes
    (:func:`flatten`); only an address that is not ASCII needs a server with SMTPUTF8, as
    before.
    """
    utf8 = not (sender.isascii() and to.isascii())
    policy = (email.policy.SMTPUTF8 if utf8 else email.policy.SMTP).clone(cte_type="7bit")
    subject = _templates.get_template(f"{template}.subject.txt").render(context)
    text = _templates.get_template(f"{template}.txt").render(context)
    html = _templates.get_template(f"{template}.html").render(context)
    message = EmailMessage(policy=policy)
    message["Subject"] = " ".join(subject.split())
    message["From"] = sender
    message["To"] = to
    message["Date"] = email.utils.formatdate(usegmt=True)
    message["Message-ID"] = (
        message_id(key, sender)
        if key is not None
        else email.utils.make_msgid(domain=_domain(sender))
    )
    # RFC 3834: vacation responders and the like should not answer.
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(text)
    message.add_alternative(html, subtype="html")
    if images:
        html_part = message.get_body(preferencelist=("html",))
        assert html_part is not None
        for name, png in images.items():
            html_part.add_related(png, "image", "png", cid=f"<{name}>", filename=f"{name}.png")
    return message


class Rendered(NamedTuple):
    """A message as it is sent: its envelope and its bytes (made where it costs the serving
    process nothing: :func:`bilten.notifications.compose`)."""

    sender: str  # the envelope's addresses, as taken from From and To
    recipient: str
    message_id: str
    data: bytes


def flatten(message: EmailMessage) -> Rendered:
    """A message made by :func:`render`, to be handed to a transport."""
    return Rendered(
        sender=message["From"].addresses[0].addr_spec,
        recipient=message["To"].addresses[0].addr_spec,
        message_id=str(message.get("Message-ID", "")).strip("<> "),
        data=message.as_bytes(),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class SmtpTransport:
    host: str
    port: int
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    implicit_tls: bool = False
    starttls: bool | None = None  # None: when the server offers it
    verify: bool = True
    timeout: float = SMTP_TIMEOUT

    @classmethod
    def from_url(cls, url: str, *, timeout: float = SMTP_TIMEOUT) -> SmtpTransport:
        """``smtp[s]://[user:pass@]host[:port][?starttls=auto|require|off][&verify=on|off]``."""
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise SettingsError("BILTEN_SMTP_URL must look like smtp://user:pass@host:port")
        options = parse_qs(parts.query, keep_blank_values=True)
        unknown = sorted(set(options) - {"starttls", "verify"})
        if unknown:
            raise SettingsError(f"BILTEN_SMTP_URL has unknown options: {', '.join(unknown)}")
        starttls_modes: dict[str, bool | None] = {"auto": None, "require": True, "off": False}
        starttls = options.get("starttls", ["auto"])[-1]
        verify = options.get("verify", ["on"])[-1]
        if starttls not in starttls_modes:
            raise SettingsError("BILTEN_SMTP_URL: starttls must be auto, require or off")
        if verify not in ("on", "off"):
            raise SettingsError("BILTEN_SMTP_URL: verify must be on or off")
        implicit_tls = parts.scheme == "smtps"
        if implicit_tls and "starttls" in options:
            raise SettingsError("BILTEN_SMTP_URL: smtps:// is TLS from the start; drop starttls")
        try:
            port = parts.port
        except ValueError:
            raise SettingsError("BILTEN_SMTP_URL has an invalid port") from None
        return cls(
            host=parts.hostname,
            port=port or (465 if implicit_tls else 587),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            implicit_tls=implicit_tls,
            starttls=False if implicit_tls else starttls_modes[starttls],
            verify=verify == "on",
            timeout=timeout,
        )

    async def send(self, message: Rendered) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await aiosmtplib.send(
                    message.data,
                    sender=message.sender,
                    recipients=[message.recipient],
                    # An address beyond ASCII needs a server that takes UTF-8 (RFC 6531).
                    mail_options=[]
                    if (message.sender + message.recipient).isascii()
                    else ["SMTPUTF8"],
                    hostname=self.host,
                    port=self.port,
                    username=self.username,
                    password=self.password,
                    use_tls=self.implicit_tls,
                    start_tls=self.starttls,
                    validate_certs=self.verify,
                    timeout=self.timeout,
                )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            if all(refused.code >= 500 for refused in exc.recipients):
                raise PermanentError(describe(exc)) from exc
            raise
        except aiosmtplib.SMTPDataError as exc:
            if exc.code >= 500:
                raise PermanentError(describe(exc)) from exc
            raise


class FolderTransport:
    """Writes each message to ``<folder>/<Message-ID>.eml``: mail for development and tests."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        log.info("no SMTP server configured: mail is written to %s", folder.resolve())

    async def send(self, message: Rendered) -> None:
        msgid = message.message_id
        stem = _UNSAFE_FILE_CHARS.sub("_", msgid) or f"{time.time_ns()}-{secrets.token_hex(4)}"
        await asyncio.to_thread(_write_atomically, self.folder / f"{stem}.eml", message.data)


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A reader never sees half a message, and a retry of the same job replaces the file. Only
    # the owner may read it: mails carry reset links and tickets.
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def transport_from_settings(settings: Settings) -> Transport:
    if settings.smtp_url:
        return SmtpTransport.from_url(settings.smtp_url)
    return FolderTransport(settings.mail_dir or settings.data_dir / "mail")


def describe(exc: BaseException) -> str:
    """One line for ``last_error`` and the log: the SMTP reply when there is one."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        detail = "; ".join(f"{r.code} {r.message}" for r in exc.recipients)
    elif isinstance(exc, aiosmtplib.SMTPResponseException):
        detail = f"{exc.code} {exc.message}"
    else:
        detail = str(exc)
    detail = " ".join(detail.split())
    return f"{type(exc).__name__}: {detail}"[:1000] if detail else type(exc).__name__
