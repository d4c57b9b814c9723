"""The WebSocket hub: live seat maps and personal messages, on every instance.

``hub``: connections, rooms and mailboxes bridged to Redis pub/sub; ``connection``: one socket
and its bounded send queue; ``wire``: ready-made frames straight to uvicorn's transport;
``rooms``: what one pub/sub message fans out to; ``history``: recent deltas for resubscribing
clients; ``messages``: the protocol; ``stats``: figures for the heartbeat, Prometheus and
``/realtime/stats``.
"""

from bilten.realtime.hub import Realtime

__all__ = ["Realtime"]
