"""The response side of the chat completions API: the shapes chat.py builds.

TypedDicts, as in responses.py (and documented from them in `/openapi.json`):
a chat answer is a completions answer whose choices carry a `message` (or, in
a stream, a `delta`) instead of `text`, with tool calls parsed out of it.
"""

from __future__ import annotations

from typing import Annotated, Literal, NotRequired

from pydantic import Field
from typing_extensions import TypedDict

from fireside.api.logprobs import ContentLogprobs
from fireside.api.responses import PerfMetrics, RawOutput, Usage
from fireside.api.scalars import Count, TokenId

ChatCompletionId = Annotated[str, Field(pattern="^chatcmpl-[0-9a-f]{32}$")]
ChatFinishReason = Literal["stop", "length", "tool_calls"]


class FunctionCall(TypedDict):
    name: str
    arguments: str  # a JSON object, as text


class ToolCallBody(TypedDict):
    """A call the model made; `arguments` validate against the function's schema when
    `tool_choice` was `required` or a name (constrained decoding)."""

    id: str
    type: Literal["function"]
    function: FunctionCall


class ToolCallDelta(ToolCallBody):
    """A call in a stream: sent whole, once its block is complete; `index` counts the
    choice's calls."""

    index: Count


class ChatMessageOut(TypedDict):
    role: Literal["assistant"]
    content: str | None  # null when the answer is only tool calls
    tool_calls: NotRequired[list[ToolCallBody]]


class _ChatChoiceExtras(TypedDict):
    # Only when the request asks for them.
    prompt_token_ids: NotRequired[list[TokenId]]
    token_ids: NotRequired[list[TokenId]]
    raw_output: NotRequired[RawOutput]


class ChatChoice(_ChatChoiceExtras):
    index: Count
    message: ChatMessageOut
    finish_reason: ChatFinishReason
    logprobs: ContentLogprobs | None


class ChatDelta(TypedDict, total=False):
    """What a chunk adds to its choice: the role in the first, then content or calls."""

    role: Literal["assistant"]
    content: str
    tool_calls: list[ToolCallDelta]


class ChatChunkChoice(_ChatChoiceExtras):
    index: Count
    delta: ChatDelta
    finish_reason: ChatFinishReason | None
    logprobs: ContentLogprobs | None


class ChatCompletion(TypedDict):
    """A non-streamed chat response."""

    id: ChatCompletionId
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    perf_metrics: NotRequired[PerfMetrics]


class ChatCompletionChunk(TypedDict):
    """One server-sent event's data, with one choice (or none: the usage chunk of
    `stream_options.include_usage`); usage as in `CompletionChunk`."""

    id: ChatCompletionId
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: NotRequired[Usage | None]
    perf_metrics: NotRequired[PerfMetrics]
