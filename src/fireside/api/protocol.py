"""The request side of the completions API: the body's model, its parsing, and the
one conversion from a request to engine `SamplingParams`.

Request fields are in the order of `API.md` (`stream_options` beside `stream`);
the OpenAI fields that are only tolerated come last, in their own block.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from fireside.api.errors import APIError, from_validation_errors
from fireside.engine.types import SamplingParams

Prompt = str | list[str] | list[int] | list[list[int]]
# vLLM's range: clients send any 64-bit seed, signed or not.
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1
_MAX_STOP_SEQUENCES = 4
_PROMPT_SHAPES = (
    "prompt must be a string, an array of strings, an array of token ids "
    "or an array of arrays of token ids"
)


class LogprobsFormat(StrEnum):
    LEGACY = "legacy"  # logprobs: N, OpenAI's legacy completions object
    CONTENT = "content"  # logprobs: true, the chat-style {"content": [...]} object


class StreamUsage(StrEnum):
    """Where a stream's usage goes (`stream_options.include_usage`)."""

    LAST_CHOICE = "last_choice"  # not given: on the chunk that finishes the last choice
    SEPARATE = "separate"  # true: OpenAI's own final chunk, with no choices
    NONE = "none"  # false: nowhere


# `stream_options` keys: OpenAI's, and vLLM's `continuous_usage_stats`.
_STREAM_OPTIONS = ("include_usage", "continuous_usage_stats", "include_obfuscation")


def _invalid(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_value", message)


def _wrong_type(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_type", message)


def _is_int(value: Any) -> bool:
    # JSON true/false arrive as bool, which Python counts as int; the API does not.
    return isinstance(value, int) and not isinstance(value, bool)


class CompletionRequest(BaseModel):
    """The body of `POST /v1/completions`. `None` means "not given": the default
    then comes from `SamplingParams` or from the server's configuration."""

    # strict: "1" is not a number and true is not an int; a JSON int is still a float.
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    prompt: Prompt
    images: list[str] | list[list[str]] | None = None  # data URIs; see api/images.py
    max_tokens: int | None = Field(None, ge=0)  # default: the server's, 16 unless configured
    max_completion_tokens: int | None = Field(None, ge=0)  # alias of max_tokens
    context_length_exceeded_behavior: Literal["truncate", "error"] | None = "truncate"
    logprobs: int | bool | None = None  # int 0-5 (legacy format) or true (content[] format)
    top_logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    echo_last: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)  # default 1; 0 is greedy
    top_p: float | None = Field(None, ge=0, le=1)  # default 1
    top_k: int | None = Field(None, ge=0)  # default 0, off
    min_p: float | None = Field(None, ge=0, le=1)  # 0 is off
    typical_p: float | None = Field(None, ge=0, le=1)  # 1 is off
    frequency_penalty: float | None = Field(None, ge=-2, le=2)  # 0 is off
    presence_penalty: float | None = Field(None, ge=-2, le=2)  # 0 is off
    # 1 is off; 0 would divide logits by zero, so the range is (0, 2].
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    seed: int | None = Field(None, ge=_SEED_MIN, le=_SEED_MAX)
    n: int | None = Field(None, ge=1, le=128)  # default 1
    stop: str | list[str] | None = None
    include_stop_str_in_output: bool | None = None  # default: the server's (true unless set)
    ignore_eos: bool | None = False
    response_format: dict[str, Any] | None = None
    stream: bool | None = False
    stream_options: dict[str, bool | None] | None = None  # OpenAI's; only with stream: true
    return_token_ids: bool | None = False
    raw_output: bool | None = False
    perf_metrics_in_response: bool | None = False
    prompt_cache_max_len: int | None = Field(None, ge=0)
    user: str | None = None

    # --- OpenAI fields some clients always send; accepted only with neutral values.
    suffix: None = None
    best_of: int | None = None

    @field_validator("prompt", mode="plain")
    @classmethod
    def _check_prompt(cls, value: Any) -> Prompt:
        # Written out by hand: a pydantic union reports one error per branch, which
        # makes a message no client can act on.
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

    @field_validator("max_completion_tokens")
    @classmethod
    def _check_one_max_tokens(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("max_tokens") is not None:
            raise _invalid("give `max_tokens` or `max_completion_tokens`, not both")
        return value

    @field_validator("logprobs", mode="plain")
    @classmethod
    def _check_logprobs(cls, value: Any) -> int | bool | None:
        if value is None or isinstance(value, bool):
            return value
        if not _is_int(value):
            raise _wrong_type("logprobs must be an integer from 0 to 5, or a boolean")
        if not 0 <= value <= 5:
            raise _invalid("logprobs must be from 0 to 5")
        return int(value)

    @field_validator("top_logprobs")
    @classmethod
    def _check_top_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        # A failed `logprobs` is reported first (fields are checked in order).
        if "logprobs" not in info.data:  # invalid, and already reported
            return value
        logprobs = info.data["logprobs"]
        # `is`, not `in (None, False)`: 0 == False, and logprobs 0 is on.
        if value is not None and (logprobs is None or logprobs is False):
            raise _invalid("top_logprobs needs logprobs (true or an integer)")
        return value

    @field_validator("stop", mode="plain")
    @classmethod
    def _check_stop(cls, value: Any) -> str | list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _wrong_type("stop must be a string or an array of strings")
        if len(stops) > _MAX_STOP_SEQUENCES:
            raise _invalid(f"stop takes at most {_MAX_STOP_SEQUENCES} sequences")
        if not all(stops):
            raise _invalid("stop sequences must not be empty")
        return value if isinstance(value, str) else list(stops)

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        # JSON object keys are strings; here they must spell token ids.
        for key in value or {}:
            if not (key.isascii() and key.isdigit()):
                raise _invalid(f"logit_bias keys must be token ids, got {key[:20]!r}")
        return value

    @field_validator("stream_options", mode="plain")
    @classmethod
    def _check_stream_options(
        cls, value: Any, info: ValidationInfo
    ) -> dict[str, bool | None] | None:
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

    @field_validator("suffix", mode="plain")
    @classmethod
    def _check_suffix(cls, value: Any) -> None:
        if value is not None:
            raise PydanticCustomError("unsupported", "`suffix` is not supported")
        return None

    @field_validator("best_of", mode="plain")
    @classmethod
    def _check_best_of(cls, value: Any) -> int | None:
        if value is not None and not (_is_int(value) and value == 1):
            raise PydanticCustomError("unsupported", "`best_of` is only supported as 1 or null")
        return None if value is None else 1

    @property
    def logprobs_format(self) -> LogprobsFormat | None:
        # logprobs 0 still asks for the sampled token's logprob; only false and null are off.
        if self.logprobs is None or self.logprobs is False:
            return None
        return LogprobsFormat.CONTENT if self.logprobs is True else LogprobsFormat.LEGACY

    @property
    def num_top_logprobs(self) -> int | None:
        """Alternatives per position, or None when logprobs are off."""
        if self.logprobs is None or self.logprobs is False:
            return None
        if self.top_logprobs is not None:
            return self.top_logprobs
        return 0 if self.logprobs is True else int(self.logprobs)

    def num_echo_tokens(self, num_prompt_tokens: int) -> int:
        """How many of the prompt's last tokens the text starts with."""
        if self.echo_last is not None:
            # echo_last is the more specific ask, so it wins over echo: true.
            return min(self.echo_last, num_prompt_tokens)
        return num_prompt_tokens if self.echo else 0

    @property
    def stream_usage(self) -> StreamUsage:
        include = (self.stream_options or {}).get("include_usage")
        if include is None:
            return StreamUsage.LAST_CHOICE
        return StreamUsage.SEPARATE if include else StreamUsage.NONE

    @property
    def continuous_usage_stats(self) -> bool:
        """vLLM's: with include_usage, every chunk carries its choice's usage so far."""
        options = self.stream_options or {}
        return bool(options.get("include_usage") and options.get("continuous_usage_stats"))

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """(token id, bias) sorted by id; the ids are not yet checked against a vocabulary."""
        # "5" and "05" name one token: the last one given wins, as a JSON object would.
        bias = {int(key): value for key, value in (self.logit_bias or {}).items()}
        return tuple(sorted(bias.items()))

    def to_sampling_params(
        self, max_tokens: int, num_prompt_tokens: int, grammar: str | None = None
    ) -> SamplingParams:
        """Engine parameters for one prompt; `max_tokens` is already fitted to the context."""
        given: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            # The engine seeds numpy generators, which want a non-negative seed; the
            # modulo keeps "same seed, same output" for negative seeds too.
            "seed": None if self.seed is None else self.seed % 2**64,
            "n": self.n,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "ignore_eos": self.ignore_eos,
            "min_p": self.min_p,
            "typical_p": self.typical_p,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "repetition_penalty": self.repetition_penalty,
            "prompt_cache_max_len": self.prompt_cache_max_len,
        }
        # None means "not given": SamplingParams is the one place the defaults live.
        kwargs = {name: value for name, value in given.items() if value is not None}
        num_top = self.num_top_logprobs
        num_echo = self.num_echo_tokens(num_prompt_tokens)
        # Echoed prompt tokens carry logprobs too, so the engine scores them.
        if num_top is not None and num_echo:
            kwargs["prompt_logprobs"] = num_top
            kwargs["prompt_logprobs_start"] = num_prompt_tokens - num_echo
        return SamplingParams(
            max_tokens=max_tokens,
            stop=self.stop_sequences,
            logit_bias=self.logit_bias_pairs,
            logprobs=num_top,
            grammar=grammar,
            **kwargs,
        )


def parse_completion_request(body: bytes) -> CompletionRequest:
    """Parse and validate a request body; every failure is a 400 `APIError`."""
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        # ValueError covers bad UTF-8 and NaN/Infinity, which are not JSON.
        raise APIError.invalid(
            "The request body is not valid JSON.", None, "invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise APIError.invalid("The request body must be a JSON object.", None, "invalid_type")
    try:
        return CompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise from_validation_errors(exc.errors(include_url=False)) from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")
