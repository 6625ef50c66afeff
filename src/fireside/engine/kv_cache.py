"""The KV cache as the scheduler spends it: sequence ids, cells, and cached prefixes.

`KVCache` hands out llama.cpp sequence ids (slots), keeps the exact count of
cells in use (`kv.KVLedger`), and decides what stays in the prefix cache when a
sample finishes: its KV stays under its own sequence id, bounded by entries
and by idle cells, least recently used first out. A prefix is shared only
between requests with the same isolation key (None matches only None). It calls
the runner through two callbacks only, `release` and `copy`, so it runs without
a model in tests.

With a stream of cells per sequence id (`streams`, llama.cpp without a unified
cache) a fork copies a whole stream, cached entries cost running sequences
nothing (bounded by entries only), and which id a new sample gets matters:
llama.cpp computes a batch in one pass per run of consecutive sequence ids, so
`take_slot` keeps running samples on adjacent ids, taking a cached entry's id
over in place (no copy) when that is as good, and moving an entry out of the way
when its id is the one to fill.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fireside.engine.kv import CacheEntry, KVLedger, PrefixCache, common_prefix
from fireside.engine.request import Sample
from fireside.runner.base import ImageSpan


@dataclass
class PrefixHit:
    src: int  # sequence id holding the prefix
    length: int
    entry: CacheEntry | None  # when the prefix comes from the prefix cache


class KVCache:
    def __init__(
        self,
        num_slots: int,
        max_entries: int,
        max_idle_cells: int,
        min_prefix: int,
        release: Callable[[int, int], None],
        copy: Callable[[int, int, int], None],
        streams: bool = False,
    ) -> None:
        self.streams = streams
        self.num_slots = num_slots
        self._release = release  # (slot, start): drops a sequence id's cells from start on
        self._copy = copy  # (src, dst, length): dst shares src's first cells
        # Cells only the prefix cache holds. Every decode step's attention walks the
        # whole KV range, so idle cached cells cost running streams.
        self._max_idle_cells = max_idle_cells
        self._min_prefix = min_prefix  # shorter shared prefixes are computed again, not kept
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.ledger = KVLedger(shared=not streams)
        self.prefix_cache = PrefixCache(max_entries)

    @property
    def num_used_cells(self) -> int:
        return self.ledger.used

    def allocate(self) -> int:
        """A free sequence id (the caller checked `free_slots`)."""
        return self.free_slots.pop()

    def take_slot(self, running: set[int], hit: PrefixHit | None) -> tuple[int, bool]:
        """(streams) The id for a new running sample, given the ids running samples hold,
        and whether it took over the cache entry of `hit` in place (its cells past the
        hit are dropped; nothing is copied). The caller checked that an id is left.

        Fewest runs of consecutive running ids first (each run is one more pass over
        the weights in every step), then no copy (the hit's own entry), then no entry
        moved, then the lowest id. An entry in the way moves to an empty id, or, with
        none, to the least recently used entry's, which is dropped.
        """
        entries = {e.slot: e for e in self.prefix_cache.entries}
        own = hit.entry if hit is not None else None
        best: tuple[int, int, int] | None = None
        for x in range(self.num_slots):
            if x in running:
                continue
            joined = (x - 1 in running) + (x + 1 in running)
            taken_over = own is not None and entries.get(x) is own
            moves = x in entries and not taken_over
            key = (-joined, 0 if taken_over else 1 + moves, x)
            if best is None or key < best:
                best = key
        if best is None:
            raise RuntimeError("no sequence id left")
        slot = best[2]
        entry = entries.get(slot)
        if entry is not None and entry is own and hit is not None:
            self.prefix_cache.entries.remove(entry)
            self.truncate(slot, hit.length)
            return slot, True
        if entry is not None:
            self._move_out(entry, keep=own)
        self.free_slots.remove(slot)
        return slot, False

    def _move_out(self, entry: CacheEntry, keep: CacheEntry | None) -> None:
        """Move a cached entry to another id (a copy), or drop it if none is left."""
        if not self.free_slots:
            victims = [e for e in self.prefix_cache.entries if e is not keep]
            lru = min(victims, key=lambda e: e.last_used)
            self.prefix_cache.entries.remove(lru)
            self.drop(lru.slot)
            if lru is entry:
                return
        dst = min(self.free_slots)
        self.free_slots.remove(dst)
        length = self.ledger.end(entry.slot)
        self.fork(entry.slot, dst, length)
        self._release(entry.slot, 0)
        self.ledger.drop(entry.slot)
        self.free_slots.append(entry.slot)
        entry.slot = dst

    def grow(self, slot: int, count: int) -> None:
        """The slot computed `count` more cells, after those it has."""
        self.ledger.grow(slot, count)

    def truncate(self, slot: int, length: int) -> None:
        """Remove the slot's cells at positions >= length (a rejected draft's)."""
        if self.ledger.end(slot) > length:
            self._release(slot, length)
            self.ledger.truncate(slot, length)

    def fork(self, src: int, dst: int, length: int) -> None:
        """The empty slot dst shares src's first `length` cells."""
        self._copy(src, dst, length)
        self.ledger.fork(src, dst, length)

    def free(
        self,
        slot: int,
        tokens: Sequence[int],
        num_prompt: int,
        running: set[int],
        isolation_key: str | None,
    ) -> None:
        """A finished sample gives its slot back; its KV stays cached if worth it, for
        requests with the same `isolation_key`.

        `running` is the slots still in use by running samples: cells they reach
        are not idle.
        """
        if not self._cache(slot, tokens, num_prompt, running, isolation_key):
            self.drop(slot)

    def drop(self, slot: int) -> None:
        """Remove every cell of the slot and free it."""
        self._release(slot, 0)
        self.ledger.drop(slot)
        self.free_slots.append(slot)

    def evict_one(self, keep: int | None = None) -> bool:
        """Drop the least recently used cache entry (not the one in slot `keep`);
        False if there is none."""
        for entry in sorted(self.prefix_cache.entries, key=lambda e: e.last_used):
            if entry.slot != keep:
                self.prefix_cache.entries.remove(entry)
                self.drop(entry.slot)
                return True
        return False

    def clear(self) -> None:
        """Drop every cached prefix."""
        while self.evict_one():
            pass

    def find_prefix(
        self,
        tokens: list[int],
        limit: int,
        running: Sequence[Sample],
        spans: Sequence[ImageSpan],
        isolation_key: str | None,
        align: int = 0,
    ) -> PrefixHit | None:
        """The longest computed prefix of `tokens` (at most `limit`) held anywhere that
        `isolation_key` may see: in its prefix-cache entries or in a running sample of
        a request with the same key. None if too short to be worth forking.

        A hit never ends inside one of the prompt's images (`spans`). With `align`
        (--deterministic), only cells its source computed as prompt count, and the hit
        ends on a multiple of `align`: what the prompt's own chunks would compute.
        """
        entry, best = self.prefix_cache.lookup(tokens, limit, isolation_key, prompt_only=align > 0)
        src = entry.slot if entry is not None else -1
        for s in running:
            if s.request.cache_isolation_key != isolation_key:
                continue
            reach = min(s.num_computed, limit, s.num_prompt if align else limit)
            n = common_prefix(s.tokens, tokens, reach)
            if n > best:
                src, best, entry = s.seq_id, n, None
        for span in spans:
            if span.start < best < span.start + span.num_pos:
                best = span.start
        if align:
            best -= best % align
        if best < self._min_prefix:
            return None
        return PrefixHit(src, best, entry)

    def touch(self, entry: CacheEntry, num_tokens: int) -> None:
        """The entry's first `num_tokens` were just reused."""
        self.prefix_cache.touch(entry, num_tokens)

    def _cache(
        self,
        slot: int,
        tokens: Sequence[int],
        num_prompt: int,
        running: set[int],
        isolation_key: str | None,
    ) -> bool:
        """Keep a finished sample's KV in the prefix cache; False if not worth it.

        The cache is bounded by entries and by idle cells (cells no running
        sample reaches): older entries go first, and an entry that alone is
        over the bound keeps only its first cells (a prefix is what later
        prompts can share). Cached cells are never a reason to refuse work:
        admission and prompt chunks evict them when they need the room.
        """
        cache = self.prefix_cache
        length = self.ledger.end(slot)
        if not cache.max_entries or length < self._min_prefix:
            return False
        kept = tuple(tokens[:length])
        # The other samples of an n > 1 request share this prompt: one entry is enough.
        if cache.covers(kept[: min(length, num_prompt)], isolation_key):
            return False
        for redundant in cache.add(slot, kept, isolation_key, num_prompt):
            self.drop(redundant.slot)
        entry = cache.entries[-1]
        while len(cache.entries) > cache.max_entries or (
            len(cache.entries) > 1 and self._idle_cells(running) > self._max_idle_cells
        ):
            self.evict_one(keep=slot)
        excess = self._idle_cells(running) - self._max_idle_cells
        if excess > 0:
            keep = length - excess
            if keep < self._min_prefix:
                cache.entries.remove(entry)
                return False
            self._release(slot, keep)
            self.ledger.truncate(slot, keep)
            entry.tokens = kept[:keep]
        return True

    def _idle_cells(self, running: set[int]) -> int:
        return self.ledger.used - self.ledger.cells_of(running)
