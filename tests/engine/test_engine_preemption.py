"""The engine on a fake runner (unit test of scheduling, not evidence about the model).

A tiny KV cache forces preemption: every request must still finish with the
tokens it asked for, and the cache must end empty.
"""

from __future__ import annotations

import asyncio

import numpy as np

from fireside.engine.engine import Engine, EngineConfig
from fireside.engine.types import EngineRequest, SamplingParams
from fireside.runner.base import Batch


class FakeRunner:
    vocab_size = 50
    n_ctx = 64
    n_ctx_train = 64
    n_batch = 32
    n_seq_max = 8
    add_bos = False

    def __init__(self) -> None:
        self.cells: dict[int, set[int]] = {}

    def tokenize(self, text: str) -> list[int]:
        return [3 + ord(c) % 40 for c in text]

    def token_bytes(self, token: int) -> bytes:
        return b"x"

    def is_eog(self, token: int) -> bool:
        return token == 0

    def detokenize(self, token_ids) -> str:
        return "x" * len(token_ids)

    def forward(self, batch: Batch) -> np.ndarray:
        assert 0 < len(batch) <= self.n_batch
        for pos, seq in zip(batch.positions, batch.seq_ids, strict=True):
            self.cells.setdefault(seq, set()).add(pos)
        used = len({(s, p) for s, ps in self.cells.items() for p in ps})
        assert used <= self.n_ctx * 2  # forks may share; the scheduler's own count is checked below
        logits = np.zeros((batch.num_logits, self.vocab_size), dtype=np.float32)
        logits[:, 7] = 1.0  # never end-of-generation
        return logits

    def seq_remove(self, seq_id: int, start: int = 0, end: int = -1) -> None:
        self.cells.pop(seq_id, None)

    def seq_copy(self, src: int, dst: int, start: int, end: int) -> None:
        self.cells[dst] = {p for p in self.cells.get(src, set()) if start <= p < end}


def test_preemption_finishes_everything_and_frees_the_cache():
    runner = FakeRunner()
    engine = Engine(runner, EngineConfig(max_running=8, token_budget=32, cache_entries=0))
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
