"""Typed messages between the API layer and the engine.

The API layer validates HTTP input into an `EngineRequest` (one prompt, already
tokenized, with its sampling parameters); the engine answers with a stream of
`RequestOutput` deltas. Nothing here knows about HTTP or llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class FinishReason(StrEnum):
    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens or the context ran out
    ABORT = "abort"  # the client left or the server is shutting down; never sent to a client


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

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams


@dataclass(frozen=True)
class SampleDelta:
    """New output of one sample (choice) since the previous delta."""

    index: int  # sample number j in [0, n)
    text: str  # never ends inside a multi-byte character or a possible stop string
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class RequestOutput:
    """What one engine step produced for one request."""

    request_id: str
    deltas: tuple[SampleDelta, ...] = ()
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    finished: bool = False  # every sample has finished; nothing more will come
    error: str | None = None  # the engine failed this request; finished is True


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
    extra: dict[str, float] = field(default_factory=dict)
