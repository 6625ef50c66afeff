"""Bearer-key authentication, as a FastAPI dependency."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from fastapi import Request

from fireside.api.errors import APIError


class BearerAuth:
    """Accepts `Authorization: Bearer <key>` for any configured key; no keys means open."""

    def __init__(self, api_keys: Sequence[str]) -> None:
        self._keys = [key.encode() for key in api_keys if key]

    @property
    def is_open(self) -> bool:
        return not self._keys

    @property
    def num_keys(self) -> int:
        return len(self._keys)

    async def __call__(self, request: Request) -> None:
        if self.is_open:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not self.is_valid(given.strip()):
            raise APIError.unauthorized()

    def is_valid(self, key: str) -> bool:
        given = key.encode()
        # Compare against every key, without stopping at a match, so the time taken
        # says nothing about which key (or how much of one) was right.
        is_match = False
        for known in self._keys:
            is_match |= hmac.compare_digest(given, known)
        return is_match
