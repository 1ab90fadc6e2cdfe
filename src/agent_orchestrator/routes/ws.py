"""`/ws/v1`: the real-time gateway (protocol in docs/realtime.md, code in websocket/).

A plain ASGI endpoint rather than a FastAPI websocket route: the gateway authenticates
inside the protocol (first message or `bearer` subprotocol), after checks a dependency
cannot make before the handshake, and it needs the server's own `send`/`receive`.
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.types import Receive, Scope, Send

PATH = "/ws/v1"


class _GatewayEndpoint:
    # An instance, not a function: Starlette then hands it the raw ASGI callables.
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway = scope["app"].state.websockets
        await gateway(scope, receive, send)


router = APIRouter(tags=["realtime"])
router.add_websocket_route(PATH, _GatewayEndpoint(), name="websocket_gateway")  # type: ignore[arg-type]
