"""The operations of `/openapi.json`: every route, its operation id, status codes and
headers. The schemas they name are components generated from the code's shapes
(openapi.py); the routes themselves are app.py's, which uses the prefixes below.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

API_PREFIXES = ("/v1", "/inference/v1")
# The tokenizer endpoints are also at the root, where vLLM serves them, and under
# /inference, where lm-eval looks for them given base_url .../inference/v1/completions.
TOKENIZER_PREFIXES = ("", "/inference", *API_PREFIXES)

_STRING: Schema = {"type": "string"}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


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


def _create_completion(operation_id: str, perf_headers: dict[str, Schema]) -> Schema:
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
                    for name, schema in perf_headers.items()
                },
                "content": {
                    "application/json": {"schema": _ref("Completion")},
                    "text/event-stream": {"schema": _ref("CompletionEvent")},
                },
            },
            **_errors(400, 401, 404, 413, 429, 500, 503),
        },
    }


def _create_chat_completion(operation_id: str, perf_headers: dict[str, Schema]) -> Schema:
    operation = _create_completion(operation_id, perf_headers)
    operation["summary"] = "Create a chat completion"
    operation["tags"] = ["chat"]
    operation["requestBody"]["content"]["application/json"]["schema"] = _ref(
        "ChatCompletionRequest"
    )
    ok = operation["responses"]["200"]
    ok["description"] = (
        "The answer: JSON, or with `stream: true` server-sent events "
        "(`data: <ChatCompletionChunk>` each, ending with `data: [DONE]`)."
    )
    ok["content"] = {
        "application/json": {"schema": _ref("ChatCompletion")},
        "text/event-stream": {"schema": _ref("ChatCompletionEvent")},
    }
    return operation


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


def paths(perf_headers: dict[str, Schema]) -> dict[str, Schema]:
    """Every route's operation; `perf_headers`: the schemas of the `fireworks-*` headers."""
    paths: dict[str, Schema] = {}
    for prefix, suffix in zip(API_PREFIXES, ("", "Inference"), strict=True):
        paths[f"{prefix}/completions"] = {
            "post": _create_completion(f"createCompletion{suffix}", perf_headers)
        }
        paths[f"{prefix}/chat/completions"] = {
            "post": _create_chat_completion(f"createChatCompletion{suffix}", perf_headers)
        }
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
