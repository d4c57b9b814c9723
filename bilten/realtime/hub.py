"""The process's WebSocket hub: connections, rooms and mailboxes, bridged to Redis pub/sub.

A room or mailbox holds a pub/sub subscription only while it has local connections (a room
lingers a little after its last one leaves, so a client that reconnects at once still finds
its history). Joining a room waits for the subscription, then takes the room's snapshot: read
after subscribing, so every later change arrives as a delta, and shared by everyone who joins
while it is recent. When the pub/sub connection comes back after a loss, every room reloads its
snapshot and sends it to its members, since deltas may have been missed meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import HTTPConnection
from starlette.types import Receive, Scope, Send

from bilten import keys, ratelimit, seatmap, security
from bilten.errors import ApiError
from bilten.pubsub import Hub
from bilten.realtime import messages, stats
from bilten.realtime.connection import (
    IDLE,
    POLICY_VIOLATION,
    SIGNED_OUT,
    TOO_MANY,
    Connection,
    Counters,
)
from bilten.realtime.rooms import Mailbox, Room, Snapshot
from bilten.settings import Settings
from bilten.supervisor import Worker

if TYPE_CHECKING:
    from bilten.state import State

log = logging.getLogger(__name__)

LINGER = 15.0  # seconds an empty room keeps its subscription and history
REPLAY_MAX = 32  # deltas since the shared snapshot a joiner may be sent instead of a fresh one
TICK = 1.0  # idle sweep and queue-counter broadcast period (at most one broadcast a second)
RECHECK = 2.0  # seconds "no such event" is answered without asking the database again


class Realtime:
    def __init__(self, settings: Settings, hub: Hub) -> None:
        self.settings = settings
        self.hub = hub
        self.connections: set[Connection] = set()
        self.per_address: Counter[str] = Counter()  # open connections by client address
        self.rooms: dict[str, Room] = {}
        self.mailboxes: dict[str, Mailbox] = {}
        self.counters = Counters()
        self.authenticated = 0
        self.linger = LINGER
        self.exported: dict[str, int] = {}  # counters as last given to Prometheus
        self._background: set[asyncio.Task[Any]] = set()

    # Connections

    async def serve(
        self,
        app: State,
        who: security.Principal | None,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        """Accept a WebSocket and run it until it closes."""
        if (await receive())["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        # Every frame under this connection keeps the scope while it lives: what only the
        # handshake needed goes (the access token in the query string with it).
        scope["headers"] = []
        scope["query_string"] = b""
        client = scope.get("client")
        address = ratelimit.subject(client[0]) if client else ""
        if self.per_address[address] >= self.settings.ws_max_per_ip:
            reason = "too many connections from one address"
            await send({"type": "websocket.close", "code": TOO_MANY, "reason": reason})
            return
        connection = Connection(
            scope, send, self.counters, self.settings.ws_send_queue, self.detach
        )
        self.per_address[address] += 1
        self.connections.add(connection)
        try:
            if who is not None:
                await self._identify(connection, who)
            connection.offer(
                messages.encode(
                    messages.Hello(
                        instance=self.settings.instance_id,
                        user_id=connection.user_id,
                        idle_timeout=self.settings.ws_idle_timeout,
                        max_subscriptions=self.settings.ws_max_subscriptions,
                        max_message=self.settings.ws_max_message,
                    )
                )
            )
            while True:
                message = await receive()
                if message["type"] != "websocket.receive":
                    break
                self.counters.received += 1
                connection.last_seen = time.monotonic()
                if connection.open and not connection.take(self.settings.ws_max_rate):
                    connection.close(TOO_MANY, "too many messages", flush=True)
                if connection.open:
                    await self._handle(app, connection, message)
        finally:
            self.per_address[address] -= 1
            if not self.per_address[address]:
                del self.per_address[address]
            self.connections.discard(connection)
            self.detach(connection)
            if connection.user_id is not None:
                self.authenticated -= 1
            await connection.finish()

    async def _identify(self, connection: Connection, who: security.Principal) -> None:
        connection.user_id = who.user_id
        connection.role = who.role
        connection.session = who.session
        connection.expires_at = who.expires_at
        self.authenticated += 1
        mailbox = self.mailboxes.get(who.user_id)
        if mailbox is None:
            mailbox = self.mailboxes[who.user_id] = Mailbox(who.user_id)
            mailbox.connections.append(connection)
            await self._subscribe(mailbox.channel, mailbox.handler)
        else:
            mailbox.connections.append(connection)

    def detach(self, connection: Connection) -> None:
        """Leave every room and the mailbox; unsubscribing follows in the background."""
        for event_id in tuple(connection.rooms):
            self._leave(connection, event_id)
        if connection.user_id is None:
            return
        mailbox = self.mailboxes.get(connection.user_id)
        if mailbox is None or connection not in mailbox.connections:
            return
        mailbox.connections.remove(connection)
        if not mailbox.connections:
            del self.mailboxes[connection.user_id]
            self._spawn(self.hub.unsubscribe(mailbox.channel, mailbox.handler))

    # Client messages

    async def _handle(self, app: State, connection: Connection, message: Any) -> None:
        raw: str | bytes | None = message.get("text")
        if raw is None:
            raw = message.get("bytes") or b""
        limit = self.settings.ws_max_message
        if len(raw) > limit or (
            isinstance(raw, str) and len(raw) * 4 > limit and len(raw.encode()) > limit
        ):
            connection.offer(
                messages.error("message_too_large", f"Messages are limited to {limit} bytes.")
            )
            return
        try:
            request = messages.decode(raw)
        except msgspec.DecodeError as exc:
            connection.offer(
                messages.error("bad_request", f"Not a message this server knows: {exc}.")
            )
            return
        try:
            if isinstance(request, messages.Ping):
                connection.offer(messages.PONG)
            elif isinstance(request, messages.Subscribe):
                await self._on_subscribe(app, connection, request)
            elif isinstance(request, messages.Unsubscribe):
                self._on_unsubscribe(connection, request)
            else:
                await self._on_auth(app, connection, request)
        except Exception:
            log.exception("realtime message %s failed", type(request).__name__)
            connection.offer(
                messages.error("unavailable", "That could not be done just now; try again.")
            )

    async def _on_auth(self, app: State, connection: Connection, request: messages.Auth) -> None:
        try:
            who = security.principal_from_token(HTTPConnection(connection.scope), request.token)
        except ApiError as exc:
            connection.offer(messages.error(exc.code, exc.message))
            connection.close(POLICY_VIOLATION, "invalid token", flush=True)
            return
        if connection.user_id is None:
            await self._identify(connection, who)
        elif who.user_id == connection.user_id:
            # A fresh token for the same user: the connection lives on with its session.
            connection.role = who.role
            connection.session = who.session
            connection.expires_at = who.expires_at
        else:
            connection.offer(messages.error("bad_request", "This connection is someone else's."))
            return
        connection.offer(messages.encode(messages.Authenticated(user_id=who.user_id)))

    def sign_out(self, app: State, now: float) -> None:
        """Close authenticated connections whose token expired or whose session was revoked
        (4401): personal messages stop with the session."""
        for connection in tuple(self.connections):
            if connection.user_id is None or not connection.open:
                continue
            if connection.expires_at <= now or connection.session in app.sessions:
                connection.close(SIGNED_OUT, "signed out: the session ended", flush=True)

    def _on_unsubscribe(self, connection: Connection, request: messages.Unsubscribe) -> None:
        event_id = messages.room_event(request.room)
        if event_id is not None:
            self._leave(connection, event_id)
        connection.offer(messages.encode(messages.Unsubscribed(room=request.room)))

    async def _on_subscribe(
        self, app: State, connection: Connection, request: messages.Subscribe
    ) -> None:
        event_id = messages.room_event(request.room)
        if event_id is None:
            connection.offer(
                messages.error("bad_request", "Rooms are named event:<event id>.", request.room)
            )
            return
        if (
            event_id not in connection.rooms
            and len(connection.rooms) >= self.settings.ws_max_subscriptions
        ):
            connection.offer(
                messages.error(
                    "too_many_subscriptions",
                    f"At most {self.settings.ws_max_subscriptions} rooms per connection.",
                    request.room,
                )
            )
            return
        room = self.rooms.get(event_id)
        if room is None:
            # Opening a room costs a Redis subscription and a database read: it counts against
            # the client's per-IP API budget, as a request would (joining an open one is free),
            # so a stream of made-up event ids costs what the same stream of requests would.
            client = connection.scope.get("client")
            outcome = await app.budget.hit(ratelimit.subject(client[0]) if client else "-")
            if not outcome.allowed:
                message = f"Too many requests; try again in {outcome.retry_after} s."
                connection.offer(messages.error("rate_limited", message, request.room))
                return
            room = self.rooms.get(event_id)  # opened by someone else meanwhile?
        if room is None:
            room = self.rooms[event_id] = Room(event_id, self.settings.ws_history)
            room.opening = asyncio.create_task(self._subscribe(room.channel, room.handler))
        if room.linger is not None:
            room.linger.cancel()
            room.linger = None
        room.joining += 1
        try:
            await self._join(app, connection, room, request)
        finally:
            room.joining -= 1
            if room.empty:
                self._vacate(room)

    async def _join(
        self, app: State, connection: Connection, room: Room, request: messages.Subscribe
    ) -> None:
        snapshot = await self._snapshot(app, room)
        if snapshot is not None and not snapshot.visible_to(connection):
            snapshot = await self._snapshot(app, room, fresh=True)  # published meanwhile?
        if snapshot is None or not snapshot.visible_to(connection):
            connection.offer(messages.error("not_found", "No such event.", request.room))
            return
        if not connection.open:
            return
        # From here on nothing awaits: what it is given and membership agree. A version past
        # any this room has seen is not the client's (made up, or of an event made again): it
        # gets a snapshot, as one from before the history does.
        since = request.version
        latest = max(snapshot.version, room.history.latest or 0)
        if since is not None and since <= latest and room.history.reaches(since):
            frames = room.catch_up(None, room.history.after(since), request.indexed)
            version = since
        else:
            missed = room.history.after(snapshot.version, snapshot.mark)
            frames = room.catch_up(snapshot.frame, missed, request.indexed, since is not None)
            version = snapshot.version
        for frame in frames:
            if not connection.offer(frame):
                return
        version = max(version, room.history.latest or 0)
        room.join(connection, request.indexed)
        if room.event_id not in connection.rooms:
            connection.rooms.append(room.event_id)
        connection.offer(
            messages.encode(messages.Subscribed(room=f"event:{room.event_id}", version=version))
        )

    def _leave(self, connection: Connection, event_id: str) -> None:
        if event_id in connection.rooms:
            connection.rooms.remove(event_id)
        room = self.rooms.get(event_id)
        if room is not None:
            room.leave(connection)
            if room.empty:
                self._vacate(room)

    # Rooms

    async def _snapshot(self, app: State, room: Room, *, fresh: bool = False) -> Snapshot | None:
        """A snapshot every later delta of the room's history follows; None: no such event."""
        if room.opening is not None:
            await asyncio.shield(room.opening)
        if room.missing and time.monotonic() - room.loaded_at < RECHECK:
            # Asked again within moments: a stream of subscriptions to an unknown event is
            # answered from what was just read, not with a query each.
            return None
        for _ in range(3):
            current = room.snapshot
            if (
                not fresh
                and current is not None
                and room.history.reaches(current.version)
                and room.history.clock - current.mark <= min(REPLAY_MAX, room.history.limit)
            ):
                return current
            fresh = False
            if room.refreshing is None:
                room.refreshing = asyncio.create_task(self._load(app, room))
            loaded = await asyncio.shield(room.refreshing)
            if loaded is None:
                return None
        return room.snapshot

    async def _load(self, app: State, room: Room) -> Snapshot | None:
        mark = room.history.clock
        room.loaded_at = time.monotonic()
        try:
            encoded = await seatmap.seat_map(app, room.event_id)
        finally:
            room.refreshing = None
        if encoded is None:
            room.missing = True
            room.snapshot = None
            return None
        room.missing = False
        snapshot = Snapshot(
            encoded.version,
            mark,
            messages.snapshot(encoded.body),
            encoded.status,
            encoded.organizer_id,
        )
        if room.history.floor is None:
            room.history.anchor(snapshot.version)  # read after subscribing: nothing falls between
        if room.snapshot is None or snapshot.mark >= room.snapshot.mark:
            room.snapshot = snapshot
        return snapshot

    def _vacate(self, room: Room) -> None:
        if room.linger is None:
            delay = RECHECK if room.missing else self.linger
            room.linger = asyncio.get_running_loop().call_later(delay, self._close_room, room)

    def _close_room(self, room: Room) -> None:
        room.linger = None
        if not room.empty or self.rooms.get(room.event_id) is not room:
            return
        del self.rooms[room.event_id]
        room.news.cancel()
        self._spawn(self.hub.unsubscribe(room.channel, room.handler))

    async def _subscribe(self, channel: str, handler: Any) -> None:
        try:
            await self.hub.subscribe(channel, handler)
        except Exception:
            # The handler stays registered: the hub subscribes it when it reconnects.
            log.warning("could not subscribe to %s yet", channel, exc_info=True)

    def on_redis_connect(self, app: State) -> None:
        """Deltas may have been lost while the pub/sub connection was down: resend snapshots."""
        for room in self.rooms.values():
            room.history.forget()
        if self.rooms:
            self._spawn(self._resync(app))

    async def _resync(self, app: State) -> None:
        for room in list(self.rooms.values()):
            try:
                snapshot = await self._snapshot(app, room)
            except Exception:
                log.warning("could not reload the seat map of %s", room.event_id, exc_info=True)
                continue
            if snapshot is not None:
                room.broadcast(snapshot.frame, snapshot=True)
                for frame in room.history.after(snapshot.version, snapshot.mark):
                    room.broadcast(frame, delta=True)

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # Housekeeping

    def sweep_idle(self, now: float) -> None:
        deadline = now - self.settings.ws_idle_timeout
        for connection in tuple(self.connections):
            if connection.last_seen < deadline and connection.open:
                self.counters.closed_idle += 1
                connection.close(IDLE, "idle timeout: send a ping now and then", flush=True)

    async def broadcast_served(self, app: State) -> None:
        """Each event's queue counter to its room when it moved: clients derive positions."""
        rooms = [room for room in self.rooms.values() if room.members]
        if not rooms:
            return
        # One GET each, not MGET: on a Redis Cluster the events' counters live in many slots.
        async with app.redis.pipeline(transaction=False) as pipe:
            for room in rooms:
                pipe.get(keys.queue_served(room.event_id))
            values = await pipe.execute()
        for room, raw in zip(rooms, values, strict=True):
            served = int(raw or 0)
            if served != room.served:
                room.served = served
                room.broadcast(
                    messages.encode(messages.QueueServed(event_id=room.event_id, served=served))
                )

    def worker(self, app: State) -> Worker:
        async def run(stop: asyncio.Event) -> None:
            while not stop.is_set():
                self.sweep_idle(time.monotonic())
                self.sign_out(app, time.time())
                await self.broadcast_served(app)
                stats.export(self)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), TICK)

        return run
