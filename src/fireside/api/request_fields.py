"""The completion request's fields that pydantic cannot check from their type alone.

Each type carries its validator and the JSON schema of what that validator
accepts (`json_schema_input_type`, `WithJsonSchema`), so `/openapi.json` says
exactly what is enforced. The validators are written by hand where a pydantic
union would report one error per branch, which makes a message no client can
act on; their error types (`invalid_value`, `invalid_type`, `unsupported`) are
the codes the client sees (errors.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NotRequired

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationInfo,
    WithJsonSchema,
    with_config,
)
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict

MAX_LOGPROBS = 5  # alternatives per position, as on the hosted API
MAX_STOP_SEQUENCES = 4


def _invalid(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_value", message)


def _wrong_type(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_type", message)


def _is_int(value: Any) -> bool:
    # JSON true/false arrive as bool, which Python counts as int; the API does not.
    return isinstance(value, int) and not isinstance(value, bool)


# --- prompt

PromptValue = str | list[str] | list[int] | list[list[int]]
_PROMPT_SHAPES = (
    "prompt must be a string, an array of strings, an array of token ids "
    "or an array of arrays of token ids"
)


def _check_prompt(value: Any) -> PromptValue:
    if isinstance(value, str):
        if not value:
            raise _invalid("prompt must not be empty")
        return value
    if not isinstance(value, list):
        raise _wrong_type(_PROMPT_SHAPES)
    if not value:
        raise _invalid("prompt must not be empty")
    if all(isinstance(item, str) for item in value):
        if not all(value):
            raise _invalid("prompt must not be empty")
        return value
    if all(_is_int(item) for item in value):
        return value
    if all(isinstance(item, list) and all(_is_int(t) for t in item) for item in value):
        if not all(value):
            raise _invalid("prompt must not be empty")
        return value
    raise _wrong_type(_PROMPT_SHAPES)


def _prompt_schema() -> dict[str, Any]:
    # oneOf rather than pydantic's anyOf: the four shapes never overlap. The token
    # ids' upper bound is the model's vocabulary, checked once the model is known.
    def text() -> dict[str, Any]:
        return {"type": "string", "minLength": 1}

    def token_ids() -> dict[str, Any]:
        return {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}

    return {
        "oneOf": [
            text(),
            {"type": "array", "items": text(), "minItems": 1},
            token_ids(),
            {"type": "array", "items": token_ids(), "minItems": 1},
        ]
    }


Prompt = Annotated[PromptValue, PlainValidator(_check_prompt), WithJsonSchema(_prompt_schema())]


# --- logprobs


def _check_logprobs(value: Any) -> int | bool | None:
    if value is None or isinstance(value, bool):
        return value
    if not _is_int(value):
        raise _wrong_type(f"logprobs must be an integer from 0 to {MAX_LOGPROBS}, or a boolean")
    if not 0 <= value <= MAX_LOGPROBS:
        raise _invalid(f"logprobs must be from 0 to {MAX_LOGPROBS}")
    return int(value)


Logprobs = Annotated[
    int | bool | None,
    PlainValidator(
        _check_logprobs,
        json_schema_input_type=Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | bool | None,
    ),
]


# --- stop


def _check_stop(value: Any) -> str | list[str] | None:
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _wrong_type("stop must be a string or an array of strings")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise _invalid(f"stop takes at most {MAX_STOP_SEQUENCES} sequences")
    if not all(stops):
        raise _invalid("stop sequences must not be empty")
    return value if isinstance(value, str) else list(stops)


_StopSequence = Annotated[str, Field(min_length=1)]
Stop = Annotated[
    str | list[str] | None,
    PlainValidator(
        _check_stop,
        json_schema_input_type=(
            _StopSequence | Annotated[list[_StopSequence], Field(max_length=MAX_STOP_SEQUENCES)]
        )
        | None,
    ),
]


# --- logit_bias


def _check_logit_bias_keys(value: dict[str, float]) -> dict[str, float]:
    # JSON object keys are strings; here they must spell token ids.
    for key in value:
        if not (key.isascii() and key.isdigit()):
            raise _invalid(f"logit_bias keys must be token ids, got {key[:20]!r}")
    return value


LogitBias = Annotated[
    dict[str, Annotated[float, Field(ge=-100, le=100)]],
    AfterValidator(_check_logit_bias_keys),
    Field(json_schema_extra={"propertyNames": {"pattern": "^[0-9]+$"}}),
]


# --- stream_options


@with_config(ConfigDict(extra="forbid"))
class StreamOptions(TypedDict, total=False):
    """OpenAI's, and vLLM's `continuous_usage_stats`."""

    include_usage: bool | None
    continuous_usage_stats: bool | None
    include_obfuscation: bool | None  # accepted and ignored


_STREAM_OPTIONS = tuple(StreamOptions.__annotations__)


def _check_stream_options(value: Any, info: ValidationInfo) -> dict[str, bool | None] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _wrong_type("stream_options must be an object")
    for key, flag in value.items():
        if key not in _STREAM_OPTIONS:
            known = ", ".join(_STREAM_OPTIONS)
            raise _invalid(f"stream_options.{key[:40]} is not one of: {known}")
        if flag is not None and not isinstance(flag, bool):
            raise _wrong_type(f"stream_options.{key} must be a boolean")
    # As vLLM: the options say how to stream, so without a stream they are a mistake.
    if "stream" in info.data and not info.data["stream"]:
        raise _invalid("stream_options is only allowed with stream: true")
    return dict(value)


StreamOptionsField = Annotated[
    dict[str, bool | None] | None,
    PlainValidator(_check_stream_options, json_schema_input_type=StreamOptions | None),
]
# The cross-field half of `_check_stream_options`, for the request's schema:
# stream_options (an object, not null) needs stream: true.
STREAM_OPTIONS_NEED_STREAM: dict[str, Any] = {
    "if": {
        "required": ["stream_options"],
        "properties": {"stream_options": {"type": "object", "properties": {}}},
    },
    "then": {"required": ["stream"], "properties": {"stream": {"const": True}}},
}


# --- OpenAI fields some clients always send, accepted only with neutral values


def _check_suffix(value: Any) -> None:
    if value is not None:
        raise PydanticCustomError("unsupported", "`suffix` is not supported")
    return None


def _check_best_of(value: Any) -> int | None:
    if value is not None and not (_is_int(value) and value == 1):
        raise PydanticCustomError("unsupported", "`best_of` is only supported as 1 or null")
    return None if value is None else 1


Suffix = Annotated[None, PlainValidator(_check_suffix, json_schema_input_type=None)]
BestOf = Annotated[
    int | None, PlainValidator(_check_best_of, json_schema_input_type=Literal[1] | None)
]


# --- speculation and prediction: the output the caller expects


def _check_speculation(value: Any) -> str | list[int] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(_is_int(t) for t in value):
        if any(t < 0 for t in value):
            raise _invalid("speculation token ids must not be negative")
        return list(value)
    raise _wrong_type("speculation must be a string or an array of token ids")


Speculation = Annotated[
    str | list[int] | None,
    PlainValidator(
        _check_speculation,
        json_schema_input_type=str | list[Annotated[int, Field(ge=0)]] | None,
    ),
]


@with_config(ConfigDict(extra="forbid"))
class PredictionTextPart(TypedDict):
    """A text part of the predicted content (OpenAI's content part)."""

    type: Literal["text"]
    text: str


@with_config(ConfigDict(extra="forbid"))
class PredictedOutput(TypedDict):
    """OpenAI's predicted output; the text parts are joined in order."""

    type: NotRequired[Literal["content"]]
    content: str | list[PredictionTextPart]


_PREDICTION_SHAPES = (
    'prediction must be a string or {"type": "content", "content": a string or an array '
    'of {"type": "text", "text": ...} parts}'
)


def _check_prediction(value: Any) -> str | None:
    """The predicted text: the string, or the content's text parts joined."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, dict) or "content" not in value:
        raise _wrong_type(_PREDICTION_SHAPES)
    unknown = sorted(set(value) - {"type", "content"})
    if unknown:
        raise _invalid(f"prediction does not take {unknown[0][:40]!r}")
    if value.get("type", "content") != "content":
        raise _invalid('prediction.type must be "content"')
    content = value["content"]
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _wrong_type(_PREDICTION_SHAPES)
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict):
            raise _wrong_type(f"prediction.content[{i}] must be an object")
        if part.get("type") != "text":
            # Image and video parts type-check in the SDK, but an output is text.
            raise PydanticCustomError(
                "unsupported", f"prediction.content[{i}]: only text parts are supported"
            )
        if set(part) != {"type", "text"} or not isinstance(part["text"], str):
            raise _invalid(f'prediction.content[{i}] must be {{"type": "text", "text": str}}')
        texts.append(part["text"])
    return "".join(texts)


Prediction = Annotated[
    str | None,
    PlainValidator(_check_prediction, json_schema_input_type=str | PredictedOutput | None),
]


# --- reasoning controls: validated by their documented types


REASONING_EFFORTS = ("low", "medium", "high", "none")


def _check_reasoning_effort(value: Any) -> str | int | bool | None:
    if value is None or isinstance(value, bool):
        return value
    if _is_int(value):
        if value < 1:
            raise _invalid("reasoning_effort as an integer is a token limit: at least 1")
        return int(value)
    if isinstance(value, str):
        if value not in REASONING_EFFORTS:
            raise _invalid(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}")
        return value
    raise _wrong_type("reasoning_effort must be a string, an integer or a boolean")


ReasoningEffort = Annotated[
    str | int | bool | None,
    PlainValidator(
        _check_reasoning_effort,
        json_schema_input_type=Literal["low", "medium", "high", "none"]
        | Annotated[int, Field(ge=1)]
        | bool
        | None,
    ),
]

MIN_THINKING_BUDGET = 1024  # the SDK's documented floor for budget_tokens


@with_config(ConfigDict(extra="forbid"))
class ThinkingEnabled(TypedDict):
    """Anthropic's format: thinking on, optionally within a token budget."""

    type: Literal["enabled"]
    budget_tokens: NotRequired[Annotated[int, Field(ge=MIN_THINKING_BUDGET)] | None]


@with_config(ConfigDict(extra="forbid"))
class ThinkingDisabled(TypedDict):
    type: Literal["disabled"]


def _check_thinking(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _wrong_type('thinking must be {"type": "enabled"} or {"type": "disabled"}')
    kind = value.get("type")
    allowed = {"enabled": {"type", "budget_tokens"}, "disabled": {"type"}}.get(str(kind))
    if allowed is None:
        raise _invalid('thinking.type must be "enabled" or "disabled"')
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise _invalid(f"thinking of type {kind!r} does not take {unknown[0][:40]!r}")
    budget = value.get("budget_tokens")
    if budget is not None:
        if not _is_int(budget):
            raise _wrong_type("thinking.budget_tokens must be an integer")
        if budget < MIN_THINKING_BUDGET:
            raise _invalid(f"thinking.budget_tokens must be at least {MIN_THINKING_BUDGET}")
    return dict(value)


Thinking = Annotated[
    dict[str, Any] | None,
    PlainValidator(
        _check_thinking, json_schema_input_type=ThinkingEnabled | ThinkingDisabled | None
    ),
]


def not_both(a: str, b: str) -> dict[str, Any]:
    """A request-schema condition: `a` and `b` are not both given (not null)."""
    given = {"not": {"type": "null"}}
    return {"not": {"required": [a, b], "properties": {a: given, b: given}}}
