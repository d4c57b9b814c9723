"""One WebSocket connection: who it is, its rooms, and its bounded send queue.

Nothing awaits a socket while fanning out. When nothing is queued, :meth:`Connection.offer`
sends at once: the ready-made frame onto the transport (see :mod:`bilten.realtime.wire`), or an
ASGI send, which normally completes without waiting. Only a send that must wait for the socket
to drain goes to a writer task, which then also drains the messages queued behind it and ends
(an idle connection costs no task). A connection whose queue fills up cannot keep up: it is
closed with 1013 (try again later) and its client resubscribes with its last version.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any

from starlette.types import Scope, Send

from bilten.realtime import wire
from bilten.realtime.messages import Frame

log = logging.getLogger(__name__)

TRY_AGAIN_LATER = 1013
POLICY_VIOLATION = 1008
IDLE = 4408  # no message from the client within the idle timeout
SIGNED_OUT = 4401  # the session was revoked or the token expired (send `auth` before expiry)
TOO_MANY = 4429  # too many connections from one address, or messages from one connection
CLOSE_TIMEOUT = 5.0  # how long a close frame may wait behind unread data


class Counters:
    """Figures shared by every connection of the process (read by stats and metrics)."""

    __slots__ = ("closed_idle", "closed_slow", "received", "sent")

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.closed_slow = 0
        self.closed_idle = 0


class Connection:
    __slots__ = (
        "allowance",
        "checked_at",
        "close_code",
        "close_reason",
        "counters",
        "detach",
        "expires_at",
        "last_seen",
        "pending",
        "protocol",
        "queue_max",
        "role",
        "rooms",
        "scope",
        "send",
        "session",
        "user_id",
        "writer",
    )

    def __init__(
        self,
        scope: Scope,
        send: Send,
        counters: Counters,
        queue_max: int,
        detach: Callable[[Connection], None],
    ) -> None:
        self.scope = scope
        self.send = send
        self.protocol = wire.direct(send)  # None: every message through ASGI
        self.counters = counters
        self.queue_max = queue_max
        self.detach = detach  # leave every room and the user channel (synchronous)
        self.user_id: str | None = None
        self.role: str | None = None
        self.session = ""  # of the access token it authenticated with
        self.expires_at = float("inf")  # when that token runs out (unix seconds)
        self.rooms: list[str] = []  # event ids; a list is a third the size of a small set
        # A list, not a deque: an empty deque takes 600 bytes, times every idle connection.
        self.pending: list[Frame] = []
        self.writer: asyncio.Task[None] | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self.last_seen = time.monotonic()
        self.allowance = math.inf  # messages it may still send now (a token bucket, full)
        self.checked_at = self.last_seen

    def take(self, rate: int) -> bool:
        """Count one message against ``rate`` a second, in bursts of twice that."""
        now = time.monotonic()
        self.allowance = min(2.0 * rate, self.allowance + (now - self.checked_at) * rate)
        self.checked_at = now
        if self.allowance < 1:
            return False
        self.allowance -= 1
        return True

    @property
    def open(self) -> bool:
        return self.close_code is None

    def offer(self, frame: Frame) -> bool:
        """Send or queue a message; False when the connection is closing (now or already)."""
        if self.close_code is not None:
            return False
        if self.writer is None:
            protocol = self.protocol
            if protocol is not None and wire.writable(protocol):
                protocol.transport.write(frame.wire)  # the same bytes for every socket
                self.counters.sent += 1
                return True
            return self._send_now(frame)
        if len(self.pending) >= self.queue_max:
            self.counters.closed_slow += 1
            self.close(TRY_AGAIN_LATER, "too slow: resubscribe with your last version")
            return False
        self.pending.append(frame)
        return True

    def offer_all(self, frames: list[Frame], joined: bytes) -> bool:
        """Several frames, ``joined`` their wire bytes: one write when the socket takes them at
        once, else one by one as :meth:`offer` does."""
        if self.close_code is None and self.writer is None:
            protocol = self.protocol
            if protocol is not None and wire.writable(protocol):
                protocol.transport.write(joined)
                self.counters.sent += len(frames)
                return True
        for frame in frames:
            if not self.offer(frame):
                return False
        return True

    def _send_now(self, frame: Frame) -> bool:
        """Nothing is queued: start the send here. It usually completes at once (the socket
        takes the bytes), which spares a task per message per socket; a send that has to wait
        for the socket to drain is finished by the writer task, and later messages queue."""
        sending = self.send(frame.event)
        if not isinstance(sending, types.CoroutineType):
            self.writer = asyncio.get_running_loop().create_task(self._write(sending))
            return True
        try:
            blocked = sending.send(None)
        except StopIteration:
            self.counters.sent += 1
            return True
        except Exception as exc:
            self._failed(exc)
            return False
        self.writer = asyncio.get_running_loop().create_task(self._write(_Resume(sending, blocked)))
        return True

    def close(self, code: int, reason: str, *, flush: bool = False) -> None:
        """Close soon: the close frame goes after what is queued (``flush``) or instead of it."""
        if self.close_code is not None:
            return
        self.close_code = code
        self.close_reason = reason
        if not flush:
            self.pending.clear()
        self.detach(self)
        if self.writer is None:
            self.writer = asyncio.get_running_loop().create_task(self._write())

    async def _write(self, first: Awaitable[None] | None = None) -> None:
        send = self.send
        try:
            if first is not None:
                await first
                self.counters.sent += 1
            while self.pending:
                await send(self.pending.pop(0).event)
                self.counters.sent += 1
            if self.close_code is not None:
                # Bounded: a peer that reads nothing never lets the frame out.
                await asyncio.wait_for(
                    send(
                        {
                            "type": "websocket.close",
                            "code": self.close_code,
                            "reason": self.close_reason,
                        }
                    ),
                    CLOSE_TIMEOUT,
                )
        except Exception as exc:
            self._failed(exc)
        finally:
            self.writer = None

    def _failed(self, exc: Exception) -> None:
        # The peer went away; the receive loop sees the disconnect and cleans up.
        log.debug("send failed: %r", exc)
        self.pending.clear()
        if self.close_code is None:
            self.close_code = 1006
            self.detach(self)

    async def finish(self) -> None:
        """The socket is gone: stop writing."""
        if self.close_code is None:
            self.close_code = 1006
        self.pending.clear()
        writer = self.writer
        if writer is not None and writer is not asyncio.current_task():
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)


class _Resume:
    """Awaits a coroutine that was started by hand and is now waiting on ``blocked``."""

    __slots__ = ("blocked", "coroutine")

    def __init__(self, coroutine: Coroutine[Any, Any, None], blocked: Any) -> None:
        self.coroutine = coroutine
        self.blocked = blocked

    def __await__(self) -> Generator[Any, None, None]:
        try:
            yield self.blocked  # the awaiting task waits for what the coroutine waits for
        except BaseException:
            self.coroutine.close()
            raise
        return (yield from self.coroutine.__await__())
