"""Typed messages between the API layer and the engine.

The API layer validates HTTP input into an `EngineRequest` (one prompt, already
tokenized, with its sampling parameters); the engine answers with a stream of
`RequestOutput` deltas. Nothing here knows about HTTP or llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

import numpy as np
import numpy.typing as npt

from fireside.runner.base import MediaPrompt


class FinishReason(StrEnum):
    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens or the context ran out
    ABORT = "abort"  # the client left or the server is shutting down; never sent to a client


class GrammarError(ValueError):
    """A grammar or schema that cannot be compiled; the message says why."""


@dataclass(frozen=True)
class GrammarSpec:
    """A constraint on the output: a JSON schema (as JSON text), a GBNF or a Lark grammar."""

    kind: Literal["json_schema", "gbnf", "lark"]
    source: str


@dataclass(frozen=True)
class SamplingParams:
    """How to generate for one prompt. Defaults are the API's defaults."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    seed: int | None = None  # None: a fresh random seed per request
    n: int = 1  # samples of this prompt; the prompt is prefilled once and forked
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = True  # the source document says the text contains it
    ignore_eos: bool = False
    min_p: float = 0.0  # 0 is off
    typical_p: float = 1.0  # 1 is off
    frequency_penalty: float = 0.0  # over generated tokens
    presence_penalty: float = 0.0  # over generated tokens
    repetition_penalty: float = 1.0  # over prompt and generated tokens; 1 is off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), ids already validated
    logprobs: int | None = None  # alternatives per generated token; None: no logprobs
    prompt_logprobs: int | None = None  # alternatives per prompt token; None: not scored
    prompt_logprobs_start: int = 0  # first prompt position scored (echo_last)
    grammar: str | None = None  # compiled by EngineClient.compile_grammar; None: free text
    prompt_cache_max_len: int | None = None  # longest cached prefix to reuse; 0: none
    # Mirostat 2.0 (sampler.py): the target surprise tau, in bits; None: off.
    mirostat_target: float | None = None
    mirostat_lr: float = 0.1  # eta, mu's learning rate (llama.cpp's default)

    @property
    def is_greedy(self) -> bool:
        # Below this, dividing float32 logits by the temperature overflows; the
        # distribution is a point mass anyway (vLLM uses the same threshold).
        return self.temperature < 1e-5

    @property
    def has_penalties(self) -> bool:
        return bool(
            self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0
        )

    @property
    def truncates(self) -> bool:
        """Whether sampling cuts the distribution (beyond temperature)."""
        return bool(self.top_k or self.top_p < 1.0 or self.min_p or self.typical_p < 1.0)


@dataclass(frozen=True)
class TokenLogprob:
    """One position's log-probabilities: log-softmax of the raw logits.

    Raw means before logit_bias, penalties, temperature or truncation.
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # the most likely (id, logprob), most likely first
    sampling_logprob: float | None = None  # under the distribution sampled from; None in prompts


@dataclass(frozen=True, eq=False)
class PromptImage:
    """A decoded image: RGB pixels ([height, width, 3] uint8) and its bytes' sha256."""

    rgb: npt.NDArray[np.uint8]
    digest: bytes


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]  # image positions hold negative placeholder ids
    params: SamplingParams
    media: MediaPrompt | None = None  # the prompt's images (EngineClient.tokenize_media)
    # Draft token ids of the output the caller expects (`speculation`, `prediction`),
    # already checked against the vocabulary; () for none.
    speculation: tuple[int, ...] = ()
    # Prefix-cache hits (cached entries and running samples) only between requests
    # with the same key; None matches None only.
    cache_isolation_key: str | None = None
    cache_key: str | None = None  # `prompt_cache_key`: the affinity a cluster router routes on
    priority: bool = False  # service_tier "priority": admitted before others, preempted last


@dataclass(frozen=True)
class SampleDelta:
    """New output of one sample (choice) since the previous delta."""

    index: int  # sample number j in [0, n)
    text: str  # never ends inside a multi-byte character or a possible stop string
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token id, when asked for


@dataclass(frozen=True)
class SpeculationCounts:
    """A request's speculative decoding so far (engine/speculation.py), summed over its
    samples: each sample is given the prediction, and drafts and checks on its own."""

    prediction_tokens: int = 0  # tokens of `speculation` given (perf: speculation-prompt-tokens)
    prediction_matched: int = 0  # of those, accepted (speculation-prompt-matched-tokens)
    draft_tokens: int = 0  # draft tokens checked, prediction and prompt lookup alike
    accepted_tokens: int = 0  # of those, accepted into the output


@dataclass(frozen=True)
class RequestOutput:
    """What one engine step produced for one request."""

    request_id: str
    deltas: tuple[SampleDelta, ...] = ()
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    # Scores of prompt positions prompt_logprobs_start.. (None where a position has no
    # predecessor, i.e. position 0); only in the request's first output, when asked for.
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    finished: bool = False  # every sample has finished; nothing more will come
    error: str | None = None  # the engine failed this request; finished is True
    # The request's totals so far (each output repeats them); None: it never speculated.
    speculation: SpeculationCounts | None = None


@dataclass
class EngineStats:
    """A snapshot of counters, read by /metrics and by tests."""

    num_running_seqs: int = 0
    num_waiting_requests: int = 0
    num_kv_cells_used: int = 0
    num_kv_cells_total: int = 0
    prefill_tokens_total: int = 0  # prompt tokens actually run through the model
    generated_tokens_total: int = 0
    steps_total: int = 0
    requests_finished_total: int = 0
    requests_aborted_total: int = 0
    prefix_cache_queries_total: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits_total: int = 0  # of those, found already computed
    grammar_masks_total: int = 0  # token masks computed for constrained sequences
    grammar_mask_seconds_total: float = 0.0  # time spent computing and applying them
    spec_draft_tokens_total: int = 0  # draft tokens checked (speculative decoding)
    spec_accepted_tokens_total: int = 0  # of those, accepted into outputs
    extra: dict[str, float] = field(default_factory=dict)
