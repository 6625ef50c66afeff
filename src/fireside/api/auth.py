"""Bearer-key authentication, as a FastAPI dependency."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence

from fastapi import Request

from fireside.api.errors import APIError

# Digests of API keys are salted per process: they only need to tell tenants apart
# within one server's lifetime, and then no digest says anything about a key.
_TENANT_SALT = secrets.token_bytes(16)


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

    def tenant_of(self, request: Request) -> str | None:
        """A digest of the key the request authenticated with (it passed `__call__`);
        None while auth is off. Never the key itself, so it is safe to keep."""
        if self.is_open:
            return None
        _, _, given = request.headers.get("authorization", "").partition(" ")
        digest = hashlib.blake2b(given.strip().encode(), key=_TENANT_SALT, digest_size=16)
        return digest.hexdigest()

    def is_valid(self, key: str) -> bool:
        given = key.encode()
        # Compare against every key, without stopping at a match, so the time taken
        # says nothing about which key (or how much of one) was right.
        is_match = False
        for known in self._keys:
            is_match |= hmac.compare_digest(given, known)
        return is_match
