"""The state of one request and of each of its sampled sequences.

There is no prefill or decode phase: a sequence holds its tokens (prompt, then
output) and how many of them are computed into the KV cache. Whatever is not
computed yet is fed to the model; when everything is computed, the logits of
the last token choose the next one.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fireside.engine.detokenizer import Detokenizer
from fireside.engine.types import EngineRequest, FinishReason, SamplingParams, TokenLogprob


@dataclass(eq=False)
class Sequence:
    group: RequestState
    index: int  # sample number j within the request
    tokens: list[int]
    rng: np.random.Generator
    detok: Detokenizer
    slot: int | None = None  # llama.cpp sequence id while it holds KV cells
    num_computed: int = 0
    finish_reason: FinishReason | None = None
    new_token_ids: list[int] = field(default_factory=list)  # since the last delta
    new_logprobs: list[TokenLogprob] = field(default_factory=list)  # the same tokens' scores
    matcher: Any = None  # llguidance.LLMatcher when the output is constrained

    @property
    def seq_id(self) -> int:
        """The llama.cpp sequence id; only valid while the sequence holds a slot."""
        if self.slot is None:
            raise RuntimeError("sequence has no slot")
        return self.slot

    @property
    def num_prompt(self) -> int:
        return self.group.num_prompt

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.group.num_prompt

    @property
    def num_pending(self) -> int:
        """Tokens not yet in the KV cache."""
        return len(self.tokens) - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class RequestState:
    """One EngineRequest: a prompt and its n samples."""

    request: EngineRequest
    sink: object  # where outputs go; opaque to the scheduler
    arrival: int  # admission order
    seqs: list[Sequence] = field(default_factory=list)
    forked: bool = False  # the prompt has been computed and shared with every sample
    num_cached: int = 0  # prompt tokens found already computed (prefix cache) at admission
    admitted: bool = False
    # Scores of prompt tokens (index = position; None at 0 and where not scored),
    # filled while the prompt is computed when the request asked for them.
    prompt_scores: list[TokenLogprob | None] | None = None
    prompt_scores_sent: bool = False
    _prompt_unique: np.ndarray | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_prompt(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    @property
    def spans(self) -> list[Any]:
        """The prompt's images (runner.media.ImageSpan: start, num_pos), in order."""
        media = self.request.media
        return media.spans if media is not None else []

    @property
    def scores_prompt(self) -> bool:
        """The prompt still has to be computed with its logits kept for scoring."""
        return self.params.prompt_logprobs is not None and not self.forked

    @property
    def prompt_unique(self) -> np.ndarray:
        """Distinct prompt token ids, for the repetition penalty; computed once."""
        if self._prompt_unique is None:
            self._prompt_unique = np.unique(np.asarray(self.request.prompt_token_ids))
        return self._prompt_unique

    @classmethod
    def create(cls, request: EngineRequest, sink: object, arrival: int) -> RequestState:
        state = cls(request=request, sink=sink, arrival=arrival)
        params = request.params
        # Sample j of a seeded request draws from (seed, j): reproducible and
        # independent of whatever else runs.
        seed = params.seed if params.seed is not None else secrets.randbits(64)
        for j in range(params.n):
            state.seqs.append(
                Sequence(
                    group=state,
                    index=j,
                    tokens=list(request.prompt_token_ids),
                    rng=np.random.default_rng([seed & (2**64 - 1), j]),
                    detok=Detokenizer(params.stop, params.include_stop_str_in_output),
                )
            )
        return state
