"""The mail queue and sender against a real SMTP server (aiosmtpd) on loopback."""

import asyncio
import contextlib
import email
import email.policy
import multiprocessing
import os
import signal
import ssl
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from types import SimpleNamespace
from urllib.parse import quote

import pytest
import trustme
from aiosmtpd.smtp import AuthResult, LoginPassword

from bilten import db, mail
from bilten.pacing import Pacer
from bilten.settings import Settings, SettingsError
from bilten.workers import mail as mail_worker
from tests.conftest import free_port, truncate
from tests.smtp import Inbox, smtp_server

TOKEN = "tok-5f3a9c"
CONTEXT = {"name": "Ana", "link": f"http://bilten.test/verify?token={TOKEN}", "token": TOKEN}
RESET_CONTEXT = {
    "name": "Ana",
    "link": f"http://bilten.test/reset?token={TOKEN}",
    "token": TOKEN,
    "expires_minutes": 30,
}


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def server_tls(ca):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


@pytest.fixture
async def pool(settings, database_url):
    await truncate(database_url, "mail_jobs")
    pool = await db.create_pool(settings)
    yield pool
    await pool.close()


async def enqueue(pool, key="verify:1", template="verify_email", to="ana@example.com", **ctx):
    async with pool.acquire() as conn:
        return await mail.enqueue(conn, key=key, template=template, to=to, context=ctx or CONTEXT)


async def job(pool, key="verify:1"):
    """The job's row; ``wait`` is the seconds until its next attempt."""
    return await pool.fetchrow(
        "SELECT *, extract(epoch FROM run_at - now())::float8 AS wait"
        " FROM mail_jobs WHERE job_key = $1",
        key,
    )


def parts(message):
    text = message.get_body(preferencelist=("plain",)).get_content()
    html = message.get_body(preferencelist=("html",)).get_content()
    return text, html


async def test_a_job_is_rendered_and_delivered_with_text_and_html(pool, settings):
    inbox = Inbox()
    async with smtp_server(inbox) as port:
        smtp = settings.replace(smtp_url=f"smtp://127.0.0.1:{port}")
        assert await enqueue(pool)
        sent = await mail_worker.run_once(pool, smtp, mail.transport_from_settings(smtp))
    assert sent == 1
    [message] = inbox.messages
    assert message["To"] == "ana@example.com"
    assert message["From"] == settings.mail_from
    assert message["Subject"] == "Confirm your email address"
    assert message["Message-ID"] == mail.message_id("verify:1", settings.mail_from)
    assert message.get_content_type() == "multipart/alternative"
    text, html = parts(message)
    for body in (text, html):
        assert TOKEN in body
        assert CONTEXT["link"] in body
    assert "Hello Ana" in text
    row = await job(pool)
    assert (row["status"], row["attempts"], row["context"]) == ("sent", 1, {})
    assert row["sent_at"] is not None and row["locked_until"] is None
    assert await mail_worker.run_once(pool, smtp, mail.transport_from_settings(smtp)) == 0


@pytest.mark.parametrize("eight_bit", [True, False])
async def test_text_beyond_ascii_travels_to_any_server(pool, settings, eight_bit):
    """A message is sent as bytes made beforehand: 7-bit clean, so a server without 8BITMIME
    takes it as well as one with it, and its text arrives as written."""
    inbox = Inbox()
    context = {**CONTEXT, "name": "Åse Ødegård 🎫"}
    # aiosmtpd offers 8BITMIME unless it is to decode the data as text.
    async with smtp_server(inbox, decode_data=not eight_bit) as port:
        smtp = settings.replace(smtp_url=f"smtp://127.0.0.1:{port}")
        assert await enqueue(pool, **context)
        transport = mail.transport_from_settings(smtp)
        assert await mail_worker.run_once(pool, smtp, transport) == 1
    [message] = inbox.messages
    assert inbox.raw[0].isascii()
    text, html = parts(message)
    assert "Hello Åse Ødegård 🎫" in text and "Åse Ødegård 🎫" in html


async def test_an_address_beyond_ascii_is_sent_with_smtputf8(pool, settings):
    inbox = Inbox()
    async with smtp_server(inbox, enable_SMTPUTF8=True) as port:
        smtp = settings.replace(smtp_url=f"smtp://127.0.0.1:{port}")
        assert await enqueue(pool, to="åse@exämple.com")
        assert await mail_worker.run_once(pool, smtp, mail.transport_from_settings(smtp)) == 1
    # Its headers are UTF-8 as they are (RFC 6532).
    message = email.message_from_string(inbox.raw[0].decode(), policy=email.policy.default)
    assert message["To"].addresses[0].addr_spec == "åse@exämple.com"


async def test_enqueueing_one_key_twice_sends_once(pool, settings):
    inbox = Inbox()
    async with smtp_server(inbox) as port:
        smtp = settings.replace(smtp_url=f"smtp://127.0.0.1:{port}")
        assert await enqueue(pool, key="reset:7", template="password_reset", **RESET_CONTEXT)
        assert not await enqueue(pool, key="reset:7", template="password_reset", **RESET_CONTEXT)
        transport = mail.transport_from_settings(smtp)
        assert await mail_worker.run_once(pool, smtp, transport) == 1
        # Once sent, the key still stands: a late duplicate is not sent again.
        assert not await enqueue(pool, key="reset:7", template="password_reset", **RESET_CONTEXT)
        assert await mail_worker.run_once(pool, smtp, transport) == 0
    [message] = inbox.messages
    assert message["Subject"] == "Reset your password"
    text, html = parts(message)
    assert TOKEN in text and TOKEN in html
    assert "30 minutes" in text


async def test_enqueue_joins_the_callers_transaction(pool):
    async with pool.acquire() as conn:
        with contextlib.suppress(RuntimeError):
            async with conn.transaction():
                await mail.enqueue(
                    conn, key="verify:rolled-back", template="verify_email", to="a@b.c", context={}
                )
                raise RuntimeError("the change that caused the mail fails")
    assert await job(pool, "verify:rolled-back") is None


async def test_smtp_auth_with_url_encoded_user_and_password(pool, settings):
    logins = []

    def authenticator(server, session, envelope, mechanism, auth_data):
        assert isinstance(auth_data, LoginPassword)
        logins.append((auth_data.login.decode(), auth_data.password.decode()))
        ok = auth_data == LoginPassword(b"mailer@bilten.test", b"p@ss:w/rd%")
        return AuthResult(success=ok, handled=False)

    inbox = Inbox()
    async with smtp_server(inbox, authenticator=authenticator, auth_require_tls=False) as port:
        user, password = quote("mailer@bilten.test", safe=""), quote("p@ss:w/rd%", safe="")
        good = settings.replace(smtp_url=f"smtp://{user}:{password}@127.0.0.1:{port}")
        bad = settings.replace(smtp_url=f"smtp://{user}:wrong@127.0.0.1:{port}")
        await enqueue(pool)
        assert await mail_worker.run_once(pool, bad, mail.transport_from_settings(bad)) == 1
        row = await job(pool)
        assert row["status"] == "pending" and "535" in row["last_error"]
        await pool.execute("UPDATE mail_jobs SET run_at = now()")
        assert await mail_worker.run_once(pool, good, mail.transport_from_settings(good)) == 1
    # The client tries each mechanism the server offers before giving up.
    assert set(logins) == {("mailer@bilten.test", "wrong"), ("mailer@bilten.test", "p@ss:w/rd%")}
    assert len(inbox.messages) == 1
    assert (await job(pool))["status"] == "sent"


@pytest.mark.parametrize("options", ["?starttls=require&verify=off", "?verify=off"])
async def test_starttls_with_a_self_signed_certificate(pool, settings, server_tls, options):
    inbox = Inbox()
    async with smtp_server(inbox, tls_context=server_tls, require_starttls=True) as port:
        smtp = settings.replace(smtp_url=f"smtp://127.0.0.1:{port}{options}")
        await enqueue(pool)
        assert await mail_worker.run_once(pool, smtp, mail.transport_from_settings(smtp)) == 1
    assert inbox.encrypted == [True]
    assert (await job(pool))["status"] == "sent"


async def test_an_untrusted_certificate_is_refused_unless_its_ca_is_trusted(
    pool, settings, ca, server_tls, tmp_path, monkeypatch
):
    inbox = Inbox()
    async with smtp_server(inbox, tls_context=server_tls) as port:
        smtp = settings.replace(smtp_url=f"smtp://127.0.0.1:{port}")
        await enqueue(pool)
        assert await mail_worker.run_once(pool, smtp, mail.transport_from_settings(smtp)) == 1
        row = await job(pool)
        assert row["status"] == "pending"
        assert "certificate" in row["last_error"].lower()
        assert inbox.messages == []

        # Operators trust a private CA the OpenSSL way.
        bundle = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(bundle))
        monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
        await pool.execute("UPDATE mail_jobs SET run_at = now()")
        assert await mail_worker.run_once(pool, smtp, mail.transport_from_settings(smtp)) == 1
    assert inbox.encrypted == [True]


async def test_smtps_is_tls_from_the_first_byte(pool, settings, server_tls):
    inbox = Inbox()
    async with smtp_server(inbox, implicit_tls=server_tls) as port:
        smtp = settings.replace(smtp_url=f"smtps://127.0.0.1:{port}?verify=off")
        await enqueue(pool)
        assert await mail_worker.run_once(pool, smtp, mail.transport_from_settings(smtp)) == 1
    assert inbox.encrypted == [True]


async def test_starttls_required_but_not_offered_sends_nothing(pool, settings):
    inbox = Inbox()
    async with smtp_server(inbox) as port:
        smtp = settings.replace(smtp_url=f"smtp://127.0.0.1:{port}?starttls=require")
        await enqueue(pool)
        await mail_worker.run_once(pool, smtp, mail.transport_from_settings(smtp))
    assert inbox.messages == []
    row = await job(pool)
    assert row["status"] == "pending" and "STARTTLS" in row["last_error"]


async def test_a_451_is_retried_with_growing_delays_until_the_job_is_dead(pool, settings):
    inbox = Inbox(reply="451 4.3.0 try again later")
    async with smtp_server(inbox) as port:
        smtp = settings.replace(smtp_url=f"smtp://127.0.0.1:{port}", mail_max_attempts=3)
        transport = mail.transport_from_settings(smtp)
        await enqueue(pool)
        waits = []
        for attempt in (1, 2):
            assert await mail_worker.run_once(pool, smtp, transport, backoff=0.05) == 1
            row = await job(pool)
            assert (row["status"], row["attempts"]) == ("pending", attempt)
            assert row["last_error"] == "SMTPDataError: 451 4.3.0 try again later"
            assert row["locked_until"] is None
            # Not due yet: nothing is claimed before run_at.
            assert await mail_worker.run_once(pool, smtp, transport, backoff=0.05) == 0
            waits.append(row["wait"])
            await asyncio.sleep(row["wait"] + 0.01)
        assert await mail_worker.run_once(pool, smtp, transport, backoff=0.05) == 1
    assert 0.05 < waits[0] < waits[1] < 0.25
    row = await job(pool)
    assert (row["status"], row["attempts"], row["context"]) == ("dead", 3, {})
    assert "451" in row["last_error"]
    assert await mail_worker.run_once(pool, smtp, transport) == 0
    assert inbox.messages == []


async def test_a_refused_recipient_is_dead_at_once(pool, settings):
    inbox = Inbox(rcpt_reply="550 5.1.1 no such user")
    async with smtp_server(inbox) as port:
        smtp = settings.replace(smtp_url=f"smtp://127.0.0.1:{port}")
        await enqueue(pool)
        assert await mail_worker.run_once(pool, smtp, mail.transport_from_settings(smtp)) == 1
    row = await job(pool)
    assert (row["status"], row["attempts"]) == ("dead", 1)
    assert "550 5.1.1 no such user" in row["last_error"]


async def test_a_job_claimed_by_a_crashed_sender_is_sent_once_its_lease_ends(pool, settings):
    inbox = Inbox()
    async with smtp_server(inbox) as port:
        smtp = settings.replace(smtp_url=f"smtp://127.0.0.1:{port}")
        transport = mail.transport_from_settings(smtp)
        await enqueue(pool)
        [claimed] = await mail_worker.claim(pool, lease=0.3)  # ...and the sender dies
        assert claimed["attempts"] == 1
        assert await mail_worker.run_once(pool, smtp, transport) == 0  # the lease holds
        await asyncio.sleep(0.35)
        assert await mail_worker.run_once(pool, smtp, transport) == 1
    assert len(inbox.messages) == 1
    row = await job(pool)
    assert (row["status"], row["attempts"]) == ("sent", 2)


async def test_an_unreachable_server_sends_nothing_and_keeps_the_job(pool, settings):
    smtp = settings.replace(smtp_url=f"smtp://127.0.0.1:{free_port()}")
    await enqueue(pool)
    assert await mail_worker.run_once(pool, smtp, mail.transport_from_settings(smtp)) == 1
    row = await job(pool)
    assert (row["status"], row["attempts"]) == ("pending", 1)
    assert row["last_error"] and row["locked_until"] is None
    assert row["wait"] > 20  # backed off: the next attempt is BACKOFF_BASE * 2 away
    assert row["context"] == CONTEXT  # kept for the retry


async def test_a_server_that_never_answers_times_out_and_the_job_is_kept(pool, settings):
    async def silent(reader, writer):
        await reader.read()  # accepts, never greets
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        transport = mail.SmtpTransport.from_url(f"smtp://127.0.0.1:{port}", timeout=0.3)
        await enqueue(pool)
        began = time.monotonic()
        assert await mail_worker.run_once(pool, settings, transport) == 1
        assert time.monotonic() - began < 2
    finally:
        server.close()
        await server.wait_closed()
    row = await job(pool)
    assert (row["status"], row["attempts"]) == ("pending", 1)
    assert "Timeout" in row["last_error"]


class Stuck:
    """A transport whose send never returns, like a mail server hanging mid-message."""

    def __init__(self):
        self.started = asyncio.Event()

    async def send(self, message):
        self.started.set()
        await asyncio.Event().wait()


async def test_a_sender_cancelled_mid_send_frees_its_job_at_once(pool, settings, tmp_path):
    transport = Stuck()
    await enqueue(pool)
    task = asyncio.create_task(mail_worker.run_once(pool, settings, transport))
    await asyncio.wait_for(transport.started.wait(), 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    row = await job(pool)
    assert (row["status"], row["attempts"], row["locked_until"]) == ("pending", 1, None)
    folder = mail.FolderTransport(tmp_path)
    assert await mail_worker.run_once(pool, settings, folder) == 1
    assert (await job(pool))["status"] == "sent"


async def test_a_dead_helper_frees_its_job_and_a_new_helper_sends_it(pool, settings, tmp_path):
    """The helper process that renders mail is killed: the job is not blamed (freed, not
    retried later), the sender stops (its supervisor starts it again), a new helper sends it."""
    await enqueue(pool)
    context = multiprocessing.get_context("spawn")
    broken = ProcessPoolExecutor(max_workers=1, mp_context=context)
    os.kill(broken.submit(os.getpid).result(), signal.SIGKILL)
    folder = mail.FolderTransport(tmp_path)
    with pytest.raises(ExceptionGroup) as raised:
        await mail_worker.run_once(pool, settings, folder, executor=broken)
    assert raised.group_contains(BrokenProcessPool)
    broken.shutdown()
    row = await job(pool)
    assert (row["status"], row["attempts"], row["locked_until"], row["last_error"]) == (
        "pending",
        1,
        None,
        None,
    )
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as fresh:
        assert await mail_worker.run_once(pool, settings, folder, executor=fresh) == 1
    assert (await job(pool))["status"] == "sent"
    assert len(list(tmp_path.glob("*.eml"))) == 1


async def test_the_folder_transport_writes_a_readable_eml(pool, settings, tmp_path):
    folder = settings.replace(smtp_url="", mail_dir=tmp_path / "outbox")
    transport = mail.transport_from_settings(folder)
    assert isinstance(transport, mail.FolderTransport)
    await enqueue(pool)
    assert await mail_worker.run_once(pool, folder, transport) == 1
    [path] = (tmp_path / "outbox").iterdir()
    assert path.suffix == ".eml"
    assert path.stat().st_mode & 0o777 == 0o600  # mails carry tokens: for the owner only
    message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert message["Message-ID"] == mail.message_id("verify:1", settings.mail_from)
    text, html = parts(message)
    assert TOKEN in text and TOKEN in html
    # A retry of the same job replaces the file instead of adding a second one.
    again = mail.render(
        folder.mail_from, "verify_email", "ana@example.com", CONTEXT, key="verify:1"
    )
    await transport.send(mail.flatten(again))
    assert list((tmp_path / "outbox").iterdir()) == [path]


def test_without_smtp_url_mail_goes_to_the_data_dir(settings, tmp_path):
    transport = mail.transport_from_settings(settings.replace(smtp_url="", data_dir=tmp_path))
    assert isinstance(transport, mail.FolderTransport)
    assert transport.folder == tmp_path / "mail"


def test_html_is_escaped_and_text_is_not():
    context = {**CONTEXT, "name": "<b>Ana & Bo</b>"}
    message = mail.render(Settings().mail_from, "verify_email", "ana@example.com", context)
    text, html = parts(message)
    assert "Hello <b>Ana & Bo</b>" in text
    assert "&lt;b&gt;Ana &amp; Bo&lt;/b&gt;" in html and "<b>Ana" not in html


def test_inline_images_travel_with_the_html_part():
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16
    message = mail.render(
        Settings().mail_from, "verify_email", "a@b.c", CONTEXT, key="k", images={"logo": png}
    )
    related = next(p for p in message.walk() if p.get_content_type() == "multipart/related")
    [image] = [p for p in related.iter_parts() if p.get_content_type() == "image/png"]
    assert image["Content-ID"] == "<logo>"
    assert image.get_content() == png


def test_a_missing_template_variable_is_an_error():
    with pytest.raises(Exception, match="token"):
        mail.render(Settings().mail_from, "verify_email", "a@b.c", {"name": "Ana", "link": "x"})


def test_smtp_urls():
    t = mail.SmtpTransport.from_url("smtp://u%40x:p%2Fw@mail.example:2525?starttls=require")
    assert (t.host, t.port, t.username, t.password) == ("mail.example", 2525, "u@x", "p/w")
    assert (t.implicit_tls, t.starttls, t.verify) == (False, True, True)
    assert "p/w" not in repr(t)
    t = mail.SmtpTransport.from_url("smtp://mail.example?starttls=off")
    assert (t.port, t.starttls, t.username) == (587, False, None)
    assert mail.SmtpTransport.from_url("smtp://mail.example").starttls is None
    t = mail.SmtpTransport.from_url("smtps://mail.example?verify=off")
    assert (t.port, t.implicit_tls, t.starttls, t.verify) == (465, True, False, False)
    for bad in (
        "smtp://mail.example?starttls=maybe",
        "smtp://mail.example?tls=1",
        "smtps://mail.example?starttls=require",
        "smtp://mail.example:port",
        "http://mail.example",
    ):
        with pytest.raises(SettingsError):
            mail.SmtpTransport.from_url(bad)


async def test_the_worker_sends_until_stopped_and_stops_promptly(pool, settings, tmp_path):
    app = SimpleNamespace(
        db=pool,
        settings=settings.replace(mail_dir=tmp_path, mail_poll_interval=30),
        pacer=Pacer(1.0),
    )
    await enqueue(pool, key="verify:a")
    await enqueue(pool, key="verify:b")
    stop = asyncio.Event()
    task = asyncio.create_task(mail_worker.worker(app, mail.FolderTransport(tmp_path))(stop))
    deadline = time.monotonic() + 5
    while len(list(tmp_path.glob("*.eml"))) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert len(list(tmp_path.glob("*.eml"))) == 2
    began = time.monotonic()
    stop.set()
    await asyncio.wait_for(task, 2)
    assert time.monotonic() - began < 1  # the poll wait ends on stop, not after 30 s


def test_mail_rests_while_a_sale_is_on():
    pacer = Pacer(0.25)
    assert pacer.rest_for(0.04) == 0  # no sale: flat out
    pacer.busy()
    assert pacer.rest_for(0.04) == pytest.approx(0.12)  # a quarter of the time
    assert Pacer(1.0).rest_for(0.04) == 0  # unpaced
    pacer.hot_until = 0
    assert pacer.rest_for(0.04) == 0  # the sale is over: catch up
