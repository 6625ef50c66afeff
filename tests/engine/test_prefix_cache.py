"""The prefix cache and the KV ledger on a fake runner that behaves like llama.cpp's
unified cache: cells tagged with sequence ids, shared by seq_cp, freed when their
last id goes. The next token depends on every (position, token) the sequence can
see, so a fork of the wrong length or from the wrong sequence changes the output.
Unit tests of the bookkeeping, not evidence about a model.
"""

from __future__ import annotations

import asyncio

import pytest

from fireside.engine.engine import Engine
from fireside.engine.kv import KVLedger, common_prefix
from fireside.engine.types import EngineRequest, SamplingParams
from tests.fakes import CellRunner, engine_config


def make_engine(n_ctx: int = 2048, cache_entries: int = 8, **kwargs) -> tuple[Engine, CellRunner]:
    runner = CellRunner(n_ctx)
    engine = Engine(
        runner,
        engine_config(max_running=8, token_budget=64, cache_entries=cache_entries, **kwargs),
    )
    runner.ledger = engine.scheduler.ledger
    engine.start()
    return engine, runner


def run(engine: Engine, prompts: list[list[int]], concurrent: bool = True, **params) -> list:
    """(token ids, cached tokens) per prompt."""

    async def one(i: int, prompt: list[int]):
        sp = SamplingParams(**{"max_tokens": 8, "temperature": 0, **params})
        tokens, cached = [], 0
        async for out in engine.generate(EngineRequest(f"r{i}-{id(prompt)}", tuple(prompt), sp)):
            assert out.error is None
            cached = max(cached, out.num_cached_tokens)
            tokens += [t for d in out.deltas for t in d.token_ids]
        return tokens, cached

    async def main():
        if concurrent:
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        return [await one(i, p) for i, p in enumerate(prompts)]

    return asyncio.run(main())


PREFIX = list(range(3, 63)) * 2  # 120 tokens


def reference(prompts: list[list[int]], **params) -> list[list[int]]:
    engine, _ = make_engine(cache_entries=0)
    try:
        return [tokens for tokens, _ in run(engine, prompts, concurrent=False, **params)]
    finally:
        engine.shutdown()


def test_a_repeated_prompt_hits_the_cache_and_gives_the_same_output():
    engine, runner = make_engine()
    try:
        ((first, c1),) = run(engine, [PREFIX])
        ((second, c2),) = run(engine, [PREFIX])
    finally:
        engine.shutdown()
    assert c1 == 0 and c2 == len(PREFIX) - 1  # one prompt token is always computed
    assert first == second == reference([PREFIX])[0]


def test_shared_prefixes_then_divergent_tails_match_a_cold_engine():
    prompts = [PREFIX + [5, 6, 7], PREFIX + [9] * 10, PREFIX[:70] + [4] * 30, PREFIX]
    engine, _ = make_engine()
    try:
        warm = run(engine, prompts, concurrent=False)
    finally:
        engine.shutdown()
    assert [t for t, _ in warm] == reference(prompts)
    assert [c for _, c in warm] == [0, len(PREFIX), 70, len(PREFIX) - 1]


def test_concurrent_requests_compute_a_shared_prefix_once():
    prompts = [PREFIX + [10 + i] * 5 for i in range(6)]
    engine, _ = make_engine()
    try:
        results = run(engine, prompts)
        prefilled = engine.stats().prefill_tokens_total
    finally:
        engine.shutdown()
    assert [t for t, _ in results] == reference(prompts)
    assert prefilled < 2 * len(PREFIX) + 6 * 5  # not 6 times the prefix
    assert sum(c for _, c in results) >= 4 * len(PREFIX)


def test_eviction_keeps_the_cache_bounded_and_everything_finishes():
    prompts = [[3 + (i * 7 + j) % 60 for j in range(40 + i)] for i in range(30)]
    engine, runner = make_engine(n_ctx=400, cache_entries=6)
    try:
        results = run(engine, prompts)
        assert len(engine.scheduler.cache.entries) <= 6
        assert engine.scheduler.kv_used() <= 400
        # Idle cached cells stay within a quarter of the KV (they slow every decode step),
        # give or take the newest entry, which is always kept.
        assert engine.scheduler.kv_used() <= 400 // 4 + 77
        engine.scheduler.clear_cache()
        assert engine.scheduler.kv_used() == 0 and runner.used == 0
    finally:
        engine.shutdown()
    assert [t for t, _ in results] == reference(prompts)


def test_scoring_requests_bypass_hits_and_prompt_cache_max_len_caps_them():
    engine, _ = make_engine()
    try:
        run(engine, [PREFIX])
        ((_, scored),) = run(engine, [PREFIX], prompt_logprobs=0)
        ((_, capped),) = run(engine, [PREFIX], prompt_cache_max_len=50)
        ((_, off),) = run(engine, [PREFIX], prompt_cache_max_len=0)
    finally:
        engine.shutdown()
    assert (scored, capped, off) == (0, 50, 0)


def test_n_samples_and_the_cache_together():
    engine, runner = make_engine()
    try:
        a = run(engine, [PREFIX], n=3, temperature=1.0, seed=4)
        b = run(engine, [PREFIX], n=3, temperature=1.0, seed=4)
        assert len(engine.scheduler.cache.entries) == 1  # samples share one entry
        engine.scheduler.clear_cache()
        assert runner.used == 0
    finally:
        engine.shutdown()
    assert a[0][0] == b[0][0] and b[0][1] == len(PREFIX) - 1


def test_ledger_counts_shared_prefixes_once():
    ledger = KVLedger()
    ledger.grow(0, 100)
    ledger.fork(0, 1, 60)
    ledger.grow(1, 10)
    assert ledger.used == 110
    assert ledger.exclusive(0) == 40 and ledger.exclusive(1) == 10
    ledger.drop(0)
    assert ledger.used == 70  # 60 shared cells live on in 1
    ledger.fork(1, 2, 65)
    ledger.drop(1)
    assert ledger.used == 65
    ledger.drop(2)
    assert ledger.used == 0


@pytest.mark.parametrize(
    ("a", "b", "limit", "want"),
    [
        ([1, 2, 3], [1, 2, 4], 9, 2),
        ([1, 2], [1, 2, 3], 9, 2),
        ((5,), [6], 9, 0),
        (list(range(1000)), list(range(999)) + [0], 2000, 999),
        ([1, 2, 3], [1, 2, 3], 2, 2),
    ],
)
def test_common_prefix(a, b, limit, want):
    assert common_prefix(a, b, limit) == want


def run_keyed(engine: Engine, prompt: list[int], key: str | None, rid: str) -> tuple[list, int]:
    """(token ids, cached tokens) of one request with an isolation key."""

    async def main():
        sp = SamplingParams(max_tokens=8, temperature=0)
        tokens, cached = [], 0
        request = EngineRequest(rid, tuple(prompt), sp, cache_isolation_key=key)
        async for out in engine.generate(request):
            assert out.error is None
            cached = max(cached, out.num_cached_tokens)
            tokens += [t for d in out.deltas for t in d.token_ids]
        return tokens, cached

    return asyncio.run(main())


def test_isolation_keys_share_cached_kv_only_within_the_same_key():
    engine, _ = make_engine()
    try:
        first, c_a = run_keyed(engine, PREFIX, "tenant-a", "a1")
        other, c_b = run_keyed(engine, PREFIX, "tenant-b", "b1")
        unkeyed, c_none = run_keyed(engine, PREFIX, None, "n1")
        again, c_a2 = run_keyed(engine, PREFIX, "tenant-a", "a2")
        b_again, c_b2 = run_keyed(engine, PREFIX, "tenant-b", "b2")
    finally:
        engine.shutdown()
    assert (c_a, c_b, c_none) == (0, 0, 0)  # nobody sees another key's prefix
    assert c_a2 == c_b2 == len(PREFIX) - 1  # the same key hits
    assert first == other == unkeyed == again == b_again == reference([PREFIX])[0]


def test_concurrent_requests_of_different_keys_do_not_fork_from_each_other():
    engine, runner = make_engine(cache_entries=0)

    async def main():
        async def one(rid: str, key: str):
            sp = SamplingParams(max_tokens=8, temperature=0)
            cached = 0
            request = EngineRequest(rid, tuple(PREFIX), sp, cache_isolation_key=key)
            async for out in engine.generate(request):
                cached = max(cached, out.num_cached_tokens)
            return cached

        return await asyncio.gather(*(one(f"r{i}", f"key-{i}") for i in range(3)))

    try:
        cached = asyncio.run(main())
    finally:
        engine.shutdown()
    assert cached == [0, 0, 0]
