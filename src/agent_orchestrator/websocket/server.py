"""How uvicorn must run for the gateway: the settings that only the server can enforce
(message size, protocol pings, proxy headers) and one fix to its WebSocket protocol.

The fix: when the application closes a socket whose peer has stopped reading, stock
uvicorn waits for the peer to drain its send buffer before writing the close frame, and a
transport closed with data still buffered is kept until that data is written, so a client
that never reads keeps its socket and buffers for as long as it likes (a slow-consumer
or dead-peer leak; RFC 6455 section 7.1.1 lets the server drop the TCP connection
instead). `GatewayWebSocketProtocol` aborts the connection in those two cases.
"""

from __future__ import annotations

import gc
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from agent_orchestrator.config import Settings


def _stalled(protocol: WebSocketsSansIOProtocol) -> bool:
    transport = protocol.transport
    return bool(transport is not None and transport.get_write_buffer_size() > 0)


class GatewayWebSocketProtocol(WebSocketsSansIOProtocol):
    async def send(self, message: Any) -> None:
        closing = (
            message.get("type") == "websocket.close"
            and self.handshake_complete
            and not self.close_sent
        )
        if closing and not self.writable.is_set():
            # The peer is not reading: a close frame would wait behind what it never
            # read. Drop the connection; connection_lost() tells the application.
            self.close_sent = True
            self.transport.abort()
            return
        await super().send(message)
        if closing and self.close_timer is not None:
            # uvicorn then waits for the peer's close reply and, after close_timeout,
            # closes gracefully (which again waits for the peer to read): abort instead.
            self.close_timer.cancel()
            self.close_timer = self.loop.call_later(self.close_timeout, self.transport.abort)

    def keepalive_timeout(self) -> None:
        super().keepalive_timeout()  # writes 1011 and closes, but only once flushed
        if _stalled(self):
            self.transport.abort()


def server_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.Config` (serve, tests and benchmarks use the same)."""
    options: dict[str, Any] = {
        "ws_max_size": settings.ws_max_frame_bytes,  # bigger messages: close 1009
        "ws_ping_interval": settings.ws_ping_interval,
        "ws_ping_timeout": settings.ws_ping_timeout,
        # Compression costs ~100 KiB+ of zlib state per socket (uvicorn#1862) and opens
        # compression-ratio attacks; events are small JSON.
        "ws_per_message_deflate": False,
        # X-Forwarded-For is believed only from TRUSTED_PROXIES; uvicorn's own default
        # would trust 127.0.0.1, letting any local client pick its per-IP bucket.
        "proxy_headers": bool(settings.trusted_proxies),
        "forwarded_allow_ips": settings.trusted_proxies or None,
        "ws": GatewayWebSocketProtocol,
        # On SIGTERM uvicorn waits for open responses before the lifespan's shutdown,
        # which is where an in-process worker stops: an SSE stream left open would hold
        # the process up (and its worker claiming) without end. It gets SHUTDOWN_GRACE.
        "timeout_graceful_shutdown": settings.shutdown_grace,
    }
    return options


def tune_collector() -> None:
    """For a serving or worker process, once its modules are imported: those objects move
    to the permanent generation (gc.freeze), so full collections no longer walk them;
    and the young generation is collected after 50,000 allocations
    instead of 700. A 1,000-socket fan-out allocates ~10,000 short-lived objects (sender
    tasks, frames) that die within the burst; with the default threshold, collections in
    mid-burst promoted them, which soon triggered full collections of every long-lived
    object (~130 per open socket): measured 100-200 ms pauses at 1,000 sockets, the p99 of
    the fan-out benchmark. With this threshold they die young; a young collection costs a
    few milliseconds. A chat turn allocates a few thousand short-lived objects too: the
    same threshold cut ~0.4 ms of CPU per embedded turn (~8%)."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
