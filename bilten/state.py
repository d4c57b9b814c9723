"""What the lifespan opens and every handler reads: ``state(request).db`` and friends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from starlette.requests import HTTPConnection

from bilten.batching import Gathered
from bilten.budget import Budget
from bilten.cache import Caches
from bilten.db import Pool
from bilten.helper import Helper
from bilten.holddesk import HoldDesk
from bilten.intake import Recorder
from bilten.media import Storage
from bilten.pacing import Pacer
from bilten.passwords import Passwords
from bilten.payments.resilience import ResilientProvider
from bilten.pipelining import AutoPipeline
from bilten.pubsub import Hub
from bilten.sealing import Keyring
from bilten.sessions import Revocations
from bilten.settings import Settings
from bilten.supervisor import Supervisor
from bilten.tokens import Signer
from bilten.waiters import Waiters


@dataclass(frozen=True)
class State:
    settings: Settings
    db: Pool
    redis: Redis
    pipeline: AutoPipeline  # script calls of concurrent requests, one round trip for all
    intake: Recorder  # accepted booking requests, recorded in one statement per loop turn
    holding: HoldDesk  # holds asked for in one loop turn, made in one transaction
    # Answered charges of every batch in flight, finished together (bilten.sagas.booking).
    finishing: Gathered[str, Any, Any]
    supervisor: Supervisor
    signer: Signer
    keyring: Keyring  # seals secrets kept in the database (bilten.sealing)
    passwords: Passwords
    caches: Caches
    media: Storage
    hub: Hub
    payments: ResilientProvider
    waiters: Waiters
    sessions: Revocations  # revoked session ids, kept current on every instance
    budget: Budget  # the general per-IP request budget (bilten.budget)
    pacer: Pacer  # background work yields to a sale (bilten.pacing)
    helper: Helper  # CPU work off the loop: the booking worker's ticket codes (bilten.helper)
    started_at: float


def state(conn: HTTPConnection) -> State:
    value: Any = conn.scope["state"]["bilten"]  # what ``conn.state.bilten`` reads, directly
    assert isinstance(value, State)
    return value
