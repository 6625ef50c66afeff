"""The scheduler on its own, one step at a time: no model, no engine thread.

`Harness` plays the engine's part with stub KV callbacks that only record what
they were asked: it runs every chunk a step schedules, samples one token where
a chunk reaches its sample's end, and retires samples that have all their
tokens (`schedule`, then `postprocess`, then `remove` for finished requests).
Each test states a scheduling rule and checks the chunks it produces; only
`Harness` knows the scheduler's calls and types, so a rename changes it alone.

A chunk is written `(request id, sample index, first position, count)`.
"""

from __future__ import annotations

from typing import Any

from fireside.engine.request import Request, Sample
from fireside.engine.scheduler import Chunk, Scheduler, SchedulerConfig, StepUpdate
from fireside.engine.types import EngineRequest, FinishReason, SamplingParams

OUTPUT_TOKEN = 1  # every sampled token; prompts below use ids from 100 on


def prompt(length: int, start: int = 100) -> list[int]:
    return list(range(start, start + length))


class Harness:
    """The engine minus the model, over stub `release` and `copy` callbacks."""

    def __init__(self, **config: Any) -> None:
        settings: dict[str, Any] = {
            "num_slots": 8,
            "max_running": 8,
            "kv_capacity": 256,
            "slot_cells": 0,
            "token_budget": 64,
            "max_scored_rows": 256,
            "cache_entries": 0,
            "cache_cells": 256,
            "prefill_chunk": 64,
            "min_cache_hit": 4,
            "fixed_chunk": 0,
        }
        settings.update(config)
        self.released: list[tuple[int, int]] = []  # (slot, first position dropped)
        self.copies: list[tuple[int, int, int]] = []  # (src slot, dst slot, length)
        self.scheduler = Scheduler(
            SchedulerConfig(**settings),
            release=lambda slot, start: self.released.append((slot, start)),
            copy=lambda src, dst, length: self.copies.append((src, dst, length)),
        )
        self.requests: dict[str, Request] = {}

    def submit(
        self,
        rid: str,
        tokens: list[int],
        max_tokens: int = 4,
        n: int = 1,
        priority: bool = False,
        isolation_key: str | None = None,
    ) -> Request:
        params = SamplingParams(max_tokens=max_tokens, n=n)
        engine_request = EngineRequest(
            rid, tuple(tokens), params, priority=priority, cache_isolation_key=isolation_key
        )
        request = Request.create(engine_request, None, len(self.requests))
        self.requests[rid] = request
        self.scheduler.add(request)
        return request

    def step(self) -> list[tuple[str, int, int, int]]:
        """One engine step; the chunks it ran."""
        chunks = self.scheduler.schedule()
        update = StepUpdate(chunks)
        for chunk in chunks:
            if chunk.reaches_end:
                self._sample(chunk, update)
        self.scheduler.postprocess(update)
        for request in {id(c.sample.request): c.sample.request for c in chunks}.values():
            if request.is_finished:
                self.scheduler.remove(request)
        return [_described(c) for c in chunks]

    def _sample(self, chunk: Chunk, update: StepUpdate) -> None:
        request = chunk.sample.request
        samples = [chunk.sample]
        if not request.forked:
            # Prefill once, decode n ways: the other samples share the prompt's cells.
            update.shared.append(request)
            samples = [s for s in request.samples if not s.is_finished]
        for sample in samples:
            sample.tokens.append(OUTPUT_TOKEN)
            if sample.num_output >= request.params.max_tokens:
                sample.finish_reason = FinishReason.LENGTH
                update.finished.append(sample)

    def run_until_idle(self, max_steps: int = 1000) -> int:
        for steps in range(max_steps):
            if not self.scheduler.has_work():
                return steps
            self.step()
        raise AssertionError("the scheduler never ran out of work")

    def slot_of(self, rid: str, sample: int = 0) -> int:
        slot = self.requests[rid].samples[sample].slot
        assert slot is not None, f"{rid}/{sample} holds no slot"
        return slot

    @property
    def waiting(self) -> list[str]:
        return [
            work.request.request_id if isinstance(work, Sample) else work.request_id
            for work in self.scheduler.waiting
        ]

    def relieve(self) -> None:
        """What the engine does when llama.cpp finds no room for a batch after all."""
        self.scheduler.evict_or_preempt()


def _described(chunk: Chunk) -> tuple[str, int, int, int]:
    return (chunk.sample.request.request_id, chunk.sample.index, chunk.start, chunk.count)


# --- Admission


def test_requests_are_admitted_in_arrival_order_as_slots_free_up():
    h = Harness(max_running=2)
    h.submit("a", prompt(4), max_tokens=1)
    h.submit("b", prompt(4, 200), max_tokens=5)
    h.submit("c", prompt(4, 300), max_tokens=1)
    assert h.step() == [("a", 0, 0, 4), ("b", 0, 0, 4)]
    assert h.waiting == ["c"]
    # a finished with its one token: c takes its place, after b's decode token.
    assert h.step() == [("b", 0, 4, 1), ("c", 0, 0, 4)]
    assert h.waiting == []


def test_a_request_that_cannot_start_yet_holds_back_those_behind_it():
    h = Harness(max_running=2)
    h.submit("a", prompt(4), max_tokens=3)
    h.submit("b", prompt(4, 200), max_tokens=1, n=2)  # needs two samples running at once
    h.submit("c", prompt(4, 300), max_tokens=1)  # would fit, but arrived later
    assert h.step() == [("a", 0, 0, 4)]
    assert h.waiting == ["b", "c"]
    assert h.step() == [("a", 0, 4, 1)]
    assert h.step() == [("a", 0, 5, 1)]  # a's last token
    assert h.waiting == ["b", "c"]
    assert h.step() == [("b", 0, 0, 4)]  # b alone: its prompt once, for both samples
    assert h.waiting == ["c"]
    assert h.run_until_idle() >= 1
    assert all(s.num_output == 1 for s in h.requests["b"].samples + h.requests["c"].samples)


# --- The token budget


def test_a_step_stays_within_the_token_budget_and_long_prompts_are_chunked():
    h = Harness(token_budget=16)
    h.submit("a", prompt(40), max_tokens=2)
    assert h.step() == [("a", 0, 0, 16)]
    assert h.step() == [("a", 0, 16, 16)]
    assert h.step() == [("a", 0, 32, 8)]  # the prompt's last chunk: its logits pick a token
    assert h.step() == [("a", 0, 40, 1)]
    assert not h.scheduler.has_work()


def test_prompt_chunks_shrink_to_prefill_chunk_while_another_stream_decodes():
    h = Harness(token_budget=64, prefill_chunk=8)
    h.submit("a", prompt(4), max_tokens=10)
    assert h.step() == [("a", 0, 0, 4)]
    h.submit("b", prompt(30, 200))
    assert h.step() == [("a", 0, 4, 1), ("b", 0, 0, 8)]
    assert h.step() == [("a", 0, 5, 1), ("b", 0, 8, 8)]


def test_decode_tokens_come_first_and_prompts_get_what_is_left():
    h = Harness(token_budget=4)
    for rid, start in (("a", 100), ("b", 200), ("c", 300)):
        h.submit(rid, [start], max_tokens=10)
    assert h.step() == [("a", 0, 0, 1), ("b", 0, 0, 1), ("c", 0, 0, 1)]
    h.submit("d", prompt(10, 400))
    assert h.step() == [("a", 0, 1, 1), ("b", 0, 1, 1), ("c", 0, 1, 1), ("d", 0, 0, 1)]
    assert h.step() == [("a", 0, 2, 1), ("b", 0, 2, 1), ("c", 0, 2, 1), ("d", 0, 1, 1)]


def test_a_prompt_in_progress_goes_before_a_new_admission():
    h = Harness(token_budget=8)
    h.submit("a", prompt(20))
    assert h.step() == [("a", 0, 0, 8)]
    h.submit("b", prompt(4, 200))
    assert h.step() == [("a", 0, 8, 8)]
    assert h.step() == [("a", 0, 16, 4), ("b", 0, 0, 4)]


# --- Sharing KV: n samples, running samples, the prefix cache


def test_n_samples_compute_the_prompt_once_and_fork_it():
    h = Harness()
    request = h.submit("a", prompt(10), max_tokens=2, n=3)
    assert h.step() == [("a", 0, 0, 10)]
    first = h.slot_of("a", 0)
    assert h.copies == [(first, h.slot_of("a", 1), 10), (first, h.slot_of("a", 2), 10)]
    assert request.forked
    assert h.step() == [("a", 0, 10, 1), ("a", 1, 10, 1), ("a", 2, 10, 1)]
    assert not h.scheduler.has_work()
    assert h.scheduler.kv_used() == 0


def test_a_finished_prefix_in_the_cache_is_forked_not_computed_again():
    h = Harness(cache_entries=4)
    h.submit("a", prompt(20), max_tokens=2)
    h.run_until_idle()
    assert h.scheduler.cache.entries, "a's KV stays cached"
    cached_slot = h.scheduler.cache.entries[0].slot
    b = h.submit("b", prompt(16) + prompt(8, 500))  # shares a's first 16 tokens
    assert h.step() == [("b", 0, 16, 8)]
    assert h.copies == [(cached_slot, h.slot_of("b"), 16)]
    assert b.num_cached == 16
    assert (h.scheduler.queried_tokens, h.scheduler.hit_tokens) == (20 + 24, 16)


def test_a_prefix_shared_with_a_running_sample_is_forked_from_it():
    h = Harness(cache_entries=0)
    h.submit("a", prompt(20), max_tokens=10)
    assert h.step() == [("a", 0, 0, 20)]
    h.submit("b", prompt(12) + prompt(4, 500))
    assert h.step() == [("a", 0, 20, 1), ("b", 0, 12, 4)]
    assert h.copies == [(h.slot_of("a"), h.slot_of("b"), 12)]


def test_a_shared_prefix_shorter_than_min_cache_hit_is_computed_again():
    h = Harness(cache_entries=4, min_cache_hit=8)
    h.submit("a", prompt(20), max_tokens=2)
    h.run_until_idle()
    h.submit("b", prompt(6) + prompt(10, 500))
    assert h.step() == [("b", 0, 0, 16)]
    assert h.copies == []


def test_a_hit_always_leaves_the_last_prompt_token_to_compute():
    h = Harness(cache_entries=4)
    h.submit("a", prompt(20), max_tokens=2)
    h.run_until_idle()
    h.submit("b", prompt(12))  # wholly inside a's cached KV
    assert h.step() == [("b", 0, 11, 1)]  # its logits choose b's first token
    assert h.copies[-1][2] == 11


# --- Running out of room


def test_cached_prefixes_are_evicted_before_any_sample_is_preempted():
    h = Harness(kv_capacity=64, cache_entries=4, cache_cells=64)
    h.submit("a", prompt(30), max_tokens=2)
    h.run_until_idle()
    cached_slot = h.scheduler.cache.entries[0].slot
    assert h.scheduler.kv_used() == 31  # a's prompt and its first token
    h.submit("running", prompt(8, 300), max_tokens=20)
    assert h.step() == [("running", 0, 0, 8)]
    # 64 - 31 - 9 cells are free: too few for b's prompt and room to decode. The
    # cached prefix goes; the running sample stays.
    h.submit("b", prompt(12, 500), max_tokens=2)
    assert h.step() == [("running", 0, 8, 1), ("b", 0, 0, 12)]
    assert h.released == [(cached_slot, 0)]
    assert h.scheduler.cache.entries == []
    assert h.scheduler.num_preempted == 0


def test_a_decode_token_that_finds_no_free_cell_takes_it_from_the_cache():
    h = Harness(kv_capacity=64, cache_entries=4, cache_cells=64)
    h.submit("a", prompt(30), max_tokens=2)
    h.run_until_idle()
    h.submit("long", prompt(8, 300), max_tokens=40)
    while h.scheduler.kv_used() < 64:  # 31 cached cells and the growing sample
        h.step()
    assert h.scheduler.cache.entries and h.released == []
    h.step()
    assert h.scheduler.cache.entries == [] and len(h.released) == 1
    h.run_until_idle()
    assert h.scheduler.num_preempted == 0
    assert len(h.requests["long"].samples[0].tokens) == 48


def test_when_decoding_runs_out_of_cells_the_newest_sample_is_preempted():
    h = Harness(kv_capacity=64, token_budget=64)
    h.submit("old", prompt(8), max_tokens=30)
    h.submit("new", prompt(8, 200), max_tokens=30)
    h.step()
    while h.scheduler.num_preempted == 0:
        h.step()
        assert h.scheduler.kv_used() <= 64
    new = h.requests["new"].samples[0]
    assert h.waiting == ["new"] and new.slot is None
    assert h.released[-1][1] == 0  # all of its cells dropped
    assert [s.request.request_id for s in h.scheduler.running] == ["old"]
    # It comes back once there is room, recomputes every token it had, and finishes.
    h.run_until_idle()
    assert [len(h.requests[r].samples[0].tokens) for r in ("old", "new")] == [38, 38]
    assert h.scheduler.kv_used() == 0


def test_no_room_after_all_evicts_a_cached_prefix_first_then_preempts_the_newest():
    h = Harness(cache_entries=4)
    h.submit("cached", prompt(20), max_tokens=2)
    h.run_until_idle()
    h.submit("old", prompt(6, 300), max_tokens=10)
    h.submit("new", prompt(6, 400), max_tokens=10)
    h.step()
    h.relieve()  # llama.cpp found no room: the cache goes first
    assert h.scheduler.cache.entries == [] and h.scheduler.num_preempted == 0
    h.relieve()  # nothing cached any more: the newest sample goes
    assert h.scheduler.num_preempted == 1
    assert h.waiting == ["new"]


# --- Service tiers


def test_a_priority_request_waits_ahead_of_default_ones_in_arrival_order():
    h = Harness(max_running=1)
    h.submit("running", prompt(4), max_tokens=2)
    h.step()
    h.submit("d1", prompt(4, 200), max_tokens=1)
    h.submit("p1", prompt(4, 300), max_tokens=1, priority=True)
    h.submit("d2", prompt(4, 400), max_tokens=1)
    h.submit("p2", prompt(4, 500), max_tokens=1, priority=True)
    assert h.waiting == ["p1", "p2", "d1", "d2"]
    assert h.step() == [("running", 0, 4, 1)]  # running work is not displaced
    started = []
    while h.scheduler.has_work():
        started += [rid for rid, _, start, _ in h.step() if start == 0]
    assert started == ["p1", "p2", "d1", "d2"]


def test_a_preempted_sample_keeps_the_head_of_its_own_tier():
    h = Harness(kv_capacity=64, token_budget=64)
    h.submit("old", prompt(8), max_tokens=30)
    h.submit("new", prompt(8, 200), max_tokens=30)
    h.step()
    h.submit("p", prompt(60, 300), max_tokens=1, priority=True)  # cannot fit yet
    h.submit("d", prompt(4, 400), max_tokens=1)
    while h.scheduler.num_preempted == 0:
        h.step()
    # The newest default sample was preempted: ahead of new default work, behind priority.
    assert h.waiting == ["p", "new", "d"]


def test_priority_samples_are_preempted_last():
    h = Harness(kv_capacity=64, token_budget=64)
    h.submit("old", prompt(8), max_tokens=30)
    h.submit("vip", prompt(8, 200), max_tokens=30, priority=True)
    h.step()
    while h.scheduler.num_preempted == 0:
        h.step()
        assert h.scheduler.kv_used() <= 64
    # Without a tier "vip", the newest, would go; the default sample goes instead.
    assert h.waiting == ["old"]
    assert [s.request.request_id for s in h.scheduler.running] == ["vip"]
    h.run_until_idle()
    assert [len(h.requests[r].samples[0].tokens) for r in ("old", "vip")] == [38, 38]


def test_priority_prompts_are_chunked_first():
    h = Harness(token_budget=8)
    h.submit("d", prompt(20), max_tokens=1)
    h.submit("p", prompt(20, 300), max_tokens=1, priority=True)
    assert h.step() == [("p", 0, 0, 8)]  # admitted first, and its prompt goes first
    h.step()
    assert h.step() == [("p", 0, 16, 4), ("d", 0, 0, 4)]


# --- Isolation keys


def test_a_cached_prefix_is_shared_only_within_its_isolation_key():
    h = Harness(cache_entries=4)
    h.submit("a", prompt(20), max_tokens=2, isolation_key="tenant-a")
    h.run_until_idle()
    b = h.submit("b", prompt(20), isolation_key="tenant-b")
    assert h.step() == [("b", 0, 0, 20)]  # computed in full: a's KV is not b's to see
    assert b.num_cached == 0 and h.copies == []
    h.run_until_idle()
    none = h.submit("none", prompt(20))  # no key sees neither
    assert h.step() == [("none", 0, 0, 20)] and none.num_cached == 0
    h.run_until_idle()
    a2 = h.submit("a2", prompt(20), isolation_key="tenant-a")
    assert h.step() == [("a2", 0, 19, 1)]
    assert a2.num_cached == 19
    # Both keys keep their own entry of the same tokens.
    keys = sorted(str(e.isolation_key) for e in h.scheduler.cache.entries)
    assert keys == ["None", "tenant-a", "tenant-b"]


def test_a_running_sample_is_a_prefix_source_only_within_its_isolation_key():
    h = Harness(cache_entries=0)
    h.submit("a", prompt(20), max_tokens=10, isolation_key="k1")
    assert h.step() == [("a", 0, 0, 20)]
    h.submit("other", prompt(12) + prompt(4, 500), isolation_key="k2")
    h.submit("same", prompt(12) + prompt(4, 600), isolation_key="k1")
    assert h.step() == [("a", 0, 20, 1), ("other", 0, 0, 16), ("same", 0, 12, 4)]
    assert h.copies == [(h.slot_of("a"), h.slot_of("same"), 12)]


# --- --deterministic: fixed prompt chunks, aligned prefix hits


def test_fixed_chunks_end_at_multiples_of_the_chunk_whatever_the_budget_leaves():
    h = Harness(fixed_chunk=16, token_budget=40, prefill_chunk=40)
    h.submit("a", prompt(20, 200), max_tokens=30)
    h.step()
    h.step()  # "a" decodes now: budget 39 left, 40 for a prompt chunk at most
    h.submit("b", prompt(50, 300))
    ran = [c for c in h.step() + h.step() + h.step() + h.step() if c[0] == "b"]
    starts_and_ends = [(start, start + count) for _, _, start, count in ran]
    assert starts_and_ends == [(0, 16), (16, 32), (32, 48), (48, 50)]


def test_fixed_chunk_prefix_hits_end_on_a_boundary_within_the_source_prompt():
    h = Harness(fixed_chunk=16, cache_entries=4, token_budget=64, prefill_chunk=64)
    h.submit("a", prompt(40), max_tokens=8)
    h.run_until_idle()
    h.submit("b", prompt(40) + prompt(10, 500))  # shares 40 prompt (+ 8 output) tokens
    h.step()
    b = h.requests["b"]
    assert b.num_cached == 32  # 40 shared prompt tokens, cut to the last 16-boundary


def test_fixed_chunks_recompute_a_sample_as_it_was_computed_prompt_then_tokens():
    # Preempted after 3 output tokens: its prompt again in the same 16-token chunks,
    # ending where the prompt ends, then each output token alone, as its decode row was.
    h = Harness(fixed_chunk=16, token_budget=64, prefill_chunk=64)
    request = h.submit("a", prompt(20), max_tokens=10)
    for _ in range(4):
        h.step()
    sample = request.samples[0]
    assert sample.num_output == 3
    h.scheduler._preempt(sample)
    ran = [c[2:] for c in h.step() + h.step() + h.step() + h.step() + h.step()]
    assert ran == [(0, 16), (16, 4), (20, 1), (21, 1), (22, 1)]


# --- A stream of cells per sequence id (llama.cpp without a unified cache, the default)


def streams(**config: Any) -> Harness:
    settings: dict[str, Any] = {"num_slots": 4, "max_running": 4, "slot_cells": 64}
    return Harness(**(settings | config))


def test_with_streams_a_new_sample_joins_the_running_ids_without_moving_an_entry():
    h = streams(cache_entries=2)
    h.submit("a", prompt(8), max_tokens=1)
    h.submit("b", prompt(8, 200), max_tokens=20)
    h.step()  # a finishes on its first token: its KV stays cached in id 0
    assert h.slot_of("b") == 1 and [e.slot for e in h.scheduler.cache.entries] == [0]
    h.submit("c", prompt(8, 300), max_tokens=2)
    h.step()
    # Id 2 is as adjacent to b as id 0, and holds nothing: nothing moves, nothing copies.
    assert h.slot_of("c") == 2 and h.copies == []


def test_with_streams_an_entry_in_the_way_moves_so_running_ids_stay_adjacent():
    h = streams(cache_entries=2)
    h.submit("a", prompt(8), max_tokens=20)
    h.submit("b", prompt(8, 200), max_tokens=1)
    h.submit("c", prompt(8, 300), max_tokens=20)
    h.step()  # b finishes: its entry sits in id 1, between a (0) and c (2)
    assert [h.slot_of("a"), h.slot_of("c")] == [0, 2]
    h.submit("d", prompt(8, 400), max_tokens=2)
    h.step()
    # Id 1 closes the gap (one pass over the weights a step instead of two): b's entry
    # is copied to the free id 3 first.
    assert h.slot_of("d") == 1
    assert h.copies == [(1, 3, 8)] and (1, 0) in h.released
    assert [(e.slot, len(e.tokens)) for e in h.scheduler.cache.entries] == [(3, 8)]


def test_with_streams_a_hit_on_a_cached_entry_takes_its_id_over_without_a_copy():
    h = streams(cache_entries=2)
    h.submit("a", prompt(12), max_tokens=1)
    h.run_until_idle()
    assert [e.slot for e in h.scheduler.cache.entries] == [0]
    h.submit("b", prompt(8) + prompt(4, 500))  # shares a's first 8 tokens
    assert h.step()[0] == ("b", 0, 8, 4)
    assert h.slot_of("b") == 0 and h.copies == []
    assert h.released[-1] == (0, 8)  # a's cells past the shared prefix go
    assert h.scheduler.cache.entries == []  # the entry is b's sequence now


def test_with_streams_a_hit_is_copied_when_its_id_would_leave_a_gap():
    h = streams(cache_entries=2)
    h.submit("a", prompt(12), max_tokens=20)
    h.submit("b", prompt(12, 200), max_tokens=1)
    h.submit("c", prompt(12, 300), max_tokens=1)
    h.step()  # b (id 1) and c (id 2) finish: entries; a runs in id 0
    h.submit("d", prompt(8, 300) + prompt(4, 600))  # shares c's first 8
    h.step()
    # c's entry in id 2 would leave a gap after a; id 1 joins a, so the prefix is
    # copied there (b's entry moves out of the way to id 3 first).
    assert h.slot_of("d") == 1
    assert h.copies == [(1, 3, 12), (2, 1, 8)]


def test_with_streams_n_above_the_ids_runs_its_samples_in_turns():
    h = streams(num_slots=3, max_running=3, cache_entries=1)
    request = h.submit("a", prompt(8), max_tokens=3, n=5)
    held, chunks = [], []
    while h.scheduler.has_work():
        chunks += h.step()
        held.append(sum(1 for s in request.samples if s.slot is not None))
    assert all(s.num_output == 3 for s in request.samples)
    assert max(held) == 3
    # The two that waited start from the prompt's cached KV, not from scratch.
    assert [c for c in chunks if c[1] >= 3 and c[2] == 0] == []
    assert sorted(c[2] for c in chunks if c[1] >= 3)[:2] == [8, 8]


def test_with_streams_cells_past_the_shared_pool_preempt_no_one():
    # 4 x 60 cells: far past a 64-cell pool, but each sample has 64 cells of its own.
    h = streams(kv_capacity=64, cache_cells=64, token_budget=256, prefill_chunk=256)
    for i in range(4):
        h.submit(f"r{i}", prompt(40, 100 * (i + 1)), max_tokens=20)
    h.run_until_idle()
    assert h.scheduler.num_preempted == 0
    assert all(r.samples[0].num_output == 20 for r in h.requests.values())
