"""Every choice of one request: what the engine sent so far, and the choice objects built from it.

Fed the engine's outputs in order, `Choices` keeps each choice's text, token
ids and logprob positions. One builder (`_Choice.body`) makes both a streamed
chunk's choice (the tokens of one delta) and a whole response's choice (all of
them), so streamed and non-streamed answers agree field by field.

Text offsets are counted from token bytes (`logprobs.OffsetCounter`): prompt
tokens from the start of the echo, generated tokens from its end. They are
clamped to the text known when the object is built: the whole text in a
response, the text up to and including the chunk in a stream.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import cast

from fireside.api.logprobs import (
    ContentLogprobs,
    OffsetCounter,
    Position,
    TokenTexts,
    logprobs_dict,
    scored_positions,
)
from fireside.api.plan import CompletionPlan, OutputOptions, PromptPlan
from fireside.api.protocol import LogprobsFormat
from fireside.api.responses import (
    CompletionChoice,
    CompletionChunkChoice,
    PerfMetrics,
    RawOutput,
    Usage,
    choice_dict,
    perf_metrics_dict,
    usage_dict,
)
from fireside.engine.types import (
    FinishReason,
    RequestOutput,
    SampleDelta,
    SpeculationCounts,
    TokenLogprob,
)


class _Choice:
    def __init__(
        self, index: int, prompt: PromptPlan, options: OutputOptions, texts: TokenTexts
    ) -> None:
        self.index = index
        self.prompt = prompt
        self._options = options
        self._texts = texts
        self.text = prompt.echo_text
        self.finish_reason: FinishReason | None = None
        self.token_ids: list[int] = []  # generated
        self.positions: list[Position] = []  # scored prompt tokens, then generated ones
        self._num_prompt_positions = 0
        self._offsets = OffsetCounter(start=len(prompt.echo_text))
        self._is_started = False  # a streamed chunk of this choice was built

    def add_prompt_positions(self, positions: list[Position]) -> None:
        self.positions[:0] = positions
        self._num_prompt_positions = len(positions)

    def add(self, delta: SampleDelta) -> list[Position]:
        """Take one delta; returns the positions of its tokens (none without logprobs)."""
        self.text += delta.text
        self.token_ids += delta.token_ids
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
        if self._options.logprobs is None or delta.logprobs is None:
            return []
        positions = scored_positions(delta.token_ids, delta.logprobs, self._offsets, self._texts)
        self.positions += positions
        return positions

    def chunk(
        self, text: str, positions: list[Position], token_ids: list[int], is_last: bool
    ) -> CompletionChunkChoice:
        """This choice in a streamed chunk, built right after `add` took its tokens."""
        body = self.body(text, positions, token_ids, is_first=not self._is_started, is_last=is_last)
        self._is_started = True
        return body

    def whole(self) -> CompletionChoice:
        """This choice in a non-streamed response."""
        body = self.body(self.text, self.positions, self.token_ids, is_first=True, is_last=True)
        # Every choice of a whole response has finished, so it has its reason.
        return cast(CompletionChoice, body)

    def body(
        self,
        text: str,
        positions: list[Position],
        token_ids: list[int],
        *,
        is_first: bool,
        is_last: bool,
    ) -> CompletionChunkChoice:
        options = self._options
        logprobs = None
        if options.logprobs is not None:
            logprobs = logprobs_dict(
                options.logprobs, positions, self._texts, options.num_top_logprobs, len(self.text)
            )
        return choice_dict(
            self.index,
            text,
            self.finish_reason if is_last else None,
            logprobs,
            prompt_token_ids=(
                list(self.prompt.token_ids) if options.return_token_ids and is_first else None
            ),
            token_ids=list(token_ids) if options.return_token_ids else None,
            raw_output=self._raw_output() if options.raw_output and is_last else None,
        )

    def _raw_output(self) -> RawOutput:
        num_echo_chars = len(self.prompt.echo_text)
        completion = self.text[num_echo_chars:]
        logprobs = None
        if self._options.logprobs is not None:
            # Always the content[] format; offsets count from the completion's start.
            logprobs = logprobs_dict(
                LogprobsFormat.CONTENT,
                self.positions[self._num_prompt_positions :],
                self._texts,
                self._options.num_top_logprobs,
                len(completion),
                shift=num_echo_chars,
            )
        return {
            "prompt_fragments": self.prompt.fragments,
            "prompt_token_ids": list(self.prompt.token_ids),
            "completion": completion,
            "completion_token_ids": list(self.token_ids),
            "completion_logprobs": cast(ContentLogprobs | None, logprobs),
        }


class Choices:
    """Every choice of a request; in a stream, also the chunk choices each update makes.

    Choice `index = prompt_index * n + j`. The methods that take engine news return
    the choices of the chunks to send, in order (always empty when not streaming).
    """

    def __init__(self, plan: CompletionPlan) -> None:
        self._started_at = plan.started_at
        self._n = plan.n
        self._is_stream = plan.stream
        self._options = plan.options
        self._texts = TokenTexts(plan.engine.token_bytes)
        self._choices = [
            _Choice(p.index * plan.n + j, p, plan.options, self._texts)
            for p in plan.prompts
            for j in range(plan.n)
        ]
        self._cached = [0] * len(plan.prompts)
        # Each prompt's speculative decoding so far (the engine sends its totals).
        self._speculation = [SpeculationCounts()] * len(plan.prompts)
        self._num_prompt_tokens = plan.num_prompt_tokens
        self._num_generated = 0
        self.first_token_at: float | None = None  # time.monotonic() of the first token
        self.token_gaps: list[float] = []  # seconds between a prompt's token outputs
        self._last_token_at: dict[int, float] = {}  # per prompt

    def _of_prompt(self, prompt: PromptPlan) -> list[_Choice]:
        return self._choices[prompt.index * self._n : (prompt.index + 1) * self._n]

    def start(self, prompt: PromptPlan) -> list[CompletionChunkChoice]:
        """Before the engine answers: a prompt with nothing to generate is done; a stream
        sends the echo first, unless it waits for the prompt's scores (in `add`)."""
        chunks: list[CompletionChunkChoice] = []
        for choice in self._of_prompt(prompt):
            if not prompt.needs_engine:
                choice.finish_reason = FinishReason.LENGTH
                if self._is_stream:
                    chunks.append(choice.chunk(prompt.echo_text, [], [], is_last=True))
            elif self._is_stream and prompt.echo_text and not prompt.is_scored:
                chunks.append(choice.chunk(prompt.echo_text, [], [], is_last=False))
        return chunks

    def add(self, prompt: PromptPlan, output: RequestOutput) -> list[CompletionChunkChoice]:
        """Take one engine output of this prompt."""
        chunks: list[CompletionChunkChoice] = []
        self._cached[prompt.index] = max(self._cached[prompt.index], output.num_cached_tokens)
        if output.speculation is not None:
            self._speculation[prompt.index] = output.speculation
        if prompt.is_scored and output.prompt_logprobs is not None:
            # The echo chunk carries the prompt's logprobs, so it goes out now, before
            # this output's deltas.
            chunks += self._add_prompt_scores(prompt, output.prompt_logprobs)
        if any(d.token_ids for d in output.deltas):
            # One engine step's tokens for this prompt: a gap for latency metrics.
            now = time.monotonic()
            if self.first_token_at is None:
                self.first_token_at = now
            last = self._last_token_at.get(prompt.index)
            if last is not None:
                self.token_gaps.append(now - last)
            self._last_token_at[prompt.index] = now
        for delta in output.deltas:
            choice = self._choices[prompt.index * self._n + delta.index]
            positions = choice.add(delta)
            if delta.token_ids:
                self._num_generated += len(delta.token_ids)
            is_last = delta.finish_reason is not None
            has_news = delta.text or is_last or (delta.token_ids and self._options.is_per_token)
            if self._is_stream and has_news:
                chunks.append(choice.chunk(delta.text, positions, list(delta.token_ids), is_last))
        return chunks

    def _add_prompt_scores(
        self, prompt: PromptPlan, scores: Sequence[TokenLogprob | None]
    ) -> list[CompletionChunkChoice]:
        token_ids = prompt.token_ids[prompt.params.prompt_logprobs_start :]
        # Image positions (negative placeholder ids) are not tokens: logprobs cover text.
        text_only = [(t, s) for t, s in zip(token_ids, scores, strict=True) if t >= 0]
        positions = scored_positions(
            [t for t, _ in text_only],
            [s for _, s in text_only],
            OffsetCounter(),
            self._texts,
            limit=len(prompt.echo_text),
            special=True,
        )
        chunks: list[CompletionChunkChoice] = []
        for choice in self._of_prompt(prompt):
            choice.add_prompt_positions(positions)
            if self._is_stream:
                chunks.append(choice.chunk(prompt.echo_text, positions, [], is_last=False))
        return chunks

    @property
    def finish_reasons(self) -> list[str]:
        return [c.finish_reason.value for c in self._choices if c.finish_reason is not None]

    @property
    def num_cached_tokens(self) -> int:
        return sum(self._cached)

    def to_list(self) -> list[CompletionChoice]:
        return [choice.whole() for choice in self._choices]

    def usage(self) -> Usage:
        return usage_dict(self._num_prompt_tokens, self._num_generated, self.num_cached_tokens)

    def perf_metrics(self) -> PerfMetrics:
        """Fireworks' perf metrics of the request so far."""
        now = time.monotonic()
        # Nothing generated (scoring only): the first token is as late as the end.
        first_token_at = now if self.first_token_at is None else self.first_token_at
        return perf_metrics_dict(
            self._num_prompt_tokens,
            self.num_cached_tokens,
            first_token_at - self._started_at,
            now - self._started_at,
            SpeculationCounts(
                prediction_tokens=sum(s.prediction_tokens for s in self._speculation),
                prediction_matched=sum(s.prediction_matched for s in self._speculation),
                draft_tokens=sum(s.draft_tokens for s in self._speculation),
                accepted_tokens=sum(s.accepted_tokens for s in self._speculation),
            ),
        )

    def choice_usage(self, index: int) -> Usage:
        """One choice's usage so far: its prompt, and the tokens it generated."""
        choice = self._choices[index]
        prompt = choice.prompt
        return usage_dict(len(prompt.token_ids), len(choice.token_ids), self._cached[prompt.index])
