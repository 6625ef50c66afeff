"""Which tokens run in the next step.

Each step is one batch under a token budget: one token for every running
sequence that is decoding, then prompt chunks for sequences still being
computed (chunked prefill), then newly admitted requests while sequence slots
and KV cells allow. KV cells are counted here, so llama.cpp never runs out:
when decoding would overflow the cache, the newest sequence is preempted (its
cells dropped, its tokens recomputed later) instead of failing anyone.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass
class Chunk:
    seq: Sequence
    start: int  # position of the first token
    count: int

    @property
    def reaches_end(self) -> bool:
        """The chunk computes the sequence's last token: its logits choose the next one."""
        return self.start + self.count == len(self.seq.tokens)


class Scheduler:
    def __init__(self, config: SchedulerConfig, release: Callable[[Sequence], None]) -> None:
        self.config = config
        self._release = release  # drops a sequence's KV cells in the runner
        self._free_slots = list(range(config.num_slots - 1, -1, -1))
        # Waiting work, oldest first: new requests and preempted sequences.
        self.waiting: deque[RequestState | Sequence] = deque()
        self.running: list[Sequence] = []  # sequences holding a slot
        self.num_preempted = 0

    # -- bookkeeping -------------------------------------------------------

    def add(self, state: RequestState) -> None:
        self.waiting.append(state)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def kv_used(self) -> int:
        shared: dict[int, int] = {}
        used = 0
        for s in self.running:
            used += s.owned_cells
            if s.num_shared:
                shared[id(s.group)] = s.num_shared
        return used + sum(shared.values())

    def free(self, seq: Sequence) -> None:
        """Give back a finished or aborted sequence's slot and cells."""
        if seq.slot is not None:
            self._release(seq)
            self._free_slots.append(seq.slot)
            seq.slot = None
            self.running.remove(seq)
        seq.num_computed = 0
        seq.num_shared = 0

    def remove_request(self, state: RequestState) -> None:
        """Forget a request entirely (finished or aborted)."""
        for s in state.seqs:
            self.free(s)
        if state in self.waiting:
            self.waiting.remove(state)
        for s in state.seqs:
            if s in self.waiting:
                self.waiting.remove(s)

    # -- the schedule ------------------------------------------------------

    def schedule(self) -> list[Chunk]:
        budget = self.config.token_budget
        chunks: list[Chunk] = []
        decoding = [s for s in self.running if s.num_pending == 1 and self._is_active(s)]
        prefilling = [s for s in self.running if s.num_pending > 1 and self._is_active(s)]

        # Decode first: every running stream advances each step.
        while decoding and len(decoding) > self._room(budget):
            victim = self._newest(decoding + prefilling)
            self._preempt(victim)
            if victim in decoding:
                decoding.remove(victim)
            else:
                prefilling.remove(victim)
        for s in decoding[:budget]:
            chunks.append(Chunk(s, s.num_computed, 1))
        budget -= len(chunks)

        # Cells left once this step's decode tokens are placed; counted down from here
        # instead of re-walking the running list for every chunk.
        free_cells = self.config.kv_capacity - self.kv_used() - len(chunks)

        # Then prompt chunks, oldest first; then admit waiting work while it fits.
        scored_rows = self.config.max_scored_rows

        def take(s: Sequence) -> None:
            nonlocal budget, free_cells, scored_rows
            n = min(s.num_pending, budget, free_cells)
            if s.group.scores_prompt:
                n = min(n, scored_rows)
                scored_rows -= max(n, 0)
            if n > 0:
                chunks.append(Chunk(s, s.num_computed, n))
                budget -= n
                free_cells -= n

        prefilling.sort(key=lambda s: (s.group.arrival, s.index))
        for s in prefilling:
            take(s)
        while self.waiting and budget > 0 and free_cells > 0:
            item = self.waiting[0]
            if not self._can_admit(item, free_cells):
                break
            self.waiting.popleft()
            for s in self._admit(item):
                take(s)
        return chunks

    @staticmethod
    def _is_active(s: Sequence) -> bool:
        # Before the fork only sample 0 computes the prompt; the others wait for it.
        return not s.is_finished and (s.group.forked or s.index == 0)

    def _room(self, budget: int) -> int:
        return min(budget, self.config.kv_capacity - self.kv_used())

    def _newest(self, seqs: list[Sequence]) -> Sequence:
        return max(seqs, key=lambda s: (s.group.arrival, s.index))

    def _needs(self, item: RequestState | Sequence) -> tuple[int, int]:
        """(slots, prompt cells) an item needs to start."""
        if isinstance(item, RequestState):
            return len([s for s in item.seqs if not s.is_finished]), item.num_prompt
        return 1, len(item.tokens)

    def _can_admit(self, item: RequestState | Sequence, free_cells: int) -> bool:
        slots, cells = self._needs(item)
        if slots > len(self._free_slots):
            return False
        num_running = len(self.running)
        if num_running == 0:
            return True
        if num_running + slots > self.config.max_running:
            return False
        # Leave room for every running sequence to decode a while after admission.
        headroom = (num_running + slots) * 16
        return cells + headroom <= free_cells

    def _admit(self, item: RequestState | Sequence) -> list[Sequence]:
        """Give the item its slots; return the sequences that compute now."""
        if isinstance(item, Sequence):
            seqs = [item]
        else:
            seqs = [s for s in item.seqs if not s.is_finished]
        for s in seqs:
            s.slot = self._free_slots.pop()
            s.num_computed = 0
            s.num_shared = 0
            self.running.append(s)
        return [s for s in seqs if self._is_active(s)]

    def _preempt(self, seq: Sequence) -> None:
        """Drop a sequence's cells and queue it to recompute them."""
        self.num_preempted += 1
        group = seq.group
        if not group.forked:
            # The prompt was not shared yet: the whole request starts over.
            for s in group.seqs:
                self.free(s)
            self.waiting.appendleft(group)
            return
        self.free(seq)
        self.waiting.appendleft(seq)
