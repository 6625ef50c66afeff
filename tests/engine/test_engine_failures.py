"""A step that fails fails its own requests, not the engine (fake runner)."""

from __future__ import annotations

import asyncio

import numpy as np

from fireside.engine.engine import Engine
from fireside.engine.types import EngineRequest, SamplingParams
from fireside.runner.base import Batch
from tests.fakes import FakeRunner, engine_config

POISON = 13


class PoisonRunner(FakeRunner):
    """Raises on any batch holding the poison token (a stand-in for any step bug)."""

    def forward(self, batch: Batch) -> np.ndarray:
        if POISON in batch.tokens:
            raise ValueError("poisoned batch")
        return super().forward(batch)


def run(engine: Engine, prompt: tuple[int, ...]) -> tuple[str | None, int]:
    async def main():
        tokens, error = 0, None
        request = EngineRequest(f"r{prompt}", prompt, SamplingParams(max_tokens=5, temperature=0))
        async for out in engine.generate(request):
            error = out.error or error
            tokens += sum(len(d.token_ids) for d in out.deltas)
        return error, tokens

    return asyncio.run(main())


def test_a_failing_step_fails_its_request_and_the_engine_goes_on():
    runner = PoisonRunner()
    engine = Engine(runner, engine_config(max_running=4, token_budget=32, cache_entries=0))
    engine.start()
    try:
        error, _ = run(engine, (3, POISON, 5))
        assert error is not None
        assert engine.is_healthy
        assert run(engine, (3, 4, 5)) == (None, 5)  # the next request is served normally
        assert engine.scheduler.kv_used() == 0 and runner.cells == {}
    finally:
        engine.shutdown()


def test_failing_again_and_again_stops_the_engine():
    engine = Engine(PoisonRunner(), engine_config(max_running=4, token_budget=32))
    engine.start()
    try:
        for _ in range(3):
            error, _ = run(engine, (POISON,))
            assert error is not None
        assert engine.is_dead and not engine.is_healthy
    finally:
        engine.shutdown()
