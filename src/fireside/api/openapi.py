"""The OpenAPI 3.1 document of the HTTP API (`GET /openapi.json`).

The request body starts as pydantic's JSON schema of `CompletionRequest`, so
the types, ranges, required fields and `additionalProperties: false` are the
ones the validator enforces. Pydantic cannot see inside the hand-written
("plain") validators, so the fields they check (`prompt`, `logprobs`, `stop`,
`suffix`, `best_of`) get their schema here, as do the constraints that live in
other validators (`logit_bias` keys, `response_format`'s shapes, `images`' data
URIs) and the defaults the server applies when a field is left out. Responses
are plain dicts (see `responses.py`), so their schemas are written out below.

The document is the same for every server: it names no model and no key, so it
is served without authentication (as FastAPI and vLLM do, and as the hosted
APIs publish theirs).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from fireside import __version__
from fireside.api.protocol import CompletionRequest
from fireside.api.tokenization import DetokenizeRequest, TokenizeRequest
from fireside.engine.types import SamplingParams

OPENAPI_VERSION = "3.1.0"
API_PREFIXES = ("/v1", "/inference/v1")
# The tokenizer endpoints are also at the root, where vLLM serves them, and under
# /inference, where lm-eval looks for them given base_url .../inference/v1/completions.
TOKENIZER_PREFIXES = ("", "/inference", *API_PREFIXES)

Schema = dict[str, Any]

_NULL: Schema = {"type": "null"}
_INT: Schema = {"type": "integer"}
_NUMBER: Schema = {"type": "number"}
_STRING: Schema = {"type": "string"}
_TOKEN_ID: Schema = {"type": "integer", "minimum": 0}
_DATA_URI: Schema = {
    "type": "string",
    "pattern": "^data:image/(jpeg|jpg|png|webp|gif);base64,",
    "description": "An image as a data URI: `data:image/<jpeg|png|webp|gif>;base64,...`.",
}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _array(items: Schema, **constraints: Any) -> Schema:
    return {"type": "array", "items": items, **constraints}


def _nullable(*schemas: Schema) -> Schema:
    return {"anyOf": [*schemas, _NULL]}


def _object(
    properties: dict[str, Schema], required: list[str] | None = None, **rest: Any
) -> Schema:
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return {**schema, **rest}


# --- The request body -----------------------------------------------------------------

# Schemas for the fields pydantic describes wrongly or too loosely. Optional fields
# stay nullable, as pydantic has them: null means "not given".
_FIELD_SCHEMAS: dict[str, Schema] = {
    "prompt": {
        "oneOf": [
            {"type": "string", "minLength": 1},
            _array({"type": "string", "minLength": 1}, minItems=1),
            _array(_TOKEN_ID, minItems=1),
            _array(_array(_TOKEN_ID, minItems=1), minItems=1),
        ]
    },
    "images": _nullable(_array(_DATA_URI), _array(_array(_DATA_URI))),
    "logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": 5}, {"type": "boolean"}),
    "logit_bias": _nullable(
        {
            "type": "object",
            "propertyNames": {"pattern": "^[0-9]+$"},
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
        }
    ),
    "stop": _nullable(
        {"type": "string", "minLength": 1},
        _array({"type": "string", "minLength": 1}, maxItems=4),
    ),
    "response_format": _nullable(
        {
            "oneOf": [
                _ref("ResponseFormatText"),
                _ref("ResponseFormatJsonObject"),
                _ref("ResponseFormatJsonSchema"),
                _ref("ResponseFormatGrammar"),
            ]
        }
    ),
    "stream_options": _nullable(
        _object(
            {
                name: _nullable({"type": "boolean"})
                for name in ("include_usage", "continuous_usage_stats", "include_obfuscation")
            },
            additionalProperties=False,
        )
    ),
    "suffix": _NULL,
    "best_of": _nullable({"type": "integer", "const": 1}),
}

_DESCRIPTIONS: dict[str, str] = {
    "model": "The id of a loaded model (see `GET /v1/models`); an unknown id is 404.",
    "prompt": (
        "A string, several strings, token ids, or several lists of token ids. Token ids "
        "must be below the model's vocabulary size. Several prompts give several choices."
    ),
    "images": (
        "Data URIs, one per `<image>` marker in the prompt (a flat list in marker order, or "
        "one list per prompt). Only for models with vision support."
    ),
    "max_tokens": (
        "Most tokens to generate (the default is the server's, 16 unless configured). "
        "0 with `echo` returns the prompt alone, for scoring."
    ),
    "max_completion_tokens": "Alias of `max_tokens`; giving both is 400.",
    "context_length_exceeded_behavior": (
        "`truncate` lowers max_tokens to fit the context; `error` answers 400 "
        "`context_length_exceeded` instead."
    ),
    "logprobs": (
        "An integer N: the legacy logprobs object with the sampled token and up to N "
        "alternatives per position. `true`: the `content[]` format."
    ),
    "top_logprobs": "Alternatives per position; needs `logprobs`.",
    "echo": "Start the text with the prompt (with logprobs, the prompt's are scored too).",
    "echo_last": "Echo only the last N prompt tokens.",
    "temperature": "Sampling temperature; 0 is greedy.",
    "top_p": "Nucleus sampling: keep the most likely tokens up to this probability mass.",
    "top_k": "Keep only the K most likely tokens; 0 is off.",
    "min_p": "Drop tokens less likely than this fraction of the most likely one; 0 is off.",
    "typical_p": "Locally typical sampling; 1 is off.",
    "frequency_penalty": "`logit -= count * frequency_penalty`, count: times generated so far.",
    "presence_penalty": "`logit -= presence_penalty` for every token generated so far.",
    "repetition_penalty": (
        "Multiplicative penalty over the prompt and the output; 1 is off, 0 is not allowed."
    ),
    "logit_bias": "Token id (as a string) to a bias from -100 to 100, added before sampling.",
    "seed": "The same seed and request give the same output.",
    "n": "Choices per prompt; choice `index = prompt_index * n + j`.",
    "stop": (
        "Up to 4 sequences that end generation. The returned text contains the stop "
        "sequence unless `include_stop_str_in_output` is false."
    ),
    "include_stop_str_in_output": (
        "Whether the text keeps the stop sequence that ended it. The default is the "
        "server's: true unless it runs with `--no-include-stop-str-in-output`."
    ),
    "ignore_eos": "Keep generating past end-of-sequence.",
    "response_format": (
        "Constrained decoding: JSON (optionally matching a JSON schema) or a GBNF grammar. A "
        "schema or grammar that cannot compile is 400."
    ),
    "stream": "Answer with server-sent events (`text/event-stream`).",
    "stream_options": (
        "Only with `stream: true` (else 400). Without `include_usage`, usage rides on the "
        "chunk that finishes the last choice; `include_usage: true` sends it in a final chunk "
        "with empty `choices` (OpenAI's), every other chunk having `usage: null` or, with "
        "`continuous_usage_stats: true`, its choice's usage so far (vLLM's); "
        "`include_usage: false` sends no usage. `include_obfuscation` is accepted and ignored."
    ),
    "return_token_ids": "Add `prompt_token_ids` and `token_ids` to each choice.",
    "raw_output": "Add `raw_output` to each choice.",
    "perf_metrics_in_response": "Add `perf_metrics` to the response.",
    "prompt_cache_max_len": (
        "Longest prompt prefix the prefix cache may use; 0 disables it for this request."
    ),
    "user": "An end-user id for the server's logs; it does not change the output.",
    "suffix": "Accepted for OpenAI clients, only as null.",
    "best_of": "Accepted for OpenAI clients, only as 1 or null.",
}


def _defaults() -> dict[str, Any]:
    """What the server applies to a field left out: the model's default, or (for the
    sampling fields, whose model default is null, "not given") `SamplingParams`'."""
    engine_defaults = {f.name: f.default for f in dataclasses.fields(SamplingParams)}
    out = {}
    for name, field in CompletionRequest.model_fields.items():
        value = field.default
        if value is None:
            value = engine_defaults.get(name)
        if isinstance(value, bool | int | float | str):
            out[name] = value
    return out


def completion_request_schema() -> Schema:
    """The body of `POST /v1/completions`: pydantic's schema, fixed up."""
    schema = CompletionRequest.model_json_schema(mode="validation")
    if "$defs" in schema:  # the model has no nested models; a new one needs components
        raise AssertionError("CompletionRequest grew nested models: move $defs to components")
    properties: dict[str, Schema] = schema["properties"]
    for table in (_FIELD_SCHEMAS, _DESCRIPTIONS):
        unknown = set(table) - set(properties)
        if unknown:
            raise AssertionError(f"not fields of CompletionRequest: {sorted(unknown)}")
    defaults = _defaults()
    for name, prop in properties.items():
        prop = copy.deepcopy(_FIELD_SCHEMAS.get(name, prop))
        prop.pop("title", None)
        prop.pop("default", None)
        if name in defaults:
            prop["default"] = defaults[name]
        if name in _DESCRIPTIONS:
            prop["description"] = _DESCRIPTIONS[name]
        properties[name] = prop
    return {
        "type": "object",
        "description": (
            "Unknown fields are rejected with 400; null means the field was not given."
        ),
        "required": schema["required"],
        "properties": properties,
        "additionalProperties": False,
        # stream_options (an object, not null) needs stream: true.
        "if": {"required": ["stream_options"], "properties": {"stream_options": _object({})}},
        "then": {"required": ["stream"], "properties": {"stream": {"const": True}}},
    }


def _body_schema(model: type[TokenizeRequest | DetokenizeRequest], description: str) -> Schema:
    """A tokenizer endpoint's body: pydantic's schema, without its titles."""
    schema = model.model_json_schema(mode="validation")
    schema.pop("title", None)
    for prop in schema["properties"].values():
        prop.pop("title", None)
    return {**schema, "description": description}


_JSON_SCHEMA_VALUE: Schema = {
    "description": "A JSON schema, as an object or as a string holding its JSON.",
    "anyOf": [
        {"type": "object"},
        {"type": "string", "contentMediaType": "application/json"},
        _NULL,
    ],
}

_RESPONSE_FORMATS: dict[str, Schema] = {
    "ResponseFormatText": _object(
        {"type": {"const": "text"}}, ["type"], additionalProperties=False
    ),
    "ResponseFormatJsonObject": _object(
        {"type": {"const": "json_object"}, "schema": _JSON_SCHEMA_VALUE},
        ["type"],
        additionalProperties=False,
        description="Any JSON object, or one matching `schema` when given.",
    ),
    "ResponseFormatJsonSchema": _object(
        {
            "type": {"const": "json_schema"},
            "json_schema": _object(
                {
                    "name": _STRING,
                    "description": _STRING,
                    "schema": _JSON_SCHEMA_VALUE,
                    "strict": _nullable({"type": "boolean"}),
                }
            ),
        },
        ["type", "json_schema"],
        additionalProperties=False,
    ),
    "ResponseFormatGrammar": _object(
        {"type": {"const": "grammar"}, "grammar": {"type": "string", "pattern": "\\S"}},
        ["type", "grammar"],
        additionalProperties=False,
        description="A GBNF grammar the output must match.",
    ),
}


# --- Responses -------------------------------------------------------------------------

_TOKEN_BYTES = _array({"type": "integer", "minimum": 0, "maximum": 255})
_LOGPROB = {"type": "number", "maximum": 0}

_RESPONSE_SCHEMAS: dict[str, Schema] = {
    "LegacyLogprobs": _object(
        {
            "tokens": _array(_STRING),
            "token_logprobs": _array(_nullable(_LOGPROB)),
            "top_logprobs": _array(_nullable({"type": "object", "additionalProperties": _LOGPROB})),
            "text_offset": _array({"type": "integer", "minimum": 0}),
            "token_ids": _array(_TOKEN_ID),
        },
        ["tokens", "token_logprobs", "top_logprobs", "text_offset", "token_ids"],
        description=(
            "`logprobs: N`. Per position: the token, its logprob (null for the first prompt "
            "token), the sampled token with up to N alternatives, and its offset in `text`."
        ),
    ),
    "TopLogprob": _object(
        {"token": _STRING, "logprob": _LOGPROB, "token_id": _TOKEN_ID, "bytes": _TOKEN_BYTES},
        ["token", "logprob", "token_id", "bytes"],
    ),
    "ContentLogprob": _object(
        {
            "token": _STRING,
            "bytes": _TOKEN_BYTES,
            "logprob": _nullable(_LOGPROB),
            "sampling_logprob": _nullable(_LOGPROB),
            "token_id": _TOKEN_ID,
            "text_offset": {"type": "integer", "minimum": 0},
            "top_logprobs": _array(_ref("TopLogprob")),
        },
        [
            "token",
            "bytes",
            "logprob",
            "sampling_logprob",
            "token_id",
            "text_offset",
            "top_logprobs",
        ],
    ),
    "ContentLogprobs": _object(
        {"content": _array(_ref("ContentLogprob"))},
        ["content"],
        description="`logprobs: true`.",
    ),
    "RawOutput": _object(
        {
            "prompt_fragments": _array({"anyOf": [_STRING, _INT]}),
            "prompt_token_ids": _array(_INT),
            "completion": _STRING,
            "completion_token_ids": _array(_TOKEN_ID),
            "completion_logprobs": _nullable(_ref("ContentLogprobs")),
        },
        [
            "prompt_fragments",
            "prompt_token_ids",
            "completion",
            "completion_token_ids",
            "completion_logprobs",
        ],
    ),
    "Usage": _object(
        {
            "prompt_tokens": {"type": "integer", "minimum": 0},
            "completion_tokens": {"type": "integer", "minimum": 0},
            "total_tokens": {"type": "integer", "minimum": 0},
            "prompt_tokens_details": _object(
                {"cached_tokens": {"type": "integer", "minimum": 0}}, ["cached_tokens"]
            ),
        },
        ["prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"],
    ),
    "PerfMetrics": _object(
        {
            "prompt-tokens": {"type": "integer", "minimum": 0},
            "cached-prompt-tokens": {"type": "integer", "minimum": 0},
            "server-time-to-first-token": {"type": "number", "minimum": 0},
            "server-processing-time": {"type": "number", "minimum": 0},
        },
        [
            "prompt-tokens",
            "cached-prompt-tokens",
            "server-time-to-first-token",
            "server-processing-time",
        ],
        description="Times are seconds since the request reached the server.",
    ),
    "Model": _object(
        {
            "id": _STRING,
            "object": {"const": "model"},
            "created": _INT,
            "owned_by": _STRING,
            "context_length": {"type": "integer", "minimum": 1},
            "capabilities": _array({"enum": ["completion", "vision"]}),
        },
        ["id", "object", "created", "owned_by", "context_length"],
    ),
    "ModelList": _object(
        {"object": {"const": "list"}, "data": _array(_ref("Model"))}, ["object", "data"]
    ),
    "Health": _object({"status": {"enum": ["ok", "unavailable", "draining"]}}, ["status"]),
    "Error": _object(
        {
            "error": _object(
                {
                    "message": _STRING,
                    "type": _STRING,
                    "param": _nullable(_STRING),
                    "code": _nullable(_STRING),
                },
                ["message", "type", "param", "code"],
            )
        },
        ["error"],
        description="The OpenAI error envelope; `param` names the offending field.",
    ),
}


def _choice(*, chunk: bool) -> Schema:
    reasons: list[str | None] = ["stop", "length"]
    return _object(
        {
            "index": {"type": "integer", "minimum": 0},
            "text": _STRING,
            "finish_reason": {"enum": [*reasons, None] if chunk else reasons},
            "logprobs": _nullable(_ref("LegacyLogprobs"), _ref("ContentLogprobs")),
            "prompt_token_ids": _array(_TOKEN_ID),
            "token_ids": _array(_TOKEN_ID),
            "raw_output": _ref("RawOutput"),
        },
        ["index", "text", "finish_reason", "logprobs"],
    )


def _completion(*, chunk: bool) -> Schema:
    required = ["id", "object", "created", "model", "choices"]
    return _object(
        {
            "id": {"type": "string", "pattern": "^cmpl-[0-9a-f]{32}$"},
            "object": {"const": "text_completion"},
            "created": _INT,
            "model": _STRING,
            "choices": _array(_ref("CompletionChunkChoice" if chunk else "CompletionChoice")),
            "usage": _nullable(_ref("Usage")) if chunk else _ref("Usage"),
            "perf_metrics": _ref("PerfMetrics"),
        },
        required if chunk else [*required, "usage"],
        description=(
            "One server-sent event's data, with one choice. Every chunk has the response's "
            "`id`. The request's `usage` (and `perf_metrics`, when asked) rides on the chunk "
            "that finishes the last choice, other chunks having `usage: null`; see "
            "`stream_options` for OpenAI's separate usage chunk (empty `choices`)."
            if chunk
            else "A non-streamed response."
        ),
    )


_COMPLETION_EVENT: Schema = _object(
    {
        "data": {
            "anyOf": [
                {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {"oneOf": [_ref("CompletionChunk"), _ref("Error")]},
                },
                {"const": "[DONE]"},
            ]
        },
        "event": _STRING,
    },
    ["data"],
    description=(
        "One server-sent event (OpenAPI 3.1 has no schema for a stream, so this describes "
        "each event): `data:` holds a CompletionChunk, or an Error when generation fails "
        "after the stream started, and the last event's is `[DONE]`."
    ),
)

_NULLABLE_STRING = _nullable(_STRING)

_RESPONSE_SCHEMAS |= {
    "TokenizerInfo": _object(
        {
            "tokenizer_class": _STRING,
            "bos_token": _NULLABLE_STRING,
            "eos_token": _NULLABLE_STRING,
            "pad_token": _NULLABLE_STRING,
            "add_bos_token": {"type": "boolean"},
            "add_eos_token": {"type": "boolean"},
            "model_max_length": {"type": "integer", "minimum": 1},
            "chat_template": _STRING,
        },
        [
            "tokenizer_class",
            "bos_token",
            "eos_token",
            "pad_token",
            "add_bos_token",
            "add_eos_token",
            "model_max_length",
        ],
        description=(
            "The model's tokenizer_config.json as far as its GGUF file holds one (vLLM's "
            "shape): the special tokens' text (null when the model has none), whether "
            "tokenizing with special tokens adds BOS/EOS, the context length, and the chat "
            "template (left out when the model has none)."
        ),
    ),
    "TokenizeResponse": _object(
        {
            "count": {"type": "integer", "minimum": 0},
            "max_model_len": {"type": "integer", "minimum": 1},
            "tokens": _array(_TOKEN_ID),
            "token_strs": _nullable(_array(_STRING)),
        },
        ["count", "max_model_len", "tokens", "token_strs"],
        description="The prompt's token ids; `token_strs` (each token's text) when asked.",
    ),
    "DetokenizeResponse": _object(
        {"prompt": _STRING},
        ["prompt"],
        description="The tokens' text, special tokens written out (`<|im_start|>`).",
    ),
    "CompletionEvent": _COMPLETION_EVENT,
    "CompletionChoice": _choice(chunk=False),
    "CompletionChunkChoice": _choice(chunk=True),
    "Completion": _completion(chunk=False),
    "CompletionChunk": _completion(chunk=True),
}

_STATUS_TEXT = {
    400: "Invalid request: a field's type or value, unparseable JSON, or context overflow.",
    401: "Missing or wrong API key.",
    404: "Unknown model.",
    413: "The body is larger than the server's limit.",
    429: "The waiting queue is full; retry after `Retry-After` seconds.",
    500: "A server bug; the message leaks nothing.",
    503: "The model is loading, the server is shutting down, or the engine died.",
}
_ERROR_HEADERS = {
    401: {"WWW-Authenticate": {"required": True, "schema": _STRING}},
    429: {"Retry-After": {"required": True, "schema": {"type": "integer", "minimum": 0}}},
}


def _errors(*statuses: int) -> dict[str, Any]:
    out = {}
    for status in statuses:
        response: Schema = {
            "description": _STATUS_TEXT[status],
            "content": {"application/json": {"schema": _ref("Error")}},
        }
        if status in _ERROR_HEADERS:
            response["headers"] = _ERROR_HEADERS[status]
        out[str(status)] = response
    return out


_PERF_HEADERS = {
    "fireworks-prompt-tokens": _INT,
    "fireworks-cached-prompt-tokens": _INT,
    "fireworks-server-time-to-first-token": _NUMBER,
    "fireworks-server-processing-time": _NUMBER,
}


def _create_completion(operation_id: str) -> Schema:
    return {
        "operationId": operation_id,
        "summary": "Create a completion",
        "tags": ["completions"],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _ref("CompletionRequest")}},
        },
        "responses": {
            "200": {
                "description": (
                    "The completion: JSON, or with `stream: true` server-sent events "
                    "(`data: <CompletionChunk>` each, ending with `data: [DONE]`)."
                ),
                "headers": {
                    name: {"description": "Non-streamed answers only.", "schema": schema}
                    for name, schema in _PERF_HEADERS.items()
                },
                "content": {
                    "application/json": {"schema": _ref("Completion")},
                    "text/event-stream": {"schema": _ref("CompletionEvent")},
                },
            },
            **_errors(400, 401, 404, 413, 429, 500, 503),
        },
    }


def _list_models(operation_id: str) -> Schema:
    return {
        "operationId": operation_id,
        "summary": "List the loaded models",
        "tags": ["models"],
        "responses": {
            "200": {
                "description": "The loaded models.",
                "content": {"application/json": {"schema": _ref("ModelList")}},
            },
            **_errors(401, 500),
        },
    }


def _retrieve_model(operation_id: str) -> Schema:
    return {
        "operationId": operation_id,
        "summary": "Describe one model",
        "tags": ["models"],
        "parameters": [
            {
                "name": "model",
                "in": "path",
                "required": True,
                "description": "The model id; percent-encode a `/` in it.",
                "schema": _STRING,
            }
        ],
        "responses": {
            "200": {
                "description": "The model.",
                "content": {"application/json": {"schema": _ref("Model")}},
            },
            **_errors(401, 404, 500),
        },
    }


def _tokenizer_info(operation_id: str) -> Schema:
    return {
        "operationId": operation_id,
        "summary": "Describe the model's tokenizer",
        "tags": ["tokenizer"],
        "parameters": [
            {
                "name": "model",
                "in": "query",
                "required": False,
                "description": "The model id; needed only when several models are served.",
                "schema": _STRING,
            }
        ],
        "responses": {
            "200": {
                "description": "The tokenizer's special tokens, context length and template.",
                "content": {"application/json": {"schema": _ref("TokenizerInfo")}},
            },
            **_errors(400, 401, 404, 500),
        },
    }


def _tokenizer_operation(operation_id: str, name: str, summary: str) -> Schema:
    return {
        "operationId": operation_id,
        "summary": summary,
        "tags": ["tokenizer"],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _ref(f"{name}Request")}},
        },
        "responses": {
            "200": {
                "description": summary,
                "content": {"application/json": {"schema": _ref(f"{name}Response")}},
            },
            **_errors(400, 401, 404, 413, 500),
        },
    }


def _paths() -> dict[str, Schema]:
    paths: dict[str, Schema] = {}
    for prefix, suffix in zip(API_PREFIXES, ("", "Inference"), strict=True):
        paths[f"{prefix}/completions"] = {"post": _create_completion(f"createCompletion{suffix}")}
        paths[f"{prefix}/models"] = {"get": _list_models(f"listModels{suffix}")}
        paths[f"{prefix}/models/{{model}}"] = {"get": _retrieve_model(f"retrieveModel{suffix}")}
    suffixes = ("", "InferenceRoot", "V1", "Inference")
    for prefix, suffix in zip(TOKENIZER_PREFIXES, suffixes, strict=True):
        paths[f"{prefix}/tokenizer_info"] = {"get": _tokenizer_info(f"tokenizerInfo{suffix}")}
        paths[f"{prefix}/tokenize"] = {
            "post": _tokenizer_operation(f"tokenize{suffix}", "Tokenize", "Tokenize a prompt")
        }
        paths[f"{prefix}/detokenize"] = {
            "post": _tokenizer_operation(
                f"detokenize{suffix}", "Detokenize", "Turn token ids into text"
            )
        }
    paths["/health"] = {
        "get": {
            "operationId": "health",
            "summary": "Whether every engine runs (no key needed)",
            "tags": ["operations"],
            "security": [],
            "responses": {
                status: {
                    "description": text,
                    "content": {"application/json": {"schema": _ref("Health")}},
                }
                for status, text in (
                    ("200", 'Every engine runs: `{"status": "ok"}`.'),
                    ("503", "Loading, draining at shutdown, or an engine died."),
                )
            },
        }
    }
    paths["/metrics"] = {
        "get": {
            "operationId": "metrics",
            "summary": "Prometheus metrics",
            "tags": ["operations"],
            "responses": {
                "200": {
                    "description": "The Prometheus text exposition format.",
                    "content": {"text/plain": {"schema": _STRING}},
                },
                **_errors(401, 500),
            },
        }
    }
    paths["/openapi.json"] = {
        "get": {
            "operationId": "openapi",
            "summary": "This document (no key needed)",
            "tags": ["operations"],
            "security": [],
            "responses": {
                "200": {
                    "description": "The OpenAPI document.",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        }
    }
    return paths


def openapi_document() -> dict[str, Any]:
    """The whole document; a fresh copy on each call."""
    schemas = {
        "CompletionRequest": completion_request_schema(),
        "TokenizeRequest": _body_schema(
            TokenizeRequest,
            "`add_special_tokens` adds the model's BOS/EOS when it uses them; special tokens "
            "written in the prompt are parsed either way. The ids are those a completion of "
            "the same string prompt uses.",
        ),
        "DetokenizeRequest": _body_schema(
            DetokenizeRequest, "Token ids must be below the model's vocabulary size."
        ),
        **copy.deepcopy(_RESPONSE_FORMATS),
        **copy.deepcopy(_RESPONSE_SCHEMAS),
    }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Fireside",
            "version": __version__,
            "description": (
                "The Fireworks / OpenAI legacy Create Completion API, served over llama.cpp."
            ),
        },
        "paths": copy.deepcopy(_paths()),
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": (
                        "A key from the server's configuration; a server with none runs open."
                    ),
                }
            },
        },
        "security": [{"bearerAuth": []}],
    }
