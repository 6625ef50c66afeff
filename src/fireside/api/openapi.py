"""The OpenAPI 3.1 document of the HTTP API (`GET /openapi.json`), generated from the code.

Every schema is pydantic's, of the types the code itself uses: the request
models (`protocol.CompletionRequest`, whose custom validators carry their own
schemas in `request_fields.py`; the tokenizer requests) and the TypedDicts the
response builders return (`responses.py`, `logprobs.py`, `errors.py`,
`tokenization.py`, `structured.py`). Descriptions are the models' `Field`
descriptions and the shapes' docstrings. What is added here: the defaults the
server applies to a request field left out (`SamplingParams`'), the stream's
event framing, and the operations (`openapi_paths.py`). A shape whose name
starts with `_` is written out where it is used instead of being a component.

The document is the same for every server: it names no model and no key, so it
is served without authentication (as FastAPI and vLLM do, and as the hosted
APIs publish theirs).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any

from pydantic import TypeAdapter
from pydantic.json_schema import JsonSchemaMode

from fireside import __version__
from fireside.api.chat_protocol import ChatCompletionRequest
from fireside.api.chat_responses import ChatCompletion, ChatCompletionChunk
from fireside.api.errors import Error
from fireside.api.openapi_paths import Schema, paths
from fireside.api.protocol import CompletionRequest, SamplingRequest
from fireside.api.responses import (
    PERF_HEADER_PREFIX,
    Completion,
    CompletionChunk,
    Health,
    Model,
    ModelList,
)
from fireside.api.tokenization import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from fireside.engine.types import SamplingParams

__all__ = ["completion_request_schema", "openapi_document"]

OPENAPI_VERSION = "3.1.0"
_REF_PREFIX = "#/components/schemas/"

# The components the operations name; the shapes they use become components too.
_SHAPES: dict[str, Any] = {
    "CompletionRequest": CompletionRequest,
    "TokenizeRequest": TokenizeRequest,
    "DetokenizeRequest": DetokenizeRequest,
    "Completion": Completion,
    "CompletionChunk": CompletionChunk,
    "ChatCompletionRequest": ChatCompletionRequest,
    "ChatCompletion": ChatCompletion,
    "ChatCompletionChunk": ChatCompletionChunk,
    "Model": Model,
    "ModelList": ModelList,
    "Health": Health,
    "Error": Error,
    "TokenizerInfo": TokenizerInfo,
    "TokenizeResponse": TokenizeResponse,
    "DetokenizeResponse": DetokenizeResponse,
}


# OpenAPI 3.1 has no schema for a stream, so this describes each event of one; its
# framing is `responses.sse_event`'s.
def _event(chunk: str) -> Schema:
    return {
        "type": "object",
        "properties": {
            "data": {
                "anyOf": [
                    {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": {
                            "oneOf": [
                                {"$ref": f"{_REF_PREFIX}{chunk}"},
                                {"$ref": f"{_REF_PREFIX}Error"},
                            ]
                        },
                    },
                    {"const": "[DONE]"},
                ]
            },
            "event": {"type": "string"},
        },
        "required": ["data"],
        "description": (
            "One server-sent event (OpenAPI 3.1 has no schema for a stream, so this describes "
            f"each event): `data:` holds a {chunk}, or an Error when generation fails "
            "after the stream started, and the last event's is `[DONE]`."
        ),
    }


def completion_request_schema() -> Schema:
    """The body of `POST /v1/completions`, as the document has it."""
    return openapi_document()["components"]["schemas"]["CompletionRequest"]


def openapi_document() -> dict[str, Any]:
    """The whole document; a fresh copy on each call."""
    return copy.deepcopy(_document())


@functools.cache
def _document() -> dict[str, Any]:
    schemas = _components()
    perf_headers = {
        f"{PERF_HEADER_PREFIX}{name}": prop
        for name, prop in schemas["PerfMetrics"]["properties"].items()
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
        "paths": paths(perf_headers),
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


def _components() -> dict[str, Schema]:
    """Every named shape's schema, and those of the shapes they use."""
    mode: JsonSchemaMode = "validation"
    inputs = [(name, mode, TypeAdapter(shape)) for name, shape in _SHAPES.items()]
    refs, definitions = TypeAdapter.json_schemas(inputs, ref_template=_REF_PREFIX + "{model}")
    schemas: dict[str, Schema] = copy.deepcopy(definitions.get("$defs", {}))
    for (name, _), ref in refs.items():  # each named shape is a definition, under its name
        if ref != {"$ref": _REF_PREFIX + name}:
            raise AssertionError(f"{name} is not a definition of its own: {ref}")
    _apply_server_defaults(schemas["CompletionRequest"], CompletionRequest)
    _apply_server_defaults(schemas["ChatCompletionRequest"], ChatCompletionRequest)
    schemas = _inline_private(schemas)
    _tidy(schemas)
    schemas["CompletionEvent"] = _event("CompletionChunk")
    schemas["ChatCompletionEvent"] = _event("ChatCompletionChunk")
    return schemas


def _apply_server_defaults(request: Schema, model: type[SamplingRequest]) -> None:
    """Each field's default as the server applies it: the model's, or for the sampling
    fields (whose model default is null, "not given") `SamplingParams`'."""
    engine_defaults = {f.name: f.default for f in dataclasses.fields(SamplingParams)}
    for name, prop in request["properties"].items():
        prop.pop("default", None)
        value = model.model_fields[name].default
        if value is None:
            value = engine_defaults.get(name)
        if isinstance(value, bool | int | float | str):
            prop["default"] = value


def _inline_private(schemas: dict[str, Schema]) -> dict[str, Schema]:
    """The schemas without the private (`_`-named) ones, each written out where used."""
    private = {name: schema for name, schema in schemas.items() if name.startswith("_")}

    def inline(node: Any) -> Any:
        if isinstance(node, list):
            return [inline(item) for item in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref", "")
        name = ref.removeprefix(_REF_PREFIX)
        if name in private:
            siblings = {k: v for k, v in node.items() if k != "$ref"}
            return {**inline(copy.deepcopy(private[name])), **siblings}
        return {key: inline(value) for key, value in node.items()}

    return {name: inline(schema) for name, schema in schemas.items() if name not in private}


def _tidy(node: Any) -> None:
    """Drop pydantic's generated titles (the names say it) and join the lines of
    docstring descriptions. `properties` maps field names to schemas, so a field
    named `title` or `description` stays."""
    if isinstance(node, list):
        for item in node:
            _tidy(item)
    elif isinstance(node, dict):
        if isinstance(node.get("title"), str):
            del node["title"]
        if isinstance(node.get("description"), str):
            node["description"] = " ".join(node["description"].split())
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                for prop in value.values():
                    _tidy(prop)
            else:
                _tidy(value)
