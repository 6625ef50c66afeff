"""Which tokens run in the next step, and where every sequence's KV comes from.

Each step is one batch under a token budget: one token for every running
sequence that is decoding, then prompt chunks for sequences still being
computed (chunked prefill, oldest first), then newly admitted requests while
sequence slots and KV cells allow.

Admission looks for the longest computed prefix of the prompt anywhere in the
KV cache: in the prefix cache (finished sequences' KV, kept under their own
ids) or in a running sequence (so requests that arrive together with a shared
prefix compute it once). A hit is forked with `seq_cp`, which in a unified
cache shares cells instead of copying them. KV cells are counted exactly in
`kv.KVLedger`, so llama.cpp never runs out: when room is short, cached
entries go first (least recently used), then the newest sequence is preempted
(its cells dropped, its tokens recomputed later) instead of failing anyone.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fireside.engine.kv import CacheEntry, KVLedger, PrefixCache, common_prefix
from fireside.engine.sequence import RequestState, Sequence


@dataclass(frozen=True)
class SchedulerConfig:
    num_slots: int  # llama.cpp sequence ids available
    max_running: int  # most sequences decoding at once (a request with n > this runs alone)
    kv_capacity: int  # KV cells shared by all sequences
    token_budget: int  # most tokens in one step's batch
    # Most prompt positions scored (logits kept) in one step: bounds llama.cpp's
    # logits buffer, which grows to the largest batch of outputs it has seen.
    max_scored_rows: int = 256
    cache_entries: int = 32  # finished sequences kept for their prefixes; 0: no prefix cache
    # Cells only the prefix cache holds. Every decode step's attention walks the
    # whole KV range, so idle cached cells cost running streams (~5% per 1000 cells).
    cache_cells: int = 2048
    # Prompt tokens per step while any stream is decoding: a step's length is a gap
    # between two tokens of every running stream. Measured at 16 streams, 2 threads:
    # 128 gave ITL p99 0.49 s but 140 tok/s; 512 gives p99 0.77 s and 182 tok/s.
    prefill_chunk: int = 512
    min_cache_hit: int = 16  # shorter shared prefixes are computed again


@dataclass
class Chunk:
    seq: Sequence
    start: int  # position of the first token
    count: int
    image: Any = None  # an image span (runner.media.ImageSpan) computed whole, not tokens

    @property
    def reaches_end(self) -> bool:
        """The chunk computes the sequence's last token: its logits choose the next one."""
        return self.start + self.count == len(self.seq.tokens)


@dataclass
class _Hit:
    src: int  # sequence id holding the prefix
    length: int
    entry: CacheEntry | None  # when the prefix comes from the prefix cache


# Room each running sequence should have to decode for a while after an admission.
_HEADROOM_PER_SEQ = 16


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        release: Callable[[int, int], None],
        copy: Callable[[int, int, int], None],
    ) -> None:
        self.config = config
        self._release = release  # (slot, start): drops a sequence id's cells from start on
        self._copy = copy  # (src, dst, length): dst shares src's first cells
        self._free_slots = list(range(config.num_slots - 1, -1, -1))
        # Waiting work, oldest first: new requests and preempted sequences.
        self.waiting: deque[RequestState | Sequence] = deque()
        self.running: list[Sequence] = []  # sequences holding a slot
        self.ledger = KVLedger()
        self.cache = PrefixCache(config.cache_entries)
        self.num_preempted = 0
        self.queried_tokens = 0  # prompt tokens of admitted requests
        self.hit_tokens = 0  # of those, found already computed
        self._pending = 0  # cells this step's chunks will fill

    # -- bookkeeping -------------------------------------------------------

    def add(self, state: RequestState) -> None:
        self.waiting.append(state)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def kv_used(self) -> int:
        return self.ledger.used

    def computed(self, chunk: Chunk) -> None:
        """The chunk ran: its cells are in the cache now."""
        chunk.seq.num_computed += chunk.count
        self.ledger.grow(chunk.seq.seq_id, chunk.count)

    def share_prompt(self, group: RequestState) -> None:
        """After sample 0 computed the prompt, every other sample shares its cells."""
        first = group.seqs[0]
        for s in group.seqs[1:]:
            if not s.is_finished and s.slot is not None:
                self._fork(first.seq_id, s, group.num_prompt)
        group.forked = True

    def free(self, seq: Sequence, keep: bool = True) -> None:
        """Give back a finished or aborted sequence's slot; its KV may stay cached."""
        if seq.slot is not None:
            slot = seq.slot
            seq.slot = None
            self.running.remove(seq)
            if not (keep and self._cache_kv(seq, slot)):
                self._drop(slot)
        seq.num_computed = 0

    def remove_request(self, state: RequestState, keep: bool = True) -> None:
        """Forget a request entirely (finished, aborted, or failed: then keep=False)."""
        for s in state.seqs:
            self.free(s, keep)
        if state in self.waiting:
            self.waiting.remove(state)
        for s in state.seqs:
            if s in self.waiting:
                self.waiting.remove(s)

    def clear_cache(self) -> None:
        """Drop every cached prefix."""
        while self._evict_one():
            pass

    def relieve(self) -> None:
        """llama.cpp found no room for a batch after all: make some, then retry."""
        if not self._evict_one():
            active = [s for s in self.running if self._is_active(s)]
            if active:
                self._preempt(self._newest(active))

    def _drop(self, slot: int) -> None:
        self._release(slot, 0)
        self.ledger.drop(slot)
        self._free_slots.append(slot)

    def _cache_kv(self, seq: Sequence, slot: int) -> bool:
        """Keep a finished sequence's KV in the prefix cache; False if not worth it.

        The cache is bounded by entries and by idle cells (cells no running
        sequence reaches): older entries go first, and an entry that alone is
        over the bound keeps only its first cells (a prefix is what later
        prompts can share). Cached cells are never a reason to refuse work:
        admission and prompt chunks evict them when they need the room.
        """
        cache = self.cache
        length = self.ledger.end(slot)
        if not cache.max_entries or length < self.config.min_cache_hit:
            return False
        tokens = tuple(seq.tokens[:length])
        # The other samples of an n > 1 request share this prompt: one entry is enough.
        if cache.covers(tokens[: min(length, seq.num_prompt)]):
            return False
        for redundant in cache.add(slot, tokens):
            self._drop(redundant.slot)
        entry = cache.entries[-1]
        while len(cache.entries) > cache.max_entries or (
            len(cache.entries) > 1 and self._idle_cache_cells() > self.config.cache_cells
        ):
            self._evict_one(keep=slot)
        excess = self._idle_cache_cells() - self.config.cache_cells
        if excess > 0:
            keep = length - excess
            if keep < self.config.min_cache_hit:
                cache.entries.remove(entry)
                return False
            self._release(slot, keep)
            self.ledger.truncate(slot, keep)
            entry.tokens = tokens[:keep]
        return True

    def _idle_cache_cells(self) -> int:
        running = {s.seq_id for s in self.running}
        return self.ledger.used - self.ledger.cells_of(running)

    def _evict_one(self, keep: int | None = None) -> bool:
        """Drop the least recently used cache entry (not `keep`); False if none."""
        for entry in sorted(self.cache.entries, key=lambda e: e.last_used):
            if entry.slot != keep:
                self.cache.entries.remove(entry)
                self._drop(entry.slot)
                return True
        return False

    def _fork(self, src: int, dst: Sequence, length: int) -> None:
        self._copy(src, dst.seq_id, length)
        self.ledger.fork(src, dst.seq_id, length)
        dst.num_computed = length

    # -- the schedule ------------------------------------------------------

    def _free_cells(self) -> int:
        return self.config.kv_capacity - self.ledger.used - self._pending

    def schedule(self) -> list[Chunk]:
        """The next step's chunks; empty only when there is no work at all.

        Every step makes progress: when nothing fits, cached prefixes are
        evicted, then the newest of several running sequences is preempted,
        until something does.
        """
        for _ in range(2 * self.config.num_slots + 2):  # each pass frees a slot or an entry
            chunks = self._schedule()
            if chunks or not self.has_work():
                return chunks
            active = [s for s in self.running if self._is_active(s)]
            if self._evict_one():
                continue
            if len(active) > 1:
                self._preempt(self._newest(active))
                continue
            break
        return []  # nothing to free: a sequence no KV size can hold

    def _schedule(self) -> list[Chunk]:
        budget = self.config.token_budget
        chunks: list[Chunk] = []
        self._pending = 0
        decoding = [s for s in self.running if s.num_pending == 1 and self._is_active(s)]
        prefilling = [s for s in self.running if s.num_pending > 1 and self._is_active(s)]

        # Decode first: every running stream advances each step.
        while decoding and len(decoding) > min(budget, self._free_cells()):
            if len(decoding) > self._free_cells() and self._evict_one():
                continue
            victim = self._newest(decoding + prefilling)
            self._preempt(victim)
            if victim in decoding:
                decoding.remove(victim)
            else:
                prefilling.remove(victim)
        for s in decoding[:budget]:
            chunks.append(Chunk(s, s.num_computed, 1))
        budget -= len(chunks)
        self._pending = len(chunks)
        if chunks:
            budget = min(budget, self.config.prefill_chunk)

        # Then prompt chunks, oldest first; then admit waiting work while it fits.
        scored_rows = self.config.max_scored_rows

        def take(s: Sequence) -> None:
            nonlocal budget, scored_rows
            image = None
            want = min(s.num_pending, budget)
            for span in s.group.spans:
                if span.start == s.num_computed:
                    want = span.num_pos  # an image needs room for all of it
            while want > self._free_cells() and self._evict_one():
                pass  # running work comes before cached prefixes
            n = min(want, self._free_cells())
            for span in s.group.spans:
                if span.start == s.num_computed:  # an image goes in whole, or not at all
                    image = span
                    n = span.num_pos if span.num_pos <= min(budget, self._free_cells()) else 0
                    if not chunks and span.num_pos <= self._free_cells():
                        n = span.num_pos  # alone in a step, it may exceed the token budget
                    break
                if span.start > s.num_computed:  # text stops where the next image starts
                    n = min(n, span.start - s.num_computed)
                    break
            if s.group.scores_prompt and image is None:
                n = min(n, scored_rows)
                scored_rows -= max(n, 0)
            if n > 0:
                chunks.append(Chunk(s, s.num_computed, n, image))
                budget -= n
                self._pending += n

        prefilling.sort(key=lambda s: (s.group.arrival, s.index))
        for s in prefilling:
            take(s)
        while self.waiting and budget > 0:
            item = self.waiting[0]
            if not self._may_start(item):
                break  # checked before the prefix lookup, which costs more
            hit = self._lookup(item)
            if not self._make_room(item, hit):
                break
            self.waiting.popleft()
            for s in self._admit(item, hit):
                take(s)
        return chunks

    @staticmethod
    def _is_active(s: Sequence) -> bool:
        # Before the fork only sample 0 computes the prompt; the others wait for it.
        return not s.is_finished and (s.group.forked or s.index == 0)

    def _newest(self, seqs: list[Sequence]) -> Sequence:
        return max(seqs, key=lambda s: (s.group.arrival, s.index))

    def _lookup(self, item: RequestState | Sequence) -> _Hit | None:
        """The longest computed prefix of the item's tokens held anywhere, if worth forking."""
        seq = item if isinstance(item, Sequence) else item.seqs[0]
        params = seq.group.params
        if params.prompt_logprobs is not None and not seq.group.forked:
            return None  # scoring needs the logits of every prompt position
        limit = len(seq.tokens) - 1  # compute at least one token: its logits pick the next
        if params.prompt_cache_max_len is not None:
            limit = min(limit, params.prompt_cache_max_len)
        if limit < self.config.min_cache_hit:
            return None
        entry, best = self.cache.lookup(seq.tokens, limit)
        src = entry.slot if entry is not None else -1
        for s in self.running:
            n = common_prefix(s.tokens, seq.tokens, min(s.num_computed, limit))
            if n > best:
                src, best, entry = s.seq_id, n, None
        for span in seq.group.spans:  # a hit never ends inside an image
            if span.start < best < span.start + span.num_pos:
                best = span.start
        if best < self.config.min_cache_hit:
            return None
        return _Hit(src, best, entry)

    def _may_start(self, item: RequestState | Sequence) -> bool:
        """Whether running-sequence limits let the item start at all this step."""
        num_running = len(self.running)
        return not num_running or num_running + self._slots(item) <= self.config.max_running

    @staticmethod
    def _slots(item: RequestState | Sequence) -> int:
        if isinstance(item, RequestState):
            return len([s for s in item.seqs if not s.is_finished])
        return 1

    def _make_room(self, item: RequestState | Sequence, hit: _Hit | None) -> bool:
        """Whether the item can start now, evicting cached prefixes if that is what it takes."""
        slots = self._slots(item)
        cells = item.num_prompt if isinstance(item, RequestState) else len(item.tokens)
        cells -= hit.length if hit is not None else 0
        keep = hit.src if hit is not None else None
        num_running = len(self.running)
        while slots > len(self._free_slots):
            if not self._evict_one(keep):
                return False
        if num_running == 0:
            return True  # alone, it gets whatever there is (and preempts itself if it must)
        headroom = (num_running + slots) * _HEADROOM_PER_SEQ
        while cells + headroom > self._free_cells():
            if not self._evict_one(keep):
                return False
        return True

    def _admit(self, item: RequestState | Sequence, hit: _Hit | None) -> list[Sequence]:
        """Give the item its slots and any cached prefix; return the sequences that compute now."""
        if isinstance(item, Sequence):
            seqs = [item]
        else:
            seqs = [s for s in item.seqs if not s.is_finished]
        for s in seqs:
            s.slot = self._free_slots.pop()
            s.num_computed = 0
            self.running.append(s)
        hit_length = 0
        if hit is not None:
            self._fork(hit.src, seqs[0], hit.length)
            if hit.entry is not None:
                self.cache.touch(hit.entry, hit.length)
            hit_length = hit.length
        if isinstance(item, RequestState) and not item.admitted:
            # Counted once per request: a recompute after preemption is not a new query.
            item.admitted = True
            item.num_cached = hit_length
            self.queried_tokens += item.num_prompt
            self.hit_tokens += hit_length
        return [s for s in seqs if self._is_active(s)]

    def _preempt(self, seq: Sequence) -> None:
        """Drop a sequence's cells and queue it to recompute them."""
        self.num_preempted += 1
        group = seq.group
        if not group.forked:
            # The prompt was not shared yet: the whole request starts over.
            for s in group.seqs:
                self.free(s, keep=False)
            self.waiting.appendleft(group)
            return
        self.free(seq, keep=False)
        self.waiting.appendleft(seq)
