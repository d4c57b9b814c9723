"""Revoked sessions kept in memory (bilten.sessions), against a real Redis."""

from __future__ import annotations

import time

from bilten import sessions
from bilten.sessions import Revocations


async def test_revocations_that_no_longer_matter_are_swept_once_the_table_doubles(
    redis, monkeypatch
):
    monkeypatch.setattr(sessions, "SWEEP_ABOVE", 4)
    revoked = Revocations(redis, keep=60)
    await revoked.revoke([f"live-{n}" for n in range(6)])
    # Past the threshold with every revocation still in force: all kept, next sweep at 12.
    await revoked.revoke(["live-6"])
    assert revoked.sweep_above == 12
    assert all(f"live-{n}" in revoked for n in range(7))
    for sid in ("live-0", "live-1"):
        revoked.ended[sid] = time.time() - 1  # their tokens expired
    assert "live-0" not in revoked
    await revoked.revoke([f"more-{n}" for n in range(6)])  # 13 remembered: no sweep yet
    assert len(revoked.ended) == 13
    await revoked.revoke(["last"])  # past 12: the two expired go, 11 kept
    assert "live-0" not in revoked.ended and "live-1" not in revoked.ended
    assert len(revoked.ended) == 12
    assert revoked.sweep_above == 22
    assert all(sid in revoked for sid in ["live-6", "more-5", "last"])


async def test_listeners_hear_of_a_revoked_session_once(redis):
    revoked = Revocations(redis, keep=60)
    heard: list[set[str]] = []
    revoked.listeners.append(heard.append)
    await revoked.revoke(["s1", "s2"])
    await revoked.revoke(["s1"])  # the same logout again
    revoked._on_message(b"s1 s2")  # this instance's own announcement, back from Redis
    await revoked.revoke(["s2", "s3"])
    assert heard == [{"s1", "s2"}, {"s3"}]
    assert all(sid in revoked for sid in ("s1", "s2", "s3"))
