"""Places in an event's booking queue, pushed without a message per waiting user per change.

A request's place is ``ticket - served``. On enqueue its owner is told the position and the
ticket; afterwards each instance broadcasts the event's ``served`` counter to the room when it
moves (at most once a second, see :meth:`bilten.realtime.hub.Realtime.broadcast_served`), and
clients work out their own position from it.
"""

from __future__ import annotations

import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError

from bilten import keys

log = logging.getLogger(__name__)

# KEYS: the request's status hash, the user's channel. ARGV: request id, event id, position.
# One round trip: the ticket is read where it lives and the message published from there.
_ANNOUNCE = """
local ticket = redis.call('HGET', KEYS[1], 'ticket')
if not ticket then return 0 end
return redis.call('PUBLISH', KEYS[2], '{"type":"queue.position","request_id":"' .. ARGV[1] ..
    '","event_id":"' .. ARGV[2] .. '","position":' .. ARGV[3] .. ',"ticket":' .. ticket .. '}')
"""


async def announce(
    redis: Redis, user_id: str, request_id: str, event_id: str, position: int
) -> None:
    """Tell the user's connections, wherever they are, where a new request stands."""
    try:
        await redis.eval(
            _ANNOUNCE,
            2,
            keys.booking_request(request_id),
            keys.user_channel(user_id),
            request_id,
            event_id,
            int(position),
        )
    except RedisError:
        log.warning("could not announce the queue position of %s", request_id)
