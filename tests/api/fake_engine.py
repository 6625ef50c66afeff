"""A fake `EngineClient`: words are tokens, and samples say which step made them.

Sample j's k-th token is the text " s{j}t{k}", so a test can tell every choice
and every delta apart without a model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from fireside.engine.types import (
    EngineRequest,
    EngineStats,
    FinishReason,
    RequestOutput,
    SampleDelta,
)


class FakeEngine:
    def __init__(
        self,
        *,
        vocab_size: int = 1000,
        context_length: int = 64,
        num_words: int = 3,  # tokens a sample makes before "end of sequence"
        error_at_step: int | None = None,
        hang: bool = False,
        cached_tokens: int = 0,
    ) -> None:
        self._vocab_size = vocab_size
        self._context_length = context_length
        self.num_words = num_words
        self.error_at_step = error_at_step
        self.hang = hang  # never produce anything: for disconnect tests
        self.cached_tokens = cached_tokens
        self.healthy = True
        self.fail_tokenize = False
        self.requests: list[EngineRequest] = []
        self.closed_early: list[str] = []  # request ids whose iteration was left early
        self.num_tokenize_calls = 0
        self._ids: dict[str, int] = {}
        self._words: dict[int, str] = {}

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def is_healthy(self) -> bool:
        return self.healthy

    def tokenize(self, text: str) -> list[int]:
        self.num_tokenize_calls += 1
        if self.fail_tokenize:
            raise RuntimeError("secret internal detail")
        ids = []
        for word in text.split():
            if word not in self._ids:
                self._ids[word] = 10 + len(self._ids)
                self._words[self._ids[word]] = word
            ids.append(self._ids[word])
        return ids

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return " ".join(self._words.get(i, f"<{i}>") for i in token_ids)

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        self.requests.append(request)
        params = request.params
        num_steps = min(params.max_tokens, self.num_words)
        reason = FinishReason.LENGTH if params.max_tokens <= self.num_words else FinishReason.STOP
        is_finished = False
        try:
            if self.hang:
                await asyncio.Event().wait()
            for step in range(num_steps):
                await asyncio.sleep(0)
                if step == self.error_at_step:
                    is_finished = True
                    yield RequestOutput(request.request_id, error="boom", finished=True)
                    return
                is_last = step == num_steps - 1
                deltas = tuple(
                    SampleDelta(j, f" s{j}t{step}", (100 + step,), reason if is_last else None)
                    for j in range(params.n)
                )
                is_finished = is_last
                yield RequestOutput(
                    request.request_id,
                    deltas,
                    num_prompt_tokens=len(request.prompt_token_ids),
                    num_cached_tokens=self.cached_tokens,
                    finished=is_last,
                )
        finally:
            if not is_finished:
                self.closed_early.append(request.request_id)

    def abort(self, request_id: str) -> None:
        self.closed_early.append(request_id)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running_seqs=2,
            num_waiting_requests=1,
            num_kv_cells_used=16,
            num_kv_cells_total=64,
            prefill_tokens_total=7,
            generated_tokens_total=11,
        )
