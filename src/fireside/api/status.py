"""A pure ASGI wrapper that counts completion responses by HTTP status.

Pure ASGI rather than a Starlette BaseHTTPMiddleware: that one runs the route in
a separate task, which hides a client's disconnect from streaming responses.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter

Scope = dict[str, Any]


class StatusCounter:
    def __init__(self, app: Any, counter: Counter, suffix: str = "/completions") -> None:
        self.app = app
        self.counter = counter
        self.suffix = suffix

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].endswith(self.suffix):
            await self.app(scope, receive, send)
            return

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.counter.labels(str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
