"""The request side of the completions API: the body's model, its parsing, and the
one conversion from a request to engine `SamplingParams`.

Request fields are in the order of docs/api.md (`stream_options` beside `stream`);
the reasoning controls (validated, no effect here) and the OpenAI fields that are
only tolerated come last, in their own blocks. Each
field's description and schema live here (or, with its validator, in
`request_fields.py`): `/openapi.json` is generated from this model.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from fireside.api.errors import APIError, from_validation_errors
from fireside.api.images import Images
from fireside.api.request_fields import (
    MAX_LOGPROBS,
    MAX_STOP_SEQUENCES,
    STREAM_OPTIONS_NEED_STREAM,
    BestOf,
    LogitBias,
    Logprobs,
    Prediction,
    Prompt,
    ReasoningEffort,
    Speculation,
    Stop,
    StreamOptionsField,
    Suffix,
    Thinking,
    not_both,
)
from fireside.api.structured import ResponseFormatField
from fireside.engine.types import SamplingParams

# vLLM's range: clients send any 64-bit seed, signed or not.
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1
# Most samples one request may ask for: `n`, and prompts x n (serving.py). Each
# running sample holds a llama.cpp sequence id; server.py sizes them from this.
MAX_N = 128


class LogprobsFormat(StrEnum):
    LEGACY = "legacy"  # logprobs: N, OpenAI's legacy completions object
    CONTENT = "content"  # logprobs: true, the chat-style {"content": [...]} object


class StreamUsage(StrEnum):
    """Where a stream's usage goes (`stream_options.include_usage`)."""

    LAST_CHOICE = "last_choice"  # not given: on the chunk that finishes the last choice
    SEPARATE = "separate"  # true: OpenAI's own final chunk, with no choices
    NONE = "none"  # false: nowhere


def _invalid(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_value", message)


class SamplingRequest(BaseModel):
    """The fields the completions and chat completions endpoints share: the model, how
    to sample, what to return. Unknown fields are rejected with 400; null means the
    field was not given."""

    # None means "not given": the default then comes from `SamplingParams` or from the
    # server's configuration (the document shows those defaults, see openapi.py).
    # strict: "1" is not a number and true is not an int; a JSON int is still a float.
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "allOf": [
                STREAM_OPTIONS_NEED_STREAM,
                not_both("speculation", "prediction"),
                not_both("reasoning_effort", "thinking"),
            ]
        },
    )

    model: str = Field(
        description="The id of a loaded model (see `GET /v1/models`); an unknown id is 404."
    )
    max_tokens: int | None = Field(
        None,
        ge=0,
        description=(
            "Most tokens to generate (the default is the server's, 16 unless configured). "
            "0 with `echo` returns the prompt alone, for scoring."
        ),
    )
    max_completion_tokens: int | None = Field(
        None, ge=0, description="Alias of `max_tokens`; giving both is 400."
    )
    context_length_exceeded_behavior: Literal["truncate", "error"] | None = Field(
        "truncate",
        description=(
            "`truncate` lowers max_tokens to fit the context; `error` answers 400 "
            "`context_length_exceeded` instead."
        ),
    )
    logprobs: Logprobs = Field(
        None,
        description=(
            "An integer N: the legacy logprobs object with the sampled token and up to N "
            "alternatives per position. `true`: the `content[]` format."
        ),
    )
    top_logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description="Alternatives per position; needs `logprobs`.",
    )
    echo: bool | None = Field(
        False,
        description="Start the text with the prompt (with logprobs, the prompt's are scored too).",
    )
    echo_last: int | None = Field(None, ge=0, description="Echo only the last N prompt tokens.")
    temperature: float | None = Field(
        None, ge=0, le=2, description="Sampling temperature; 0 is greedy."
    )
    top_p: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Nucleus sampling: keep the most likely tokens up to this probability mass.",
    )
    top_k: int | None = Field(
        None, ge=0, description="Keep only the K most likely tokens; 0 is off."
    )
    min_p: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Drop tokens less likely than this fraction of the most likely one; 0 is off.",
    )
    typical_p: float | None = Field(
        None, ge=0, le=1, description="Locally typical sampling; 1 is off."
    )
    mirostat_target: float | None = Field(
        None,
        ge=0,
        description=(
            "Mirostat 2.0's target surprise tau, in bits per token (llama.cpp's default is 5); "
            "lower is more predictable. Not given: no Mirostat. No effect at temperature 0."
        ),
    )
    mirostat_lr: float | None = Field(
        None,
        ge=0,
        description="Mirostat's learning rate eta; only with `mirostat_target`.",
    )
    frequency_penalty: float | None = Field(
        None,
        ge=-2,
        le=2,
        description="`logit -= count * frequency_penalty`, count: times generated so far.",
    )
    presence_penalty: float | None = Field(
        None,
        ge=-2,
        le=2,
        description="`logit -= presence_penalty` for every token generated so far.",
    )
    # 0 would divide logits by zero, so the range is (0, 2].
    repetition_penalty: float | None = Field(
        None,
        gt=0,
        le=2,
        description=(
            "Multiplicative penalty over the prompt and the output; 1 is off, 0 is not allowed."
        ),
    )
    logit_bias: LogitBias | None = Field(
        None,
        description="Token id (as a string) to a bias from -100 to 100, added before sampling.",
    )
    seed: int | None = Field(
        None,
        ge=_SEED_MIN,
        le=_SEED_MAX,
        description="The same seed and request give the same output.",
    )
    n: int | None = Field(
        None,
        ge=1,
        le=MAX_N,
        description="Choices per prompt; choice `index = prompt_index * n + j`.",
    )
    stop: Stop = Field(
        None,
        description=(
            f"Up to {MAX_STOP_SEQUENCES} sequences that end generation. The returned text "
            "contains the stop sequence unless `include_stop_str_in_output` is false."
        ),
    )
    include_stop_str_in_output: bool | None = Field(
        None,
        description=(
            "Whether the text keeps the stop sequence that ended it. The default is the "
            "server's: true unless it runs with `--no-include-stop-str-in-output`."
        ),
    )
    ignore_eos: bool | None = Field(False, description="Keep generating past end-of-sequence.")
    response_format: ResponseFormatField = Field(
        None,
        description=(
            "Constrained decoding: JSON (optionally matching a JSON schema) or a GBNF grammar. "
            "A schema or grammar that cannot compile is 400."
        ),
    )
    speculation: Speculation = Field(
        None,
        description=(
            "The output you expect, as text or token ids, decoded speculatively as a draft. "
            "It changes the speed, never the output. Token ids must be below the model's "
            "vocabulary size. Not with `prediction`."
        ),
    )
    prediction: Prediction = Field(
        None,
        description=(
            "OpenAI's predicted output: a string, or an object whose `content` is a string or "
            "text parts; used as `speculation`. Not with `speculation`."
        ),
    )
    stream: bool | None = Field(
        False, description="Answer with server-sent events (`text/event-stream`)."
    )
    stream_options: StreamOptionsField = Field(
        None,
        description=(
            "Only with `stream: true` (else 400). Without `include_usage`, usage rides on the "
            "chunk that finishes the last choice; `include_usage: true` sends it in a final "
            "chunk with empty `choices` (OpenAI's), every other chunk having `usage: null` "
            "or, with `continuous_usage_stats: true`, its choice's usage so far (vLLM's); "
            "`include_usage: false` sends no usage. `include_obfuscation` is accepted and "
            "ignored."
        ),
    )
    return_token_ids: bool | None = Field(
        False, description="Add `prompt_token_ids` and `token_ids` to each choice."
    )
    raw_output: bool | None = Field(False, description="Add `raw_output` to each choice.")
    perf_metrics_in_response: bool | None = Field(
        False, description="Add `perf_metrics` to the response."
    )
    prompt_cache_max_len: int | None = Field(
        None,
        ge=0,
        description=(
            "Longest prompt prefix the prefix cache may use; 0 disables it for this request."
        ),
    )
    prompt_cache_key: str | None = Field(
        None,
        description=(
            "A session-affinity key for routing to the replica holding the session's cache; "
            "one server accepts it and answers the same."
        ),
    )
    prompt_cache_isolation_key: str | None = Field(
        None,
        description=(
            "Requests share cached prompt KV only with requests of the same key (none "
            "shares only with none). Not given: the `x-prompt-cache-isolation-key` header."
        ),
    )
    service_tier: Literal["auto", "default", "flex", "priority"] | None = Field(
        None,
        description=(
            "`priority` is admitted before waiting requests of the default tier and preempted "
            "after them; every other value is the default tier."
        ),
    )
    user: str | None = Field(
        None,
        description="An end-user id for the server's logs; it does not change the output.",
    )
    metadata: dict[str, str] | None = Field(
        None,
        description="String keys to string values, for the caller's tracing; never logged.",
    )

    # --- Reasoning controls: validated; no effect on a model without a reasoning mode,
    # and Fireside serves none (the prompt is completed as sent).
    reasoning_effort: ReasoningEffort = Field(
        None,
        description=(
            "`low`, `medium`, `high` or `none`, a boolean, or a token limit (an integer of "
            "at least 1). Not with `thinking`. No effect here."
        ),
    )
    reasoning_history: Literal["disabled", "interleaved", "preserved"] | None = Field(
        None,
        description="How a chat template keeps earlier reasoning. No effect here.",
    )
    thinking: Thinking = Field(
        None,
        description=(
            '`{"type": "enabled", "budget_tokens": N}` (N at least 1024, optional) or '
            '`{"type": "disabled"}`. Not with `reasoning_effort`. No effect here.'
        ),
    )

    @field_validator("max_completion_tokens")
    @classmethod
    def _check_one_max_tokens(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("max_tokens") is not None:
            raise _invalid("give `max_tokens` or `max_completion_tokens`, not both")
        return value

    @field_validator("prediction")
    @classmethod
    def _check_one_draft(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("speculation") is not None:
            raise _invalid("give `speculation` or `prediction`, not both")
        return value

    @field_validator("thinking")
    @classmethod
    def _check_one_reasoning_control(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and info.data.get("reasoning_effort") is not None:
            raise _invalid("give `reasoning_effort` or `thinking`, not both")
        return value

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
    def draft(self) -> str | list[int] | None:
        """The expected output, from `speculation` or `prediction` (never both)."""
        return self.speculation if self.speculation is not None else self.prediction

    @property
    def is_priority(self) -> bool:
        return self.service_tier == "priority"

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
            "mirostat_target": self.mirostat_target,
            # Only with a target: alone, eta has nothing to steer.
            "mirostat_lr": self.mirostat_lr if self.mirostat_target is not None else None,
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


class CompletionRequest(SamplingRequest):
    """`POST /v1/completions`: the shared fields and the prompt."""

    prompt: Prompt = Field(
        description=(
            "A string, several strings, token ids, or several lists of token ids. Token ids "
            "must be below the model's vocabulary size. Several prompts give several choices."
        )
    )
    images: Images | None = Field(
        None,
        description=(
            "Data URIs, one per `<image>` marker in the prompt (a flat list in marker order, "
            "or one list per prompt). Only for models with vision support."
        ),
    )
    # --- OpenAI fields some clients always send; accepted only with neutral values.
    suffix: Suffix = Field(None, description="Accepted for OpenAI clients, only as null.")
    best_of: BestOf = Field(None, description="Accepted for OpenAI clients, only as 1 or null.")


_Body = TypeVar("_Body", bound=BaseModel)


def parse_completion_request(body: bytes) -> CompletionRequest:
    """Parse and validate a request body; every failure is a 400 `APIError`."""
    return parse_body(CompletionRequest, body)


def parse_body(model: type[_Body], body: bytes) -> _Body:
    """A JSON request body validated by `model`; every failure is a 400 `APIError`."""
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
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_errors(exc.errors(include_url=False)) from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")
