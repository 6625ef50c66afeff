"""One request and its samples, as the engine thread keeps them.

A `Request` is one `EngineRequest` (a prompt) with its `n` samples. There is
no prefill or decode phase: a `Sample` holds its tokens (prompt, then output)
and how many of them are computed into the KV cache. Whatever is not computed
yet is fed to the model; when everything is computed, the logits of the last
token choose the next one. Only the engine thread touches these.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from fireside.engine.detokenizer import Detokenizer
from fireside.engine.sampler import Mirostat
from fireside.engine.speculation import Drafter
from fireside.engine.types import (
    EngineRequest,
    FinishReason,
    RequestOutput,
    SampleDelta,
    SamplingParams,
    SpeculationCounts,
    TokenLogprob,
)
from fireside.runner.base import ImageSpan, MediaPrompt

if TYPE_CHECKING:
    import llguidance


class OutputSink(Protocol):
    """Where one request's outputs go: a queue that an asyncio event loop reads.

    The engine thread never puts into it: it hands a step's outputs to each
    loop in one `call_soon_threadsafe` (engine.py), and the loop puts them.
    """

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    def put_nowait(self, output: RequestOutput) -> None: ...


@dataclass(eq=False)
class Sample:
    """One of a request's n samples (choices): its tokens and where they are computed."""

    request: Request
    index: int  # sample number j within the request
    tokens: list[int]
    rng: np.random.Generator
    detok: Detokenizer
    slot: int | None = None  # llama.cpp sequence id while it holds KV cells
    num_computed: int = 0
    finish_reason: FinishReason | None = None
    new_token_ids: list[int] = field(default_factory=list)  # since the last delta
    new_logprobs: list[TokenLogprob] = field(default_factory=list)  # the same tokens' scores
    matcher: llguidance.LLMatcher | None = None  # when the output is constrained
    mirostat: Mirostat | None = None  # its own mu, when the request asks for Mirostat
    drafter: Drafter | None = None  # its guesses of the next tokens (speculative decoding)

    @property
    def seq_id(self) -> int:
        """The llama.cpp sequence id; only valid while the sample holds a slot."""
        if self.slot is None:
            raise RuntimeError("sample has no slot")
        return self.slot

    @property
    def num_prompt(self) -> int:
        return self.request.num_prompt

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.request.num_prompt

    @property
    def num_pending(self) -> int:
        """Tokens not yet in the KV cache."""
        return len(self.tokens) - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class Request:
    """One EngineRequest: a prompt and its n samples."""

    request_id: str
    prompt_token_ids: tuple[int, ...]  # image positions hold negative placeholder ids
    params: SamplingParams
    media: MediaPrompt | None  # the prompt's images, freed when the request retires
    sink: OutputSink
    arrival: int  # admission order
    priority: bool = False  # service_tier "priority": admitted first, preempted last
    cache_isolation_key: str | None = None  # shares cached KV only with the same key
    speculation: tuple[int, ...] = ()  # the output the caller expects (its samples' drafts)
    samples: list[Sample] = field(default_factory=list)
    forked: bool = False  # the prompt has been computed and shared with every sample
    num_cached: int = 0  # prompt tokens found already computed (prefix cache) at admission
    admitted: bool = False
    # Scores of prompt tokens (index = position; None at 0 and where not scored),
    # filled while the prompt is computed when the request asked for them.
    prompt_scores: list[TokenLogprob | None] | None = None
    prompt_scores_sent: bool = False
    _prompt_unique: npt.NDArray[np.int64] | None = None

    @classmethod
    def create(cls, request: EngineRequest, sink: OutputSink, arrival: int) -> Request:
        self = cls(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            params=request.params,
            media=request.media,
            sink=sink,
            arrival=arrival,
            priority=request.priority,
            cache_isolation_key=request.cache_isolation_key,
            speculation=request.speculation,
        )
        params = request.params
        # Sample j of a seeded request draws from (seed, j): reproducible and
        # independent of whatever else runs.
        seed = params.seed if params.seed is not None else secrets.randbits(64)
        for j in range(params.n):
            self.samples.append(
                Sample(
                    request=self,
                    index=j,
                    tokens=list(request.prompt_token_ids),
                    rng=np.random.default_rng([seed & (2**64 - 1), j]),
                    detok=Detokenizer(params.stop, params.include_stop_str_in_output),
                    mirostat=Mirostat.start(params),
                )
            )
        return self

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.samples)

    @property
    def spans(self) -> Sequence[ImageSpan]:
        """The prompt's images, in order."""
        return self.media.spans if self.media is not None else ()

    @property
    def scores_prompt(self) -> bool:
        """The prompt still has to be computed with its logits kept for scoring."""
        return self.params.prompt_logprobs is not None and not self.forked

    @property
    def prompt_unique(self) -> npt.NDArray[np.int64]:
        """Distinct prompt token ids, for the repetition penalty; computed once."""
        if self._prompt_unique is None:
            self._prompt_unique = np.unique(np.asarray(self.prompt_token_ids))
        return self._prompt_unique

    def pop_output(self) -> RequestOutput:
        """Everything new since the last output: each sample's text, tokens and
        logprobs, and the prompt's scores the first time they are ready."""
        params = self.params
        deltas = []
        for s in self.samples:
            text = s.detok.pop_text(final=s.is_finished)
            if text or s.new_token_ids or s.is_finished:
                deltas.append(
                    SampleDelta(
                        index=s.index,
                        text=text,
                        token_ids=tuple(s.new_token_ids),
                        finish_reason=s.finish_reason,
                        logprobs=tuple(s.new_logprobs) if params.logprobs is not None else None,
                    )
                )
                s.new_token_ids.clear()
                s.new_logprobs.clear()
        prompt_logprobs = None
        if params.prompt_logprobs is not None and not self.prompt_scores_sent:
            scores = self.prompt_scores or [None] * self.num_prompt
            prompt_logprobs = tuple(scores[params.prompt_logprobs_start :])
            self.prompt_scores_sent = True
            self.prompt_scores = None  # sent once; no need to keep them
        return RequestOutput(
            request_id=self.request_id,
            deltas=tuple(deltas),
            num_prompt_tokens=self.num_prompt,
            num_cached_tokens=self.num_cached,
            prompt_logprobs=prompt_logprobs,
            finished=self.is_finished,
            speculation=self.speculation_counts(),
        )

    def speculation_counts(self) -> SpeculationCounts | None:
        """Its samples' speculative decoding so far, summed; None if none speculates."""
        counts = [s.drafter.counts for s in self.samples if s.drafter is not None]
        if not counts:
            return None
        return SpeculationCounts(
            prediction_tokens=sum(c.prediction_tokens for c in counts),
            prediction_matched=sum(c.prediction_matched for c in counts),
            draft_tokens=sum(c.draft_tokens for c in counts),
            accepted_tokens=sum(c.accepted_tokens for c in counts),
        )

    def close_media(self) -> None:
        """Free the prompt's image chunks (their KV, if cached, stays)."""
        if self.media is not None:
            self.media.close()
