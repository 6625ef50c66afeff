"""`response_format` to a grammar the engine can enforce.

The shapes (docs/api.md) are the TypedDicts below: `grammar_spec` takes the keys
each type allows from them, and `/openapi.json` documents them, so the two
agree. The SDK's `ResponseFormat` is one flat object whose every key is optional
and nullable, so each shape also allows the other types' keys as null (not
given). A schema may be an object or a JSON string. Objects that list properties
are closed to other keys unless the schema says otherwise, as on the hosted API.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, NotRequired, get_args, get_type_hints

from pydantic import ConfigDict, Field, GetJsonSchemaHandler, TypeAdapter, with_config
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema
from typing_extensions import TypedDict

from fireside.api.errors import APIError
from fireside.engine.types import GrammarSpec

SchemaValue = Annotated[
    dict[str, Any]
    | Annotated[str, Field(json_schema_extra={"contentMediaType": "application/json"})]
    | None,
    Field(description="A JSON schema, as an object or as a string holding its JSON."),
]


@with_config(ConfigDict(extra="forbid"))
class ResponseFormatText(TypedDict):
    type: Literal["text"]
    grammar: NotRequired[None]
    json_schema: NotRequired[None]
    schema: NotRequired[None]


@with_config(ConfigDict(extra="forbid"))
class ResponseFormatJsonObject(TypedDict):
    """Any JSON object, or one matching `schema` when given."""

    type: Literal["json_object"]
    schema: NotRequired[SchemaValue]
    grammar: NotRequired[None]
    json_schema: NotRequired[None]


@with_config(ConfigDict(extra="ignore"))  # open: only `schema` is read
class _JsonSchema(TypedDict, total=False):
    # Nullable like every key of the SDK's flat ResponseFormat: null is "not given".
    name: str | None
    description: str | None
    schema: SchemaValue | None
    strict: bool | None


_GIVEN: dict[str, Any] = {"not": {"type": "null"}}
# A `json_schema` object that is a schema itself: no `schema` key, and some key that
# OpenAI's object does not have (grammar_spec reads it so).
_BARE_SCHEMA: dict[str, Any] = {
    "allOf": [
        {"not": {"required": ["schema"]}},
        {"not": {"propertyNames": {"enum": ["name", "description", "schema", "strict"]}}},
    ]
}


@with_config(
    ConfigDict(
        extra="forbid",
        # Exactly one of `json_schema` and `schema`, not null.
        json_schema_extra={
            "oneOf": [
                {"required": ["json_schema"], "properties": {"json_schema": _GIVEN}},
                {"required": ["schema"], "properties": {"schema": _GIVEN}},
            ]
        },
    )
)
class ResponseFormatJsonSchema(TypedDict):
    """JSON matching a schema: OpenAI's `json_schema` object (`name`, `schema`, ...),
    or the schema itself there or in `schema`; any of them may be a JSON string."""

    type: Literal["json_schema"]
    json_schema: NotRequired[
        Annotated[
            _JsonSchema
            | Annotated[dict[str, Any], Field(json_schema_extra=_BARE_SCHEMA)]
            | Annotated[str, Field(json_schema_extra={"contentMediaType": "application/json"})]
            | None,
            Field(
                description=(
                    "OpenAI's object with the schema under `schema`, or a JSON schema "
                    "itself (an object with none of `schema`, `name`, `description`, "
                    "`strict` is taken as the schema); either as a JSON string too."
                )
            ),
        ]
    ]
    schema: NotRequired[SchemaValue]
    grammar: NotRequired[None]


@with_config(ConfigDict(extra="forbid"))
class ResponseFormatGrammar(TypedDict):
    """A GBNF grammar the output must match."""

    type: Literal["grammar"]
    grammar: Annotated[str, Field(pattern=r"\S")]
    json_schema: NotRequired[None]
    schema: NotRequired[None]


ResponseFormat = (
    ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema | ResponseFormatGrammar
)


class _DocumentedAs:
    """Annotated metadata: the field's JSON schema is `shape`'s; validation is the field's."""

    def __init__(self, shape: Any) -> None:
        self._adapter: TypeAdapter[Any] = TypeAdapter(shape)

    def __get_pydantic_json_schema__(
        self, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return handler(self._adapter.core_schema)


# The request field: an object, checked by `grammar_spec` when the request is planned,
# where a 400 can say what is wrong with it.
ResponseFormatField = Annotated[dict[str, Any] | None, _DocumentedAs(ResponseFormat | None)]

_PARAM = "response_format"
# Each type's keys that take a value, from its shape (the others may only be null).
_KEYS: dict[str, frozenset[str]] = {
    get_args(hints["type"])[0]: frozenset(k for k, t in hints.items() if t is not type(None))
    for shape in get_args(ResponseFormat)
    for hints in [get_type_hints(shape)]
}
# The keys of OpenAI's `json_schema` object; an object with none of them is a schema.
_WRAPPER_KEYS = frozenset(_JsonSchema.__optional_keys__)
_ANY_OBJECT: dict[str, Any] = {"type": "object"}
# Keywords whose value is a schema, a list of schemas, or a map of name -> schema.
_SCHEMA_KEYS = ("items", "additionalProperties", "not", "if", "then", "else", "contains")
_SCHEMA_LIST_KEYS = ("anyOf", "allOf", "oneOf", "prefixItems")
_SCHEMA_MAP_KEYS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def grammar_spec(response_format: dict[str, Any] | None) -> GrammarSpec | None:
    """The constraint a response_format asks for (None for free text); 400 if malformed."""
    if response_format is None:
        return None
    # Null is "not given", for these keys as for the request's.
    response_format = {k: v for k, v in response_format.items() if v is not None}
    kind = response_format.get("type")
    if kind not in _KEYS:
        raise _bad(f"response_format.type must be one of {', '.join(_KEYS)}")
    unknown = sorted(set(response_format) - _KEYS[kind])
    if unknown:
        raise _bad(f"response_format of type {kind!r} does not take {unknown[0]!r}")
    if kind == "text":
        return None
    if kind == "grammar":
        grammar = response_format.get("grammar")
        if not isinstance(grammar, str) or not grammar.strip():
            raise _bad("response_format.grammar must be a non-empty GBNF grammar string")
        return GrammarSpec("gbnf", grammar)
    if kind == "json_object":
        raw = response_format.get("schema")
        schema = _ANY_OBJECT if raw is None else _load_schema(raw, "response_format.schema")
    else:
        schema = _json_schema_of(response_format)
    return GrammarSpec("json_schema", json.dumps(close_objects(schema)))


def _json_schema_of(response_format: dict[str, Any]) -> dict[str, Any]:
    """The schema of a `json_schema` response_format, wherever the SDK lets it be."""
    if "schema" in response_format:
        if "json_schema" in response_format:
            raise _bad("response_format takes `json_schema` or `schema`, not both")
        return _load_schema(response_format["schema"], "response_format.schema")
    if "json_schema" not in response_format:
        raise _bad("response_format of type 'json_schema' needs `json_schema` or `schema`")
    spec = _load_schema(response_format["json_schema"], "response_format.json_schema")
    if "schema" in spec or set(spec) <= _WRAPPER_KEYS:  # OpenAI's object around it
        spec = {k: v for k, v in spec.items() if v is not None}
        for key, kind in (("name", str), ("description", str), ("strict", bool)):
            if key in spec and not isinstance(spec[key], kind):
                raise _bad(f"response_format.json_schema.{key} must be a {kind.__name__}")
        raw = spec.get("schema")
        where = "response_format.json_schema.schema"
        return _ANY_OBJECT if raw is None else _load_schema(raw, where)
    return spec  # the schema itself


def close_objects(schema: Any) -> Any:
    """A copy of the schema where objects with properties allow no other keys by default."""
    if isinstance(schema, list):
        return [close_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_KEYS:
        if isinstance(out.get(key), dict | list):
            out[key] = close_objects(out[key])
    for key in _SCHEMA_LIST_KEYS:
        if isinstance(out.get(key), list):
            out[key] = [close_objects(s) for s in out[key]]
    for key in _SCHEMA_MAP_KEYS:
        if isinstance(out.get(key), dict):
            out[key] = {name: close_objects(s) for name, s in out[key].items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _load_schema(raw: Any, where: str) -> dict[str, Any]:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raise _bad(f"{where} is a string but not valid JSON") from None
    if not isinstance(raw, dict):
        raise _bad(f"{where} must be a JSON schema object")
    return raw


def _bad(message: str) -> APIError:
    return APIError.invalid(message, _PARAM)
