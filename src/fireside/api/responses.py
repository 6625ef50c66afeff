"""The response side of the completions API: the shape of every body, its builders,
and SSE framing.

The shapes are TypedDicts: plain dicts at run time (they are built on every
streamed token), checked by the type checker where they are built, and the
source of their schemas in `/openapi.json` (`openapi.py`), so the document
cannot drift from the code. Key order is the order of docs/api.md's example.
A shape whose name starts with `_` has no component of its own in the
document: it is written out where it is used.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Literal, NotRequired

from pydantic import Field
from typing_extensions import TypedDict

from fireside.api.logprobs import ContentLogprobs, LegacyLogprobs
from fireside.api.scalars import Count, PositiveCount, Seconds, TokenId
from fireside.engine.types import FinishReason, SpeculationCounts

CompletionId = Annotated[str, Field(pattern="^cmpl-[0-9a-f]{32}$")]
FinishReasonName = Literal["stop", "length"]
# A finish reason as a client sees it; `abort` never reaches a choice (the request
# failed with 503 instead).
FINISH_REASON_NAMES: dict[FinishReason, FinishReasonName] = {
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
}
PERF_HEADER_PREFIX = "fireworks-"


def new_completion_id(prefix: str = "cmpl-") -> str:
    return f"{prefix}{uuid.uuid4().hex}"


class _PromptTokensDetails(TypedDict):
    cached_tokens: Count


class Usage(TypedDict):
    prompt_tokens: Count
    completion_tokens: Count
    total_tokens: Count
    prompt_tokens_details: _PromptTokensDetails


# Fireworks' names, which are not identifiers.
PerfMetrics = TypedDict(
    "PerfMetrics",
    {
        "prompt-tokens": Count,
        "cached-prompt-tokens": Count,
        "server-time-to-first-token": Seconds,
        "server-processing-time": Seconds,
        "speculation-prompt-tokens": Count,
        "speculation-prompt-matched-tokens": Count,
        "speculation-generated-tokens": Count,
        "speculation-accepted-tokens": Count,
    },
)
PerfMetrics.__doc__ = (
    "Times are seconds since the request reached the server. The speculation counts "
    "are summed over prompts and samples, each sample being given the prediction: "
    "`speculation-prompt-tokens` the prediction's tokens, `speculation-prompt-matched-"
    "tokens` those of them accepted into the output, `speculation-generated-tokens` the "
    "draft tokens checked (from the prediction and from prompt lookup), "
    "`speculation-accepted-tokens` those of them accepted."
)


class RawOutput(TypedDict):
    prompt_fragments: list[str | int]
    prompt_token_ids: list[int]
    completion: str
    completion_token_ids: list[TokenId]
    completion_logprobs: ContentLogprobs | None


class _ChoiceFields(TypedDict):
    index: Count
    text: str
    logprobs: LegacyLogprobs | ContentLogprobs | None
    # Only when the request asks for them, in this order.
    prompt_token_ids: NotRequired[list[TokenId]]
    token_ids: NotRequired[list[TokenId]]
    raw_output: NotRequired[RawOutput]


class CompletionChoice(_ChoiceFields):
    finish_reason: FinishReasonName


class CompletionChunkChoice(_ChoiceFields):
    finish_reason: FinishReasonName | None  # set on the chunk that finishes the choice


class Completion(TypedDict):
    """A non-streamed response."""

    id: CompletionId
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    perf_metrics: NotRequired[PerfMetrics]


class CompletionChunk(TypedDict):
    """One server-sent event's data, with one choice. Every chunk has the response's
    `id`. The request's `usage` (and `perf_metrics`, when asked) rides on the chunk
    that finishes the last choice, other chunks having `usage: null`; see
    `stream_options` for OpenAI's separate usage chunk (empty `choices`)."""

    id: CompletionId
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: NotRequired[Usage | None]
    perf_metrics: NotRequired[PerfMetrics]


class Model(TypedDict):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    context_length: PositiveCount
    capabilities: list[Literal["completion", "vision"]]


class ModelList(TypedDict):
    object: Literal["list"]
    data: list[Model]


class Health(TypedDict):
    status: Literal["ok", "unavailable", "draining"]


@dataclass(frozen=True)
class ModelInfo:
    """One entry of `/v1/models`."""

    id: str
    context_length: int
    created: int
    owned_by: str = "fireside"
    vision: bool = False  # accepts images (a projector is loaded)

    def to_dict(self) -> Model:
        return {
            "id": self.id,
            "object": "model",
            "created": self.created,
            "owned_by": self.owned_by,
            "context_length": self.context_length,
            "capabilities": ["completion", "vision"] if self.vision else ["completion"],
        }


def model_list(models: list[ModelInfo]) -> ModelList:
    return {"object": "list", "data": [m.to_dict() for m in models]}


def choice_dict(
    index: int,
    text: str,
    finish_reason: FinishReason | None,
    logprobs: LegacyLogprobs | ContentLogprobs | None = None,
    *,
    prompt_token_ids: list[int] | None = None,
    token_ids: list[int] | None = None,
    raw_output: RawOutput | None = None,
) -> CompletionChunkChoice:
    """One choice; the optional fields only when given (only some requests ask)."""
    reason = None if finish_reason is None else FINISH_REASON_NAMES[finish_reason]
    body: CompletionChunkChoice = {
        "index": index,
        "text": text,
        "finish_reason": reason,
        "logprobs": logprobs,
    }
    if prompt_token_ids is not None:
        body["prompt_token_ids"] = prompt_token_ids
    if token_ids is not None:
        body["token_ids"] = token_ids
    if raw_output is not None:
        body["raw_output"] = raw_output
    return body


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def perf_metrics_dict(
    prompt_tokens: int,
    cached_tokens: int,
    time_to_first_token_s: float,
    processing_s: float,
    speculation: SpeculationCounts,
) -> PerfMetrics:
    """Fireworks' names; the times are seconds since the request reached the server."""
    return {
        "prompt-tokens": prompt_tokens,
        "cached-prompt-tokens": cached_tokens,
        "server-time-to-first-token": round(time_to_first_token_s, 6),
        "server-processing-time": round(processing_s, 6),
        "speculation-prompt-tokens": speculation.prediction_tokens,
        "speculation-prompt-matched-tokens": speculation.prediction_matched,
        "speculation-generated-tokens": speculation.draft_tokens,
        "speculation-accepted-tokens": speculation.accepted_tokens,
    }


def perf_metrics_headers(perf_metrics: PerfMetrics) -> dict[str, str]:
    """The same metrics as `fireworks-*` headers, which non-streamed answers always carry."""
    return {f"{PERF_HEADER_PREFIX}{name}": str(value) for name, value in perf_metrics.items()}


def completion_dict(
    cmpl_id: str,
    created: int,
    model: str,
    choices: list[CompletionChoice],
    usage: Usage,
    perf_metrics: PerfMetrics | None = None,
) -> Completion:
    """A whole (non-streamed) response."""
    body: Completion = {
        "id": cmpl_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage,
    }
    if perf_metrics is not None:
        body["perf_metrics"] = perf_metrics
    return body


def chunk_dict(
    cmpl_id: str, created: int, model: str, choices: list[CompletionChunkChoice]
) -> CompletionChunk:
    """One streamed chunk; the stream adds `usage` and `perf_metrics` where they go."""
    return {
        "id": cmpl_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
    }


def sse_event(data: Mapping[str, object]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
