"""Prompt scoring on a fake runner whose logits say which position made them.

The logits after the token at position p peak at token (7p + 3) mod V, so a
score attached to the wrong position, or a logits row read from the wrong
place in the batch, shows. Unit test of the bookkeeping, not of the model.
"""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np

from fireside.engine.engine import Engine
from fireside.engine.types import EngineRequest, FinishReason, SamplingParams
from fireside.runner.base import Batch
from tests.fakes import FakeRunner, engine_config


def peak(pos: int, vocab: int) -> int:
    return (7 * pos + 3) % vocab


class PositionRunner(FakeRunner):
    n_ctx = 96
    max_rows = 0

    def forward(self, batch: Batch) -> np.ndarray:
        super().forward(batch)
        rows = [p for p, want in zip(batch.positions, batch.want_logits, strict=True) if want]
        self.max_rows = max(self.max_rows, len(rows))
        logits = np.zeros((len(rows), self.vocab_size), dtype=np.float32)
        for r, pos in enumerate(rows):
            logits[r, peak(pos, self.vocab_size)] = 5.0
        return logits


def run_all(engine: Engine, requests: list[EngineRequest]) -> list[list]:
    async def one(req: EngineRequest) -> list:
        return [out async for out in engine.generate(req)]

    async def main() -> list[list]:
        return await asyncio.gather(*(one(r) for r in requests))

    return asyncio.run(main())


def check_scores(prompt: tuple[int, ...], scores, start: int, vocab: int) -> None:
    assert len(scores) == len(prompt) - start
    for offset, score in enumerate(scores):
        t = start + offset
        if t == 0:
            assert score is None
            continue
        assert score.token_id == prompt[t]
        if score.top:
            assert score.top[0][0] == peak(t - 1, vocab)  # scored by the logits at t - 1
        expected = 5.0 if prompt[t] == peak(t - 1, vocab) else 0.0
        lse = np.log(np.exp(5.0) + vocab - 1)
        assert abs(score.logprob - (expected - lse)) < 1e-5


def test_prompt_scores_come_once_in_the_first_output_with_positions_right():
    runner = PositionRunner()
    engine = Engine(runner, engine_config(max_running=8, token_budget=32, cache_entries=0))
    engine.scheduler.config = dataclasses.replace(engine.scheduler.config, max_scored_rows=12)
    engine.start()
    prompt = tuple((3 * i + 1) % 50 for i in range(45))
    requests = [
        # scoring only: nothing generated, finish_reason length
        EngineRequest("score", prompt, SamplingParams(max_tokens=0, prompt_logprobs=2)),
        # echo_last-style: scores from position 30, then three tokens with logprobs, n=2
        EngineRequest(
            "gen",
            prompt,
            SamplingParams(
                max_tokens=3,
                temperature=0,
                n=2,
                logprobs=1,
                prompt_logprobs=0,
                prompt_logprobs_start=30,
            ),
        ),
        # unscored traffic alongside
        *[
            EngineRequest(f"o{i}", prompt[:20], SamplingParams(max_tokens=30, temperature=0, n=2))  # noqa: E501
            for i in range(3)
        ],
    ]
    try:
        results = run_all(engine, requests)
    finally:
        engine.shutdown()

    score_outs, gen_outs = results[0], results[1]
    assert [o.prompt_logprobs is not None for o in score_outs] == [True] + [False] * (
        len(score_outs) - 1
    )
    check_scores(prompt, score_outs[0].prompt_logprobs, 0, runner.vocab_size)
    assert all(len(s.top) == 2 for s in score_outs[0].prompt_logprobs[1:])
    final = [d for o in score_outs for d in o.deltas]
    assert {d.finish_reason for d in final} == {FinishReason.LENGTH}
    assert all(d.token_ids == () for d in final)

    assert gen_outs[0].prompt_logprobs is not None
    check_scores(prompt, gen_outs[0].prompt_logprobs, 30, runner.vocab_size)
    for j in range(2):
        deltas = [d for o in gen_outs for d in o.deltas if d.index == j]
        tokens = [t for d in deltas for t in d.token_ids]
        logprobs = [lp for d in deltas for lp in d.logprobs]
        assert len(tokens) == 3 and [lp.token_id for lp in logprobs] == tokens
        # Greedy: each token is the top alternative after the token before it.
        for k, (token, lp) in enumerate(zip(tokens, logprobs, strict=True)):
            assert token == peak(len(prompt) - 1 + k, runner.vocab_size)
            assert lp.top[0][0] == token and len(lp.top) == 1
            assert lp.sampling_logprob == 0.0

    assert runner.max_rows <= 12 + 8  # scored rows bounded, plus one row per decoding sequence
    assert engine.scheduler.kv_used() == 0 and runner.cells == {}
