"""Prompt prefixes as chained block hashes: what the router matches and replicas report.

A prompt's token ids are cut into blocks of `BLOCK_TOKENS` from position 0; block
i's hash covers every token before its end (each hash chains the previous one),
so two prompts share their first k hashes exactly when they share their first
k * BLOCK_TOKENS tokens. Token ids, not text: a token-id prompt routes like the
text that tokenizes to it. The chain starts from the request's cache-isolation
key, so prefixes of different tenants never match (they could not share KV on a
replica either). Hashes of int tuples are the same in every Python process (only
str and bytes hashes are salted per process), which is what lets the ingress and
the replicas compare them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Container, Iterable, Sequence

# Fireside's prefix cache reuses any prefix of at least MIN_CACHE_HIT (16) tokens;
# blocks of 16 tokens lose at most 15 tokens of a match to the rounding.
BLOCK_TOKENS = 16
# A replica reports at most this many hashes (blocks of 16: ~32k distinct cached tokens).
MAX_REPORTED = 2048


def _seed(isolation_key: str | None) -> int:
    if isolation_key is None:
        return 0
    digest = hashlib.blake2b(isolation_key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def block_hashes(tokens: Sequence[int], isolation_key: str | None = None) -> list[int]:
    """One hash per whole block of the prompt, in order."""
    hashes = []
    h = _seed(isolation_key)
    for start in range(0, len(tokens) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        h = hash((h, *tokens[start : start + BLOCK_TOKENS]))
        hashes.append(h)
    return hashes


def matched_blocks(hashes: Sequence[int], *held: Container[int]) -> int:
    """How many of the prompt's leading blocks some of `held` hold."""
    n = 0
    for h in hashes:
        if not any(h in have for have in held):
            break
        n += 1
    return n


def report(prompts: Iterable[tuple[Sequence[int], str | None]]) -> list[int]:
    """The hashes a replica reports for the prompts it holds (cached or running),
    most recent first, at most MAX_REPORTED."""
    seen: dict[int, None] = {}
    for tokens, isolation_key in prompts:
        for h in block_hashes(tokens, isolation_key):
            seen.setdefault(h)
            if len(seen) >= MAX_REPORTED:
                return list(seen)
    return list(seen)
