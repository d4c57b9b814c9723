"""The helper process: work runs there once it is up, here before and when it dies."""

import asyncio
import os
import signal
import time
import uuid

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from bilten import ticketcodes
from bilten.helper import Helper


async def until(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_work_runs_in_the_helper_and_here_while_it_is_down():
    helper = Helper()
    assert await helper.run(os.getpid) == os.getpid()  # not started: here
    task = asyncio.create_task(helper.worker()(asyncio.Event()))
    await until(lambda: helper.executor is not None)
    first = await helper.run(os.getpid)
    assert first != os.getpid()
    os.kill(first, signal.SIGKILL)
    # The job that finds it dead is done here; the worker ends, for its supervisor to start
    # it again.
    assert await helper.run(os.getpid) == os.getpid()
    with pytest.raises(RuntimeError, match="died"):
        await asyncio.wait_for(task, 10)
    assert helper.executor is None
    stop = asyncio.Event()
    task = asyncio.create_task(helper.worker()(stop))
    try:
        await until(lambda: helper.executor is not None)
        assert await helper.run(os.getpid) not in (first, os.getpid())
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert helper.executor is None
    assert await helper.run(os.getpid) == os.getpid()


async def test_codes_signed_in_the_helper_verify_with_the_events_public_key():
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    event_id = str(uuid.uuid4())
    ticket_ids = [str(uuid.uuid4()) for _ in range(50)]
    helper = Helper()
    stop = asyncio.Event()
    task = asyncio.create_task(helper.worker()(stop))
    try:
        await until(lambda: helper.executor is not None)
        codes = await helper.run(
            ticketcodes.sign_many, key.private_bytes_raw(), event_id, ticket_ids
        )
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert codes == ticketcodes.sign_many(key.private_bytes_raw(), event_id, ticket_ids)
    for ticket_id, code in zip(ticket_ids, codes, strict=True):
        parsed = ticketcodes.parse(code)
        assert parsed is not None
        assert (parsed.ticket_id, parsed.event_id) == (ticket_id, event_id)
        assert ticketcodes.verify(public, parsed)
    other = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert not ticketcodes.verify(other, ticketcodes.parse(codes[0]))
