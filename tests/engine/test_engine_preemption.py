"""The engine on a fake runner (unit test of scheduling, not evidence about the model).

A tiny KV cache forces preemption: every request must still finish with the
tokens it asked for, and the cache must end empty.
"""

from __future__ import annotations

import asyncio

from fireside.engine.engine import Engine
from fireside.engine.types import EngineRequest, SamplingParams
from tests.fakes import FakeRunner, engine_config


def test_preemption_finishes_everything_and_frees_the_cache():
    runner = FakeRunner()
    engine = Engine(runner, engine_config(max_running=8, token_budget=32, cache_entries=0))
    engine.start()

    async def run(i: int) -> int:
        req = EngineRequest(
            f"r{i}", tuple(range(3, 13)), SamplingParams(max_tokens=20, temperature=0, n=4)
        )
        tokens = 0
        async for out in engine.generate(req):
            assert out.error is None
            tokens += sum(len(d.token_ids) for d in out.deltas)
        return tokens

    async def main():
        return await asyncio.gather(*(run(i) for i in range(3)))

    try:
        counts = asyncio.run(main())
    finally:
        engine.shutdown()
    assert counts == [80] * 3
    assert engine.scheduler.num_preempted > 0
    assert engine.scheduler.kv_used() == 0
    assert not engine.scheduler.running
    assert runner.cells == {}
