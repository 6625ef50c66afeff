"""The request side of the chat completions API: `ChatCompletionRequest`.

It has every field of the completions request except the prompt
(`protocol.SamplingRequest`), plus the conversation and its tools. Shapes are
checked here by pydantic (a wrong type is a 400 naming its path, such as
`messages[2].content`); what depends on the conversation as a whole (roles in
order, a tool result answering a call, images only for vision models) is
checked in `chat.py`, which renders the messages with the model's template.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NotRequired

from pydantic import ConfigDict, Field, with_config
from typing_extensions import TypedDict

from fireside.api.protocol import LogprobsFormat, SamplingRequest, parse_body

# OpenAI's rule for function names (the Fireworks SDK documents the same).
FUNCTION_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
Role = Literal["system", "developer", "user", "assistant", "tool"]


@with_config(ConfigDict(extra="forbid"))
class ImageURL(TypedDict):
    url: str
    detail: NotRequired[str | None]


@with_config(ConfigDict(extra="forbid"))
class ContentPart(TypedDict):
    """A part of a message's content: `{"type": "text", "text": ...}` or
    `{"type": "image_url", "image_url": {"url": "data:..."}}`."""

    type: Literal["text", "image_url"]
    text: NotRequired[str | None]
    image_url: NotRequired[ImageURL | None]


@with_config(ConfigDict(extra="forbid"))
class FunctionCallBody(TypedDict):
    name: Annotated[str, Field(pattern=FUNCTION_NAME_PATTERN)]
    arguments: str  # JSON text, as the model wrote it


@with_config(ConfigDict(extra="forbid"))
class MessageToolCall(TypedDict):
    id: str
    type: NotRequired[Literal["function"]]
    function: FunctionCallBody


@with_config(ConfigDict(extra="forbid"))
class ChatMessage(TypedDict):
    """One message. `content` may be null only for an assistant message with
    `tool_calls`. The OpenAI SDK's other message keys are accepted as it sends them
    back (`refusal`, `audio`, `annotations`, `function_call`, `reasoning_content`)
    and have no effect."""

    role: Role
    content: NotRequired[str | list[ContentPart] | None]
    name: NotRequired[str | None]
    tool_calls: NotRequired[list[MessageToolCall] | None]
    tool_call_id: NotRequired[str | None]
    reasoning_content: NotRequired[str | None]
    refusal: NotRequired[str | None]
    audio: NotRequired[dict[str, Any] | None]
    annotations: NotRequired[list[Any] | None]
    function_call: NotRequired[dict[str, Any] | None]


@with_config(ConfigDict(extra="forbid"))
class FunctionDefinition(TypedDict):
    name: Annotated[str, Field(pattern=FUNCTION_NAME_PATTERN)]
    description: NotRequired[str | None]
    parameters: NotRequired[dict[str, Any] | None]  # a JSON schema of the arguments object
    strict: NotRequired[bool | None]


@with_config(ConfigDict(extra="forbid"))
class Tool(TypedDict):
    type: Literal["function"]
    function: FunctionDefinition


@with_config(ConfigDict(extra="forbid"))
class NamedFunction(TypedDict):
    name: str


@with_config(ConfigDict(extra="forbid"))
class ToolChoiceFunction(TypedDict):
    """A named function: OpenAI's `{"type": "function", "function": {"name": ...}}`
    or the Fireworks form `{"type": "function", "name": ...}`."""

    type: Literal["function"]
    function: NotRequired[NamedFunction | None]
    name: NotRequired[str | None]


ToolChoice = Literal["none", "auto", "required", "any"] | ToolChoiceFunction


class ChatCompletionRequest(SamplingRequest):
    """`POST /v1/chat/completions`: the shared fields and the conversation."""

    messages: list[ChatMessage] = Field(
        min_length=1,
        description=(
            "The conversation: `system` (or `developer`), `user`, `assistant` and `tool` "
            "messages, rendered with the model's chat template. `content` is a string or a "
            "list of `text` and `image_url` parts (data URIs, for a model with vision)."
        ),
    )
    tools: list[Tool] | None = Field(
        None,
        description=(
            "Functions the model may call. Rendered through the template when it takes "
            "`tools`, else through a default system message (docs/api.md)."
        ),
    )
    tool_choice: ToolChoice | None = Field(
        None,
        description=(
            "`none`, `auto` (the default with tools), `required` (alias `any`), or a named "
            "function. With `required` or a name the output is constrained to calls whose "
            "arguments match the function's schema."
        ),
    )
    parallel_tool_calls: bool | None = Field(
        None, description="Whether one answer may hold several calls (default true)."
    )
    functions: list[FunctionDefinition] | None = Field(
        None, description="OpenAI's deprecated form of `tools`; not with `tools`."
    )
    function_call: Literal["none", "auto"] | NamedFunction | None = Field(
        None, description="OpenAI's deprecated form of `tool_choice`; not with `tool_choice`."
    )
    prompt_truncate_len: int | None = Field(
        None,
        ge=1,
        description=(
            "Most prompt tokens: the oldest user and assistant turns are dropped first, the "
            "system prompt and the last message are kept. Not applied with "
            "`safe_tokenization`."
        ),
    )
    safe_tokenization: bool | None = Field(
        False,
        description=(
            "Tokenize message content without special tokens, so `<|im_start|>` in a message "
            "is plain text; only the template's own text has special tokens."
        ),
    )

    @property
    def logprobs_format(self) -> LogprobsFormat | None:
        # Chat clients read the `content[]` format, whatever form `logprobs` took.
        return None if super().logprobs_format is None else LogprobsFormat.CONTENT


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    """Parse and validate a chat request body; every failure is a 400 `APIError`."""
    return parse_body(ChatCompletionRequest, body)
