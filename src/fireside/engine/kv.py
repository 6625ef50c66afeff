"""What the KV cache holds, counted in Python: the ledger and the prefix cache.

llama.cpp's unified cache shares cells between sequence ids: `seq_cp(src, dst,
0, L)` tags src's first L cells with dst too, and a cell is freed only when its
last id is removed. All our sharing is of prefixes, so it is counted exactly
with segments: a segment is a run of cells one holder (a llama.cpp sequence id)
computed itself, starting at some position; every holder that shares it
reaches some end in it. A segment's live cells run from its start to the
furthest end any holder reaches. Without a unified cache (a stream of cells per
sequence id) a fork copies: the ledger is made with `shared=False`, and a fork
counts as cells the destination holds alone.

The prefix cache keeps the KV of finished sequences under their own sequence
ids (LRU, bounded), so a later prompt with the same prefix forks it instead of
computing it again. Running sequences are searched too, by the scheduler, so
requests that arrive together with a shared prefix compute it once. Every entry
carries its request's isolation key, and a lookup sees only the entries of its
own key (`cached_tokens` would otherwise tell one tenant what another sent).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False)
class _Segment:
    start: int
    ends: dict[int, int] = field(default_factory=dict)  # holder -> end position it reaches

    @property
    def cells(self) -> int:
        return max(self.ends.values()) - self.start if self.ends else 0


@dataclass
class _Holder:
    segments: list[_Segment] = field(default_factory=list)  # in position order
    end: int = 0  # positions [0, end) are in the cache
    owns_last: bool = False  # the last segment is one this holder computed


class KVLedger:
    """Cells in use, exactly, given every compute, fork and removal."""

    def __init__(self, shared: bool = True) -> None:
        self._holders: dict[int, _Holder] = {}
        self._shared = shared  # forks share cells (unified cache) or copy them
        self.used = 0

    def end(self, holder: int) -> int:
        h = self._holders.get(holder)
        return h.end if h is not None else 0

    def grow(self, holder: int, count: int) -> None:
        """The holder computed `count` more cells at the end of what it has."""
        h = self._holders.setdefault(holder, _Holder())
        if not h.owns_last:
            h.segments.append(_Segment(h.end))
            h.owns_last = True
        seg = h.segments[-1]
        before = seg.cells
        h.end += count
        seg.ends[holder] = h.end
        self.used += seg.cells - before

    def fork(self, src: int, dst: int, length: int) -> None:
        """dst (empty) now shares src's first `length` cells."""
        s = self._holders[src]
        if dst in self._holders and self._holders[dst].end:
            raise ValueError(f"fork into a non-empty holder {dst}")
        if not self._shared:
            self.grow(dst, min(length, s.end))  # a copy dst holds alone
            return
        d = _Holder(end=length)
        for seg in s.segments:
            if seg.start >= length:
                break
            d.segments.append(seg)
            seg.ends[dst] = min(seg.ends[src], length)  # within what src reaches
        self._holders[dst] = d

    def drop(self, holder: int) -> None:
        """The holder's id was removed from all its cells."""
        h = self._holders.pop(holder, None)
        if h is None:
            return
        for seg in h.segments:
            before = seg.cells
            del seg.ends[holder]
            self.used -= before - seg.cells

    def truncate(self, holder: int, length: int) -> None:
        """The holder's id was removed from its cells at positions >= length."""
        h = self._holders.get(holder)
        if h is None or length >= h.end:
            return
        kept = []
        for seg in h.segments:
            before = seg.cells
            if seg.start >= length:
                del seg.ends[holder]
            else:
                seg.ends[holder] = min(seg.ends[holder], length)
                kept.append(seg)
            self.used -= before - seg.cells
        # Cells it computes from now on start a new segment if others may still reach
        # past `length` in the old one, with other tokens than the ones it will add.
        # A segment it computed and holds alone goes on growing (a rejected draft is
        # truncated every step: a segment each time would make every count slower).
        h.owns_last = (
            h.owns_last
            and bool(kept)
            and kept[-1] is h.segments[-1]
            and kept[-1].ends.keys() == {holder}
        )
        h.segments = kept
        h.end = length

    def cells_of(self, holders: set[int]) -> int:
        """Cells in use by these holders (shared ones counted once)."""
        seen: dict[int, int] = {}
        segments: dict[int, _Segment] = {}
        for holder in holders:
            h = self._holders.get(holder)
            for seg in h.segments if h is not None else ():
                segments[id(seg)] = seg
                seen[id(seg)] = max(seen.get(id(seg), seg.start), seg.ends[holder])
        return sum(end - segments[key].start for key, end in seen.items())

    def exclusive(self, holder: int) -> int:
        """Cells that dropping this holder would free."""
        h = self._holders.get(holder)
        if h is None:
            return 0
        freed = 0
        for seg in h.segments:
            others = [e for k, e in seg.ends.items() if k != holder]
            freed += seg.cells - (max(others) - seg.start if others else 0)
        return freed


@dataclass(eq=False)
class CacheEntry:
    slot: int  # the llama.cpp sequence id that keeps the cells
    tokens: tuple[int, ...]  # the tokens whose KV it holds, from position 0
    last_used: int = 0
    isolation_key: str | None = None  # only requests with the same key may use it
    num_prompt: int = 0  # of the tokens, those its request computed as prompt


class PrefixCache:
    """Finished sequences' KV, kept for reuse; least recently used goes first."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self.entries: list[CacheEntry] = []
        self._clock = 0
        self.hits = 0
        self.hit_tokens = 0

    def lookup(
        self, tokens: list[int], limit: int, isolation_key: str | None, prompt_only: bool = False
    ) -> tuple[CacheEntry | None, int]:
        """The entry of this isolation key sharing the longest prefix with `tokens`, up
        to `limit` tokens (with `prompt_only`, within the entry's prompt)."""
        best: CacheEntry | None = None
        best_len = 0
        for entry in self.entries:
            if entry.isolation_key != isolation_key:
                continue
            n = common_prefix(
                entry.tokens, tokens, min(limit, entry.num_prompt) if prompt_only else limit
            )
            if n > best_len:
                best, best_len = entry, n
        return best, best_len

    def touch(self, entry: CacheEntry, num_tokens: int) -> None:
        self._clock += 1
        entry.last_used = self._clock
        self.hits += 1
        self.hit_tokens += num_tokens

    def covers(self, tokens: tuple[int, ...], isolation_key: str | None) -> bool:
        """Some entry of this isolation key already holds all of these tokens (as its
        prefix)."""
        return any(
            e.isolation_key == isolation_key
            and common_prefix(e.tokens, tokens, len(tokens)) == len(tokens)
            for e in self.entries
        )

    def add(
        self, slot: int, tokens: tuple[int, ...], isolation_key: str | None, num_prompt: int = 0
    ) -> list[CacheEntry]:
        """Keep a sequence's KV; returns the entries of the same isolation key it makes
        redundant (now removed)."""
        self._clock += 1
        redundant = [
            e
            for e in self.entries
            if e.isolation_key == isolation_key
            and common_prefix(e.tokens, tokens, len(e.tokens)) == len(e.tokens)
        ]
        for e in redundant:
            self.entries.remove(e)
        self.entries.append(CacheEntry(slot, tokens, self._clock, isolation_key, num_prompt))
        return redundant

    def pop_lru(self) -> CacheEntry | None:
        if not self.entries:
            return None
        entry = min(self.entries, key=lambda e: e.last_used)
        self.entries.remove(entry)
        return entry


def common_prefix(
    a: tuple[int, ...] | list[int], b: tuple[int, ...] | list[int], limit: int
) -> int:
    """Length of the common prefix of a and b, at most `limit`.

    Binary search over slice comparisons: each comparison runs in C, so a
    thousand-token prefix costs about ten of them instead of a Python loop.
    """
    hi = min(len(a), len(b), limit)
    if hi <= 0 or a[0] != b[0]:
        return 0
    if _same(a, b, hi):
        return hi
    lo = 1  # a[:lo] == b[:lo] holds; a[:hi] == b[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _same(a, b, mid):
            lo = mid
        else:
            hi = mid
    return lo


def _same(a: tuple[int, ...] | list[int], b: tuple[int, ...] | list[int], n: int) -> bool:
    x, y = a[:n], b[:n]
    if type(x) is not type(y):  # a list never equals a tuple
        return tuple(x) == tuple(y)
    return x == y
