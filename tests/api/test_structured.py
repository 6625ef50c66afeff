"""response_format: its shapes, the grammar the engine is asked for, and every 400."""

from __future__ import annotations

import json

import pytest

from fireside.api.structured import close_objects
from fireside.engine.types import GrammarSpec

from .helpers import MODEL, assert_error


def post(client, **fields):
    return client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", **fields})


PERSON = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
CLOSED_PERSON = {**PERSON, "additionalProperties": False}


@pytest.mark.parametrize(
    ("response_format", "schema"),
    [
        ({"type": "json_object"}, {"type": "object"}),
        ({"type": "json_object", "schema": PERSON}, CLOSED_PERSON),
        ({"type": "json_object", "schema": json.dumps(PERSON)}, CLOSED_PERSON),
        ({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}, CLOSED_PERSON),
        (
            {"type": "json_schema", "json_schema": {"name": "p", "schema": json.dumps(PERSON)}},
            CLOSED_PERSON,
        ),
        # The SDK's flat ResponseFormat: `json_schema` may be the schema itself, or a
        # string of either; `schema` may stand beside type json_schema; other keys null.
        ({"type": "json_schema", "json_schema": PERSON}, CLOSED_PERSON),
        ({"type": "json_schema", "json_schema": json.dumps(PERSON)}, CLOSED_PERSON),
        (
            {"type": "json_schema", "json_schema": json.dumps({"name": "p", "schema": PERSON})},
            CLOSED_PERSON,
        ),
        ({"type": "json_schema", "json_schema": {"name": "p"}}, {"type": "object"}),
        ({"type": "json_schema", "schema": PERSON}, CLOSED_PERSON),
        ({"type": "json_schema", "schema": json.dumps(PERSON), "json_schema": None}, CLOSED_PERSON),
        ({"type": "json_object", "schema": None, "grammar": None}, {"type": "object"}),
    ],
)
def test_json_formats_reach_the_engine_as_closed_schemas(client, engine, response_format, schema):
    response = post(client, response_format=response_format)
    assert response.status_code == 200, response.text
    (spec,) = engine.grammar_specs
    assert spec.kind == "json_schema" and json.loads(spec.source) == schema
    assert engine.requests[0].params.grammar == f"json_schema:{spec.source}"


def test_grammar_is_gbnf(client, engine):
    grammar = 'root ::= "yes" | "no"'
    assert post(client, response_format={"type": "grammar", "grammar": grammar}).status_code == 200
    assert engine.grammar_specs == [GrammarSpec("gbnf", grammar)]
    assert engine.requests[0].params.grammar == f"gbnf:{grammar}"


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "text"},
        None,
        {"type": "text", "schema": None, "json_schema": None, "grammar": None},
    ],
)
def test_text_is_unconstrained(client, engine, response_format):
    assert post(client, response_format=response_format).status_code == 200
    assert engine.grammar_specs == [] and engine.requests[0].params.grammar is None


def test_every_prompt_and_sample_gets_the_grammar(client, engine):
    response = post(client, prompt=["a", "b"], n=2, response_format={"type": "json_object"})
    assert response.status_code == 200
    assert len(engine.grammar_specs) == 1  # compiled once per request
    assert [r.params.grammar for r in engine.requests] == ['json_schema:{"type": "object"}'] * 2


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "xml"},
        {},
        {"type": "json_object", "schema": "{not json"},
        {"type": "json_object", "schema": [1, 2]},
        {"type": "json_object", "extra": 1},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": "nope"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}},
        {"type": "grammar"},
        {"type": "grammar", "grammar": "  "},
        {"type": "grammar", "grammar": 5},
        {"type": "text", "schema": {}},
        {"type": "json_schema", "json_schema": PERSON, "schema": PERSON},
        {"type": "json_schema", "json_schema": None},
        {"type": "json_schema", "json_schema": "[1]"},
        {"type": "json_object", "json_schema": PERSON},
        {"type": "grammar", "grammar": 'root ::= "a"', "schema": PERSON},
        {"type": None},
    ],
    ids=lambda v: json.dumps(v)[:50],
)
def test_malformed_response_format_is_400(client, engine, response_format):
    assert_error(post(client, response_format=response_format), 400, "response_format")
    assert engine.requests == []


def test_wrong_type_is_400(client):
    assert_error(post(client, response_format="json"), 400, "response_format", "invalid_type")


def test_grammar_that_does_not_compile_is_400_and_never_reaches_the_engine(client, engine):
    response = post(client, response_format={"type": "grammar", "grammar": "bad ::="})
    error = assert_error(response, 400, "response_format", "invalid_grammar")
    assert "bad grammar" in error["message"]
    assert engine.requests == []
    assert post(client).status_code == 200  # still serving


def test_close_objects_walks_nested_schemas_and_respects_explicit_choices():
    schema = {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "object", "properties": {"k": {}}}},
            "meta": {"type": "object", "properties": {"a": {}}, "additionalProperties": True},
            "any": {"anyOf": [{"type": "object", "properties": {"x": {}}}, {"type": "null"}]},
        },
        "$defs": {"d": {"type": "object", "properties": {"y": {}}}},
    }
    closed = close_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["tags"]["items"]["additionalProperties"] is False
    assert closed["properties"]["meta"]["additionalProperties"] is True
    assert closed["properties"]["any"]["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]["any"]["anyOf"][1]
    assert closed["$defs"]["d"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the input is left alone
