"""`response_format` to a grammar the engine can enforce.

The shapes (docs/api.md) are the TypedDicts below: `grammar_spec` takes the keys
each type allows from them, and `/openapi.json` documents them, so the two
agree. A schema may be an object or a JSON string. Objects that list properties
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


@with_config(ConfigDict(extra="forbid"))
class ResponseFormatJsonObject(TypedDict):
    """Any JSON object, or one matching `schema` when given."""

    type: Literal["json_object"]
    schema: NotRequired[SchemaValue]


@with_config(ConfigDict(extra="ignore"))  # open: only `schema` is read
class _JsonSchema(TypedDict, total=False):
    name: str
    description: str
    schema: SchemaValue
    strict: bool | None


@with_config(ConfigDict(extra="forbid"))
class ResponseFormatJsonSchema(TypedDict):
    type: Literal["json_schema"]
    json_schema: _JsonSchema


@with_config(ConfigDict(extra="forbid"))
class ResponseFormatGrammar(TypedDict):
    """A GBNF grammar the output must match."""

    type: Literal["grammar"]
    grammar: Annotated[str, Field(pattern=r"\S")]


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
# Each type's allowed keys, from its shape.
_KEYS: dict[str, frozenset[str]] = {
    get_args(get_type_hints(shape)["type"])[0]: shape.__required_keys__ | shape.__optional_keys__
    for shape in get_args(ResponseFormat)
}
_ANY_OBJECT: dict[str, Any] = {"type": "object"}
# Keywords whose value is a schema, a list of schemas, or a map of name -> schema.
_SCHEMA_KEYS = ("items", "additionalProperties", "not", "if", "then", "else", "contains")
_SCHEMA_LIST_KEYS = ("anyOf", "allOf", "oneOf", "prefixItems")
_SCHEMA_MAP_KEYS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def grammar_spec(response_format: dict[str, Any] | None) -> GrammarSpec | None:
    """The constraint a response_format asks for (None for free text); 400 if malformed."""
    if response_format is None:
        return None
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
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise _bad("response_format.json_schema must be an object with a `schema`")
        raw = spec.get("schema")
        where = "response_format.json_schema.schema"
        schema = _ANY_OBJECT if raw is None else _load_schema(raw, where)
    return GrammarSpec("json_schema", json.dumps(close_objects(schema)))


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
