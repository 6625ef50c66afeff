"""Which tokens run in the next step, and where every sample's KV comes from.

Each step is one batch under a token budget: one token for every running
sample that is decoding, then prompt chunks for samples still being
computed (chunked prefill, oldest first), then newly admitted requests while
sequence slots and KV cells allow.

Admission looks for the longest computed prefix of the prompt anywhere in the
KV cache: in the prefix cache (finished samples' KV, kept under their own
sequence ids) or in a running sample (so requests that arrive together with a
shared prefix compute it once). A hit is forked with `seq_cp`, which copies a
sequence's stream of cells (or, in a unified cache, shares the cells). With a
stream per sequence id (the default) a sample never outgrows its own cells
(the API caps a request's context at them) and a request with more samples
than ids runs them in turns. In a unified cache KV cells are counted exactly
(`kv_cache.KVCache`), so llama.cpp never runs out: when room is short, cached
entries go first (least recently used), then the newest sample is preempted
(its cells dropped, its tokens recomputed later) instead of failing anyone.
Priority requests (`service_tier: "priority"`) wait ahead of all others and are
preempted only when no other sample could be; prefixes are shared only between
requests with the same isolation key (kv_cache.py).

A decoding sample with a `Drafter` (speculation.py) may add guessed tokens to
its decode chunk (`Chunk.draft`), within the token budget and the free cells;
`postprocess` keeps the cells of those the step accepted and removes the rest.

The engine calls `schedule()` for a step's chunks and, once they ran,
`postprocess()` with what they did; a request leaves through `remove()`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from fireside.engine.kv import KVLedger, PrefixCache
from fireside.engine.kv_cache import KVCache, PrefixHit
from fireside.engine.request import Request, Sample
from fireside.runner.base import ImageSpan

# Scheduler limits that are not server settings (no flag); the engine passes them.
# Most prompt positions scored (logits kept) in one step: bounds llama.cpp's logits
# buffer, which grows to the largest batch of outputs it has seen.
MAX_SCORED_ROWS = 256
MIN_CACHE_HIT = 16  # shorter shared prefixes are computed again


@dataclass(frozen=True)
class SchedulerConfig:
    """No defaults: the server settings come from `config.ServeConfig` (through
    `EngineConfig`), the rest from the runner or the constants above."""

    num_slots: int  # llama.cpp sequence ids available
    max_running: int  # most sequences decoding at once (a request with n > this runs alone)
    kv_capacity: int  # KV cells in all
    # Cells each sequence id has to itself (llama.cpp's KV streams, the default); 0: the
    # kv_capacity cells are one pool all ids share (--kv-unified).
    slot_cells: int
    token_budget: int  # most tokens in one step's batch
    max_scored_rows: int  # MAX_SCORED_ROWS
    cache_entries: int  # finished sequences kept for their prefixes; 0: no prefix cache
    # Cells only the prefix cache holds. Every decode step's attention walks the
    # whole KV range, so idle cached cells cost running streams (~5% per 1000 cells).
    cache_cells: int
    # Prompt tokens per step while any stream is decoding: a step's length is a gap
    # between two tokens of every running stream (`--prefill-chunk`; measured: config.py).
    prefill_chunk: int
    min_cache_hit: int  # MIN_CACHE_HIT
    # --deterministic: prompts computed in chunks ending at multiples of this (from
    # position 0), never cut shorter by the budget; prefix hits end on such a boundary
    # within the prompt that computed them. 0: chunks as the budget allows.
    fixed_chunk: int


# What waits for admission: a new request, or a sample preempted after its
# prompt was shared (it recomputes alone).
Waiting = Request | Sample


@dataclass
class Chunk:
    """Tokens [start, start + count) of one sample, computed in this step."""

    sample: Sample
    start: int  # position of the first token
    count: int
    image: ImageSpan | None = None  # an image computed whole, instead of tokens
    # Guessed tokens after the sample's last one, computed too and checked by sampling
    # (speculation.py); the step keeps the cells of those it accepts.
    draft: tuple[int, ...] = ()

    @property
    def reaches_end(self) -> bool:
        """The chunk computes the sample's last token: its logits choose the next one."""
        return self.start + self.count == len(self.sample.tokens)


@dataclass
class StepUpdate:
    """What one step did, for `Scheduler.postprocess`."""

    chunks: list[Chunk]  # every chunk that ran: its cells are in the cache now
    # Requests whose prompt the step completed: their other samples share its cells.
    shared: list[Request] = field(default_factory=list)
    finished: list[Sample] = field(default_factory=list)  # in the order they finished


# Room each running sample should have to decode for a while after an admission.
_HEADROOM_PER_SAMPLE = 16
# Free cells, with a stream per sequence id: not a limit.
_UNBOUNDED = 1 << 62


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        release: Callable[[int, int], None],
        copy: Callable[[int, int, int], None],
    ) -> None:
        self.config = config
        self.kv = KVCache(
            config.num_slots,
            max_entries=config.cache_entries,
            max_idle_cells=config.cache_cells,
            min_prefix=config.min_cache_hit,
            release=release,
            copy=copy,
            streams=config.slot_cells > 0,
        )
        self.waiting: deque[Waiting] = deque()  # priority tier first, then oldest first
        self.running: list[Sample] = []  # samples holding a slot
        self.num_preempted = 0
        self.queried_tokens = 0  # prompt tokens of admitted requests
        self.hit_tokens = 0  # of those, found already computed
        self._pending = 0  # cells this step's chunks will fill

    # -- the engine's calls ------------------------------------------------

    def add(self, request: Request) -> None:
        self._enqueue(request, preempted=False)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def postprocess(self, update: StepUpdate) -> None:
        """The one call that ends a step: record the cells it computed, share the
        prompts it finished with their other samples, free the samples it finished.

        In that order: a sample that finished on its first token shares the prompt
        first, so what it leaves in the prefix cache is the same as for any other.
        """
        for chunk in update.chunks:
            sample = chunk.sample
            sample.num_computed += chunk.count
            self.kv.grow(sample.seq_id, chunk.count + len(chunk.draft))
            if chunk.draft:
                # The accepted draft tokens' cells stay (all but the newest token are
                # computed, as after any step); the rejected ones' go.
                sample.num_computed = len(sample.tokens) - 1
                self.kv.truncate(sample.seq_id, sample.num_computed)
        for request in update.shared:
            first = request.samples[0]
            for s in request.samples[1:]:
                if s.slot is not None:
                    self._fork(first.seq_id, s, request.num_prompt)
                elif not s.is_finished:
                    self._enqueue(s, preempted=True)  # no id was left: its turn comes
            request.forked = True
        for sample in update.finished:
            self._free(sample)

    def remove(self, request: Request, keep_kv: bool = True) -> None:
        """Forget a request entirely: finished, aborted, or failed (then not keep_kv:
        a failed step may have half-written its cells)."""
        for s in request.samples:
            self._free(s, keep_kv)
        if request in self.waiting:
            self.waiting.remove(request)
        for s in request.samples:
            if s in self.waiting:
                self.waiting.remove(s)

    def evict_or_preempt(self) -> None:
        """llama.cpp found no room for a batch after all: drop the least recently used
        cached prefix, or else preempt the newest running sample; then run again."""
        if not self.kv.evict_one():
            active = [s for s in self.running if self._is_active(s)]
            if active:
                self._preempt(self._newest(active))

    # -- what the KV cache holds -------------------------------------------

    @property
    def ledger(self) -> KVLedger:
        return self.kv.ledger

    @property
    def cache(self) -> PrefixCache:
        return self.kv.prefix_cache

    def kv_used(self) -> int:
        return self.kv.num_used_cells

    def clear_cache(self) -> None:
        """Drop every cached prefix."""
        self.kv.clear()

    def _free(self, sample: Sample, keep_kv: bool = True) -> None:
        """Give back a finished, aborted or preempted sample's slot; its KV may stay cached."""
        if sample.slot is not None:
            slot = sample.slot
            sample.slot = None
            self.running.remove(sample)
            if keep_kv:
                running = {s.seq_id for s in self.running}
                key = sample.request.cache_isolation_key
                self.kv.free(slot, sample.tokens, sample.num_prompt, running, key)
            else:
                self.kv.drop(slot)
        sample.num_computed = 0

    def _fork(self, src: int, dst: Sample, length: int) -> None:
        self.kv.fork(src, dst.seq_id, length)
        dst.num_computed = length

    def _free_cells(self) -> int:
        if self.kv.streams:
            return _UNBOUNDED  # every sample has its own stream, and fits in it
        return self.config.kv_capacity - self.kv.num_used_cells - self._pending

    # -- the schedule ------------------------------------------------------

    def schedule(self) -> list[Chunk]:
        """The next step's chunks; empty only when there is no work at all.

        Every step makes progress: when nothing fits, cached prefixes are
        evicted, then the newest of several running samples is preempted,
        until something does.
        """
        for _ in range(2 * self.config.num_slots + 2):  # each pass frees a slot or an entry
            chunks = self._schedule()
            if chunks or not self.has_work():
                return chunks
            active = [s for s in self.running if self._is_active(s)]
            if self.kv.evict_one():
                continue
            if len(active) > 1:
                self._preempt(self._newest(active))
                continue
            break
        return []  # nothing to free: a sample no KV size can hold

    def _schedule(self) -> list[Chunk]:
        budget = self.config.token_budget
        chunks: list[Chunk] = []
        self._pending = 0
        decoding = [s for s in self.running if s.num_pending == 1 and self._is_active(s)]
        prefilling = [s for s in self.running if s.num_pending > 1 and self._is_active(s)]

        # Decode first: every running stream advances each step.
        while decoding and len(decoding) > min(budget, self._free_cells()):
            if len(decoding) > self._free_cells() and self.kv.evict_one():
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
        budget -= self._add_drafts(chunks, budget)
        if chunks:
            budget = min(budget, self.config.prefill_chunk)

        # Then prompt chunks, oldest first; then admit waiting work while it fits.
        scored_rows = self.config.max_scored_rows

        def add_prompt_chunk(s: Sample) -> None:
            """The next piece of the sample's uncomputed tokens that fits, if any."""
            nonlocal budget, scored_rows
            image = None
            want = min(s.num_pending, budget)
            fixed = self.config.fixed_chunk
            if fixed:
                want = min(s.num_pending, fixed - s.num_computed % fixed)
                if s.num_computed < s.num_prompt:
                    want = min(want, s.num_prompt - s.num_computed)
                else:
                    # Output tokens computed again (a sample that waited for an id, or
                    # was preempted): one a step, each as the decode row it was.
                    want = 1
                if (
                    want > budget
                    or want > self._free_cells()
                    or (s.request.scores_prompt and want > scored_rows)
                ):
                    return  # the whole chunk next step: its boundaries never move
            for span in s.request.spans:
                if span.start == s.num_computed:
                    want = span.num_pos  # an image needs room for all of it
            while want > self._free_cells() and self.kv.evict_one():
                pass  # running work comes before cached prefixes
            n = min(want, self._free_cells())
            for span in s.request.spans:
                if span.start == s.num_computed:  # an image goes in whole, or not at all
                    image = span
                    n = span.num_pos if span.num_pos <= min(budget, self._free_cells()) else 0
                    if not chunks and span.num_pos <= self._free_cells():
                        n = span.num_pos  # alone in a step, it may exceed the token budget
                    break
                if span.start > s.num_computed:  # text stops where the next image starts
                    n = min(n, span.start - s.num_computed)
                    break
            if s.request.scores_prompt and image is None:
                n = min(n, scored_rows)
                scored_rows -= max(n, 0)
            if n > 0:
                chunks.append(Chunk(s, s.num_computed, n, image))
                budget -= n
                self._pending += n

        prefilling.sort(key=lambda s: (not s.request.priority, s.request.arrival, s.index))
        for s in prefilling:
            add_prompt_chunk(s)
        while self.waiting and budget > 0:
            head = self.waiting[0]
            if not self._may_start(head):
                break  # checked before the prefix lookup, which costs more
            hit = self._lookup(head)
            if not self._make_room(head, hit):
                break
            self.waiting.popleft()
            for s in self._admit(head, hit):
                add_prompt_chunk(s)
        return chunks

    def _add_drafts(self, chunks: list[Chunk], budget: int) -> int:
        """Let decoding samples that guess their next tokens check them in this step
        (speculation.py), within the token budget and the free cells (never evicting
        for them: their cells are gone again by the end of the step). Returns the
        tokens added."""
        room = min(budget, self._free_cells())
        added = 0
        for c in chunks:
            drafter = c.sample.drafter
            if drafter is None or room <= added:
                continue
            c.draft = drafter.propose(c.sample.tokens, room - added, len(self.running))
            added += len(c.draft)
        self._pending += added
        return added

    @staticmethod
    def _is_active(s: Sample) -> bool:
        # Before the fork only sample 0 computes the prompt; the others wait for it.
        return not s.is_finished and (s.request.forked or s.index == 0)

    def _newest(self, samples: list[Sample]) -> Sample:
        """The one to preempt: the newest, of the default tier while there is one."""
        return max(samples, key=lambda s: (not s.request.priority, s.request.arrival, s.index))

    def _enqueue(self, work: Waiting, preempted: bool) -> None:
        """Waiting work is in two tiers, priority first; within a tier, preempted work
        comes first (it has waited already), then new requests in arrival order."""
        is_priority = _request_of(work).priority
        num_priority = next(
            (i for i, w in enumerate(self.waiting) if not _request_of(w).priority),
            len(self.waiting),
        )
        if is_priority:
            self.waiting.insert(0 if preempted else num_priority, work)
        else:
            self.waiting.insert(num_priority if preempted else len(self.waiting), work)

    # -- admission ---------------------------------------------------------

    def _samples(self, work: Waiting) -> list[Sample]:
        """The samples that start when `work` is admitted: with more than there are
        sequence ids, the first ones (the rest are queued once the prompt is shared)."""
        if isinstance(work, Sample):
            return [work]
        return [s for s in work.samples if not s.is_finished][: self.config.num_slots]

    def _lookup(self, work: Waiting) -> PrefixHit | None:
        """The longest computed prefix of the work's tokens held anywhere, if worth forking."""
        sample = work if isinstance(work, Sample) else work.samples[0]
        request = sample.request
        if request.params.prompt_logprobs is not None and not request.forked:
            return None  # scoring needs the logits of every prompt position
        limit = len(sample.tokens) - 1  # compute at least one token: its logits pick the next
        if request.params.prompt_cache_max_len is not None:
            limit = min(limit, request.params.prompt_cache_max_len)
        if limit < self.config.min_cache_hit:
            return None
        return self.kv.find_prefix(
            sample.tokens,
            limit,
            self.running,
            request.spans,
            request.cache_isolation_key,
            align=self.config.fixed_chunk,
        )

    def _may_start(self, work: Waiting) -> bool:
        """Whether running-sample limits let the work start at all this step."""
        num_running = len(self.running)
        return not num_running or num_running + len(self._samples(work)) <= self.config.max_running

    def _make_room(self, work: Waiting, hit: PrefixHit | None) -> bool:
        """Whether the work can start now, evicting cached prefixes if that is what it takes."""
        slots = len(self._samples(work))
        cells = work.num_prompt if isinstance(work, Request) else len(work.tokens)
        cells -= hit.length if hit is not None else 0
        keep = hit.src if hit is not None else None
        num_running = len(self.running)
        if self.kv.streams:
            # Cached entries give their ids up as samples take them (KVCache.take_slot).
            return slots <= self.config.num_slots - num_running
        while slots > len(self.kv.free_slots):
            if not self.kv.evict_one(keep):
                return False
        if num_running == 0:
            return True  # alone, it gets whatever there is (and preempts itself if it must)
        headroom = (num_running + slots) * _HEADROOM_PER_SAMPLE
        while cells + headroom > self._free_cells():
            if not self.kv.evict_one(keep):
                return False
        return True

    def _admit(self, work: Waiting, hit: PrefixHit | None) -> list[Sample]:
        """Give the work its slots and any cached prefix; return the samples that compute now."""
        samples = self._samples(work)
        for i, s in enumerate(samples):
            in_place = False
            if self.kv.streams:
                held = {r.seq_id for r in self.running}
                s.slot, in_place = self.kv.take_slot(held, hit if i == 0 else None)
            else:
                s.slot = self.kv.allocate()
            s.num_computed = 0
            self.running.append(s)
            if i == 0 and hit is not None:
                # Before the next sample takes an id: that may move the hit's entry.
                if in_place:
                    s.num_computed = hit.length  # the entry's cells, in its own id
                else:
                    self._fork(hit.src, s, hit.length)
        hit_length = 0
        if hit is not None:
            if hit.entry is not None:
                self.kv.touch(hit.entry, hit.length)
            hit_length = hit.length
        if isinstance(work, Request) and not work.admitted:
            # Counted once per request: a recompute after preemption is not a new query.
            work.admitted = True
            work.num_cached = hit_length
            self.queried_tokens += work.num_prompt
            self.hit_tokens += hit_length
        return [s for s in samples if self._is_active(s)]

    def _preempt(self, sample: Sample) -> None:
        """Drop a sample's cells and queue it to recompute them."""
        self.num_preempted += 1
        request = sample.request
        if not request.forked:
            # The prompt was not shared yet: the whole request starts over.
            for s in request.samples:
                self._free(s, keep_kv=False)
            self._enqueue(request, preempted=True)
            return
        self._free(sample, keep_kv=False)
        self._enqueue(sample, preempted=True)


def _request_of(work: Waiting) -> Request:
    return work.request if isinstance(work, Sample) else work
