"""The response side of the API: bodies, streamed chunks and SSE framing.

Plain dicts rather than pydantic models: they are built on every streamed token,
and their key order is the order of API.md's example.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelInfo:
    """One entry of `/v1/models`."""

    id: str
    context_length: int
    created: int
    owned_by: str = "fireside"
    vision: bool = False  # accepts images (a projector is loaded)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "model",
            "created": self.created,
            "owned_by": self.owned_by,
            "context_length": self.context_length,
            "capabilities": ["completion", "vision"] if self.vision else ["completion"],
        }


def choice_dict(
    index: int,
    text: str,
    finish_reason: str | None,
    logprobs: dict[str, Any] | None = None,
    extras: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One choice; `extras` are the fields only some requests ask for, in API order
    (`prompt_token_ids`, `token_ids`, `raw_output`)."""
    body = {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}
    if extras:
        body.update(extras)
    return body


def raw_output_dict(
    prompt_fragments: list[str | int],
    prompt_token_ids: list[int],
    completion: str,
    completion_token_ids: list[int],
    completion_logprobs: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "prompt_fragments": prompt_fragments,
        "prompt_token_ids": prompt_token_ids,
        "completion": completion,
        "completion_token_ids": completion_token_ids,
        "completion_logprobs": completion_logprobs,
    }


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def perf_metrics_dict(
    prompt_tokens: int, cached_tokens: int, time_to_first_token_s: float, processing_s: float
) -> dict[str, Any]:
    """Fireworks' names; the times are seconds since the request reached the server."""
    return {
        "prompt-tokens": prompt_tokens,
        "cached-prompt-tokens": cached_tokens,
        "server-time-to-first-token": round(time_to_first_token_s, 6),
        "server-processing-time": round(processing_s, 6),
    }


def perf_metrics_headers(perf_metrics: dict[str, Any]) -> dict[str, str]:
    """The same metrics as `fireworks-*` headers, which non-streamed answers always carry."""
    return {f"fireworks-{name}": str(value) for name, value in perf_metrics.items()}


def completion_dict(
    cmpl_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    perf_metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A whole response, or one streamed chunk (which has usage only when last)."""
    body: dict[str, Any] = {
        "id": cmpl_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage
    if perf_metrics is not None:
        body["perf_metrics"] = perf_metrics
    return body


def sse_event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
