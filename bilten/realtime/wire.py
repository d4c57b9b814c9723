"""Ready-made frames straight onto uvicorn's transport, when it is safe to.

Through ASGI, every message to every socket is framed again: the text encoded, a frame object
built and serialised, by Python code that costs more than the write itself. But a server's text
frame is the same bytes for every socket when it is neither masked (server frames never are)
nor compressed (the hub turns per-message deflate off), so the hub builds it once per message
(:class:`bilten.realtime.messages.Frame`) and, on uvicorn's sans-I/O WebSocket protocol, writes
those bytes to the socket's transport itself, while the transport takes them without waiting.

Everything else goes through ASGI as usual: the handshake, closing, and any send that has to
wait for a slow reader (with the messages queued behind it). :func:`direct` finds the protocol
behind the ASGI ``send`` and checks that it is the one this was written against (or
:class:`bilten.realtime.protocol.LeanWebSocketProtocol`, built on it); any other server, or
another uvicorn protocol, gets ASGI only.
"""

from __future__ import annotations

from typing import Any

from starlette.types import Send

_SANSIO = ("uvicorn.protocols.websockets.websockets_sansio_impl", "WebSocketsSansIOProtocol")
_NEEDED = ("transport", "writable", "close_sent", "conn")


def direct(send: Send) -> Any | None:
    """The uvicorn protocol object whose transport may take our frames; None: use ASGI."""
    protocol: Any = getattr(send, "__self__", None)
    if not any((kind.__module__, kind.__name__) == _SANSIO for kind in type(protocol).__mro__):
        return None
    if not all(hasattr(protocol, name) for name in _NEEDED):
        return None
    if getattr(protocol.conn, "extensions", None) != []:
        return None  # compression was negotiated: frames differ from socket to socket
    return protocol


def writable(protocol: Any) -> bool:
    """Whether a frame written now goes out at once, after everything sent before it."""
    return bool(
        protocol.writable.is_set()
        and not protocol.close_sent
        and not protocol.transport.is_closing()
    )
