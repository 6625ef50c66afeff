"""`GET /openapi.json`: a valid OpenAPI 3.1 document that says what the server does.

The request schema is checked against the validator both ways (a body the
schema accepts is answered, one it refuses is 400, each range at and past its
bounds), and real responses of the fake engine against the response schemas.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from typing import Any

import jsonschema
import pytest
import schemathesis

from fireside.api.protocol import CompletionRequest

from .helpers import MODEL, assert_error, complete, stream_chunks

KEY = "sk-test-key"
# Fields with a numeric range; the test below checks each bound of each.
RANGED = {
    "max_tokens",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "echo_last",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "typical_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "seed",
    "n",
    "prompt_cache_max_len",
    "mirostat_target",
    "mirostat_lr",
    "reasoning_effort",
}
# Fields a ranged field needs beside it to be valid.
COMPANIONS: dict[str, dict[str, Any]] = {"top_logprobs": {"logprobs": True}}


@pytest.fixture
def document(client) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


def validator(document: dict[str, Any], name: str, *, closed: bool = False):
    """A validator for one component schema; `closed`: objects allow no undocumented key."""
    components = copy.deepcopy(document["components"])
    if closed:
        _close(components)
    schema = {"$ref": f"#/components/schemas/{name}", "components": components}
    return jsonschema.Draft202012Validator(schema)


def _close(node: Any) -> None:
    if isinstance(node, list):
        for item in node:
            _close(item)
    elif isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            _close(value)


def request_schema(document: dict[str, Any]) -> dict[str, Any]:
    return document["components"]["schemas"]["CompletionRequest"]


def example_body(path: str) -> dict[str, Any]:
    """A valid body for a documented POST path."""
    if path.endswith("/tokenize"):
        return {"prompt": "hi"}
    if path.endswith("/detokenize"):
        return {"tokens": [1, 2]}
    if path.endswith("/chat/completions"):
        return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    return {"model": MODEL, "prompt": "hi", "max_tokens": 1}


# --- the document


def test_document_is_valid_openapi(document):
    assert document["openapi"].startswith("3.1.")
    schemathesis.openapi.from_dict(document).validate()  # the OpenAPI 3.1 meta-schema
    for schema in document["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_document_lists_every_route(client, document):
    def shape(path: str) -> str:
        return re.sub(r"\{[^}]*\}", "{}", path)

    def walk(routes) -> set[tuple[str, str]]:
        found = set()
        for route in routes:
            included = getattr(route, "original_router", None)  # FastAPI >= 0.13x: included lazily
            if included is not None:
                found |= walk(included.routes)
            elif hasattr(route, "methods") and not route.path.startswith("/_test/"):
                found |= {(m.lower(), shape(route.path)) for m in route.methods - {"HEAD"}}
        return found

    routes = walk(client.app.routes)
    documented = {
        (method, shape(path)) for path, item in document["paths"].items() for method in item
    }
    assert documented == routes


def test_every_route_is_a_real_operation(client, document):
    """No documented path is a 404: the routes exist as written."""
    for path, item in document["paths"].items():
        url = path.replace("{model}", MODEL)
        for method in item:
            body = example_body(path) if method == "post" else None
            response = client.request(method.upper(), url, json=body)
            assert response.status_code == 200, (method, path, response.text)


def test_api_routes_are_generated_from_one_description(document):
    for kind in ("completions", "chat/completions", "models", "models/{model}"):
        v1 = document["paths"][f"/v1/{kind}"]
        inference = document["paths"][f"/inference/v1/{kind}"]
        for method, operation in v1.items():
            other = dict(inference[method])
            assert other.pop("operationId") != operation["operationId"]
            assert other == {k: v for k, v in operation.items() if k != "operationId"}


def test_tokenizer_routes_are_one_description_under_three_prefixes(document):
    for kind in ("tokenizer_info", "tokenize", "detokenize"):
        root = document["paths"][f"/{kind}"]
        for prefix in ("/v1", "/inference/v1"):
            for method, operation in document["paths"][f"{prefix}/{kind}"].items():
                other = dict(operation)
                assert other.pop("operationId") != root[method]["operationId"]
                assert other == {k: v for k, v in root[method].items() if k != "operationId"}


def test_security_matches_the_server(make_client, document):
    """Operations declared open answer without a key; the others are 401 without one."""
    client = make_client(api_keys=[KEY])
    assert document["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": document["components"]["securitySchemes"]["bearerAuth"]["description"],
    }
    for path, item in document["paths"].items():
        url = path.replace("{model}", MODEL)
        for method, operation in item.items():
            security = operation.get("security", document["security"])
            body = example_body(path) if method == "post" else None
            response = client.request(method.upper(), url, json=body)
            if security == []:
                assert response.status_code == 200, path
            else:
                assert security == [{"bearerAuth": []}]
                assert_error(response, 401, None, "invalid_api_key")
                assert "401" in operation["responses"]


def test_error_responses_use_the_envelope(document):
    completions = document["paths"]["/v1/completions"]["post"]["responses"]
    assert set(completions) == {"200", "400", "401", "404", "413", "429", "500", "503"}
    for status, response in completions.items():
        if status != "200":
            schema = response["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/Error"}
    assert "Retry-After" in completions["429"]["headers"]
    error = document["components"]["schemas"]["Error"]["properties"]["error"]
    assert error["required"] == ["message", "type", "param", "code"]


# --- the request schema against the validator


def test_request_schema_has_every_field_and_no_other(document):
    schema = request_schema(document)
    assert set(schema["properties"]) == set(CompletionRequest.model_fields)
    assert schema["required"] == ["model", "prompt"]
    assert schema["additionalProperties"] is False
    defaults = {k: v["default"] for k, v in schema["properties"].items() if "default" in v}
    assert defaults["temperature"] == 1 and defaults["n"] == 1 and defaults["max_tokens"] == 16
    assert defaults["context_length_exceeded_behavior"] == "truncate"


def _numeric_branch(prop: dict[str, Any]) -> dict[str, Any] | None:
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") in ("integer", "number") and "const" not in branch:
            return branch
    return None


def _bound_cases() -> list[tuple[str, Any, bool]]:
    """(field, value, accepted) at and past each documented bound."""
    from fireside.api.openapi import completion_request_schema

    cases = []
    for name, prop in completion_request_schema()["properties"].items():
        branch = _numeric_branch(prop)
        if branch is None:
            continue
        step = 1 if branch["type"] == "integer" else 1e-6
        if "minimum" in branch:
            cases += [(name, branch["minimum"], True), (name, branch["minimum"] - step, False)]
        if "exclusiveMinimum" in branch:
            low = branch["exclusiveMinimum"]
            cases += [(name, low + step, True), (name, low, False)]
        if "maximum" in branch:
            cases += [(name, branch["maximum"], True), (name, branch["maximum"] + step, False)]
    return cases


def test_every_ranged_field_is_documented_with_its_range():
    assert {name for name, _, _ in _bound_cases()} == RANGED


@pytest.mark.parametrize(("field", "value", "accepted"), _bound_cases())
def test_documented_ranges_are_the_validated_ones(client, document, field, value, accepted):
    body = {"model": MODEL, "prompt": "hi", **COMPANIONS.get(field, {}), field: value}
    if field not in ("max_tokens", "max_completion_tokens"):
        body["max_tokens"] = 2
    is_valid = validator(document, "CompletionRequest").is_valid(body)
    assert is_valid is accepted
    response = client.post("/v1/completions", json=body)
    if accepted:
        assert response.status_code == 200, response.text
    else:
        assert_error(response, 400, field, "invalid_value")


VALID_BODIES = [
    {"prompt": "hi"},
    {"prompt": ["a", "b"], "n": 2},
    {"prompt": [1, 2, 3]},
    {"prompt": [[1, 2], [3]]},
    {"prompt": "hi", "logprobs": True, "top_logprobs": 5},
    {"prompt": "hi", "logprobs": 0},
    {"prompt": "hi", "logprobs": False},
    {"prompt": "hi", "stop": "x"},
    {"prompt": "hi", "stop": ["a", "b", "c", "d"]},
    {"prompt": "hi", "stop": []},
    {"prompt": "hi", "logit_bias": {"5": 100, "6": -100}},
    {"prompt": "hi", "images": []},
    {"prompt": "hi", "response_format": {"type": "text"}},
    {"prompt": "hi", "response_format": {"type": "json_object"}},
    {"prompt": "hi", "response_format": {"type": "json_object", "schema": {"type": "object"}}},
    {"prompt": "hi", "response_format": {"type": "json_object", "schema": '{"type":"object"}'}},
    {
        "prompt": "hi",
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": True},
        },
    },
    {"prompt": "hi", "response_format": {"type": "grammar", "grammar": 'root ::= "a"'}},
    {"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {"type": "object"}}},
    {"prompt": "hi", "response_format": {"type": "json_schema", "schema": '{"type":"object"}'}},
    {"prompt": "hi", "response_format": {"type": "text", "schema": None, "grammar": None}},
    {"prompt": "hi", "mirostat_target": 4, "mirostat_lr": 0.2, "service_tier": "priority"},
    {"prompt": "hi", "speculation": [1, 2], "prompt_cache_key": "s", "metadata": {"a": "b"}},
    {"prompt": "hi", "prediction": {"type": "content", "content": [{"type": "text", "text": "x"}]}},
    {"prompt": "hi", "prompt_cache_isolation_key": "k", "reasoning_history": "preserved"},
    {"prompt": "hi", "reasoning_effort": "none", "thinking": None},
    {"prompt": "hi", "thinking": {"type": "enabled", "budget_tokens": 2048}},
    {"prompt": "hi", "stream_options": None, "suffix": None, "best_of": 1},
    {"prompt": "hi", "stream": True, "stream_options": {"include_usage": True}},
    {"prompt": "hi", "stream": True, "stream_options": {"continuous_usage_stats": None}},
    {"prompt": "hi", "temperature": 1, "seed": -1, "user": "u", "echo": True},
    {"prompt": "hi", "context_length_exceeded_behavior": "error", "temperature": None},
]

INVALID_BODIES = [
    ({"prompt": "hi", "model": 1}, "model"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [""]}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [1.5]}, "prompt"),
    ({"prompt": [3, -1]}, "prompt"),
    ({"prompt": [True]}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": {"a": 1}}, "prompt"),
    ({"prompt": "hi", "logprobs": 1.5}, "logprobs"),
    ({"prompt": "hi", "logprobs": "1"}, "logprobs"),
    ({"prompt": "hi", "n": True}, "n"),
    ({"prompt": "hi", "n": 1.5}, "n"),
    ({"prompt": "hi", "temperature": "1"}, "temperature"),
    ({"prompt": "hi", "temperature": True}, "temperature"),
    ({"prompt": "hi", "echo": 1}, "echo"),
    ({"prompt": "hi", "stop": ["a"] * 5}, "stop"),
    ({"prompt": "hi", "stop": ""}, "stop"),
    ({"prompt": "hi", "stop": ["a", ""]}, "stop"),
    ({"prompt": "hi", "stop": [1]}, "stop"),
    ({"prompt": "hi", "suffix": "x"}, "suffix"),
    ({"prompt": "hi", "best_of": 2}, "best_of"),
    ({"prompt": "hi", "best_of": True}, "best_of"),
    ({"prompt": "hi", "logit_bias": {"a": 1}}, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"5": "1"}}, "logit_bias"),
    ({"prompt": "hi", "images": ["http://example.com/cat.png"]}, "images"),
    ({"prompt": "hi", "images": "data:image/png;base64,"}, "images"),
    (
        {"prompt": "hi", "context_length_exceeded_behavior": "drop"},
        "context_length_exceeded_behavior",
    ),
    ({"prompt": "hi", "response_format": {"type": "yaml"}}, "response_format"),
    ({"prompt": "hi", "response_format": {"type": "text", "schema": {}}}, "response_format"),
    ({"prompt": "hi", "response_format": {"type": "json_schema"}}, "response_format"),
    ({"prompt": "hi", "response_format": {"type": "grammar", "grammar": " "}}, "response_format"),
    ({"prompt": "hi", "response_format": "json"}, "response_format"),
    ({"prompt": "hi", "stream_options": True}, "stream_options"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "hi", "stream": False, "stream_options": {}}, "stream_options"),
    ({"prompt": "hi", "stream": True, "stream_options": {"usage": True}}, "stream_options"),
    ({"prompt": "hi", "stream": True, "stream_options": {"include_usage": 1}}, "stream_options"),
    ({"prompt": "hi", "user": 5}, "user"),
    (
        {
            "prompt": "hi",
            "response_format": {"type": "json_schema", "schema": {}, "json_schema": {}},
        },
        "response_format",
    ),
    ({"prompt": "hi", "speculation": "a", "prediction": "b"}, "prediction"),
    ({"prompt": "hi", "reasoning_effort": 2, "thinking": {"type": "disabled"}}, "thinking"),
    ({"prompt": "hi", "thinking": {"type": "enabled", "budget_tokens": 10}}, "thinking"),
    ({"prompt": "hi", "prediction": {"content": [{"type": "video_url"}]}}, "prediction"),
    ({"prompt": "hi", "metadata": {"a": 1}}, "metadata"),
    ({"prompt": "hi", "service_tier": "gold"}, "service_tier"),
    ({"prompt": "hi", "speculation": [-1]}, "speculation"),
    ({"prompt": "hi", "frequency_penaltie": 1}, "frequency_penaltie"),
    ({}, "prompt"),
]


@pytest.mark.parametrize("fields", VALID_BODIES)
def test_bodies_the_schema_accepts_are_answered(client, document, fields):
    body = {"model": MODEL, "max_tokens": 2, **fields}
    validator(document, "CompletionRequest").validate(body)
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("fields", "param"), INVALID_BODIES)
def test_bodies_the_schema_refuses_are_400(client, document, fields, param):
    body = {"model": MODEL, **fields}
    assert not validator(document, "CompletionRequest").is_valid(body)
    assert_error(client.post("/v1/completions", json=body), 400, param)


# --- the response schemas against real responses


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"prompt": ["a b", "c"], "n": 2},
        {"logprobs": 2, "echo": True},
        {"logprobs": True, "top_logprobs": 2, "echo": True},
        {"logprobs": 1, "raw_output": True, "return_token_ids": True},
        {"perf_metrics_in_response": True, "max_tokens": 0, "echo": True},
    ],
)
@pytest.mark.parametrize(
    "stream_options",
    [None, {"include_usage": True}, {"include_usage": True, "continuous_usage_stats": True}],
)
def test_responses_match_their_schema(client, document, fields, stream_options):
    body = {"prompt": "hello world", **fields}
    validator(document, "Completion", closed=True).validate(complete(client, **body))
    chunk = validator(document, "CompletionChunk", closed=True)
    chunks = stream_chunks(client, **body, stream_options=stream_options)
    for data in chunks:
        chunk.validate(data)
    assert chunks[-1]["usage"] is not None


def test_perf_headers_match_their_schema(client, document):
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
    headers = document["paths"]["/v1/completions"]["post"]["responses"]["200"]["headers"]
    for name, header in headers.items():
        value = json.loads(response.headers[name])
        jsonschema.validate(value, header["schema"])


def test_stream_error_event_matches_the_error_schema(make_client, engine, document):
    engine.error_at_step = 1
    chunks = stream_chunks(make_client(), prompt="hi")
    validator(document, "Error", closed=True).validate(chunks[-1])


def test_tokenizer_responses_match_their_schema(client, engine, document):
    check = {
        name: validator(document, name, closed=True)
        for name in ("TokenizerInfo", "TokenizeResponse", "DetokenizeResponse")
    }
    check["TokenizerInfo"].validate(client.get("/tokenizer_info").json())
    engine.tokenizer = dataclasses.replace(engine.tokenizer, chat_template=None, bos_token=None)
    check["TokenizerInfo"].validate(client.get("/tokenizer_info").json())
    for body in ({"prompt": "a b"}, {"prompt": "", "return_token_strs": True}):
        validator(document, "TokenizeRequest").validate(body)
        check["TokenizeResponse"].validate(client.post("/tokenize", json=body).json())
    validator(document, "DetokenizeRequest").validate({"tokens": [1, 12]})
    check["DetokenizeResponse"].validate(client.post("/detokenize", json={"tokens": [1]}).json())
    for name, body in (
        ("TokenizeRequest", {"prompt": 5}),
        ("TokenizeRequest", {"prompt": "x", "max_tokens": 1}),
        ("DetokenizeRequest", {"tokens": [-1]}),
        ("DetokenizeRequest", {"tokens": "1"}),
    ):
        assert not validator(document, name).is_valid(body)
        path = "/tokenize" if name == "TokenizeRequest" else "/detokenize"
        validator(document, "Error", closed=True).validate(client.post(path, json=body).json())


def test_other_responses_match_their_schema(client, engine, document):
    check = {name: validator(document, name, closed=True) for name in ("ModelList", "Model")}
    check["ModelList"].validate(client.get("/v1/models").json())
    check["Model"].validate(client.get(f"/v1/models/{MODEL}").json())
    health = validator(document, "Health", closed=True)
    health.validate(client.get("/health").json())
    engine.healthy = False
    health.validate(client.get("/health").json())
    error = validator(document, "Error", closed=True)
    for response in (
        client.get("/v1/models/nope"),
        client.post("/v1/completions", content=b"{"),
        client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"}),  # 503
    ):
        assert response.status_code >= 400
        error.validate(response.json())


def test_every_request_field_is_described(document):
    """Descriptions come from the models' `Field(description=...)`; none is left out."""
    for name in ("CompletionRequest", "TokenizeRequest", "DetokenizeRequest"):
        schema = document["components"]["schemas"][name]
        assert schema.get("description"), name
        for field, prop in schema["properties"].items():
            assert prop.get("description"), (name, field)
