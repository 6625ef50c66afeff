"""Fuzzing the real server from its own `/openapi.json` with schemathesis.

Every operation gets schema-valid ("positive") cases and, where it takes input,
schema-invalid ("negative") ones. Each answer must not be a 5xx (nor a hang:
requests time out), must be a documented status with a documented content
type, headers and body (streams: every event's data), and invalid input must
be rejected. Generation is kept cheap: `max_tokens` and `n` are clamped after
the cases are drawn (valid values stay valid, invalid ones invalid), so the
whole run takes well under a minute on two cores.

The test drives schemathesis' Hypothesis strategies with `@given` itself:
`schemathesis.pytest.from_fixture` (needed to load a schema from the server
fixture) does not run under pytest 9 (it reads `request.node._nodeid`).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, note, settings
from schemathesis import GenerationMode
from schemathesis import checks as st_checks
from schemathesis.core import NotSet

from tests.e2e.conftest import MODEL

MAX_TOKENS = 4  # per choice: generations stay cheap on one thread
MAX_N = 2
REQUEST_TIMEOUT_S = 30  # a request slower than this counts as a hang
POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE

# (method, path, [(mode, document, max examples)]). "served" is the server's own
# document; "focused" narrows its valid space to requests that reach the engine (see
# `focus`). The completions handler is one function behind two paths, so the second
# path gets fewer cases.
OPERATIONS = [
    ("POST", "/v1/completions", [(POSITIVE, "focused", 100), (NEGATIVE, "served", 60)]),
    ("POST", "/inference/v1/completions", [(POSITIVE, "served", 20), (NEGATIVE, "served", 15)]),
    ("GET", "/v1/models/{model}", [(POSITIVE, "served", 15)]),
    ("GET", "/inference/v1/models/{model}", [(POSITIVE, "served", 10)]),
    ("GET", "/v1/models", [(POSITIVE, "served", 2)]),
    ("GET", "/inference/v1/models", [(POSITIVE, "served", 2)]),
    ("GET", "/health", [(POSITIVE, "served", 2)]),
    ("GET", "/metrics", [(POSITIVE, "served", 2)]),
    ("GET", "/openapi.json", [(POSITIVE, "served", 2)]),
    # The tokenizer endpoints: one handler each behind three paths.
    ("POST", "/tokenize", [(POSITIVE, "served", 30), (NEGATIVE, "served", 20)]),
    ("POST", "/detokenize", [(POSITIVE, "focused", 30), (NEGATIVE, "served", 20)]),
    ("GET", "/tokenizer_info", [(POSITIVE, "served", 5)]),
    ("POST", "/v1/tokenize", [(POSITIVE, "served", 5)]),
    ("POST", "/inference/v1/detokenize", [(POSITIVE, "focused", 5)]),
    ("GET", "/v1/tokenizer_info", [(POSITIVE, "served", 2)]),
]
# Token ids below this are in the vocabulary of any real model.
SMALL_VOCAB = 1000
CHECKS = [
    st_checks.not_a_server_error,
    st_checks.status_code_conformance,
    st_checks.content_type_conformance,
    st_checks.response_headers_conformance,
    st_checks.response_schema_conformance,
    st_checks.negative_data_rejection,
]

_totals: Counter[str] = Counter()


@pytest.fixture(scope="module")
def document(server_url) -> dict[str, Any]:
    response = httpx.get(f"{server_url}/openapi.json", timeout=30)
    assert response.status_code == 200
    return response.json()


def aim_at_model(document: dict[str, Any]) -> dict[str, Any]:
    """A copy whose valid requests name the served model, so they generate text."""
    aimed = json.loads(json.dumps(document))
    schemas = aimed["components"]["schemas"]
    schemas["CompletionRequest"]["properties"]["model"] = {"const": MODEL}
    for name in ("TokenizeRequest", "DetokenizeRequest"):  # optional there
        schemas[name]["properties"]["model"] = {"anyOf": [{"const": MODEL}, {"type": "null"}]}
    for path in ("/v1/models/{model}", "/inference/v1/models/{model}", "/tokenizer_info"):
        (parameter,) = aimed["paths"][path]["get"]["parameters"]
        parameter["examples"] = {"served": {"value": MODEL}}
    return aimed


def focus(document: dict[str, Any]) -> dict[str, Any]:
    """Valid requests the server refuses only after parsing (token ids past the
    vocabulary, images for a model without vision) are left out: positive cases then
    mostly reach the engine. Only for positive cases: a negative case drawn from this
    (token id 1001) would be valid for the server."""
    focused = json.loads(json.dumps(document))
    properties = focused["components"]["schemas"]["CompletionRequest"]["properties"]
    token_id = {"type": "integer", "minimum": 0, "maximum": SMALL_VOCAB - 1}
    for branch in properties["prompt"]["oneOf"]:
        if branch["type"] == "array" and branch["items"].get("type") == "integer":
            branch["items"] = token_id
        elif branch["type"] == "array" and branch["items"].get("type") == "array":
            branch["items"]["items"] = token_id
    bias = properties["logit_bias"]["anyOf"][0]
    bias["propertyNames"] = {"pattern": "^[0-9]{1,3}$"}
    del properties["images"]
    detokenize = focused["components"]["schemas"]["DetokenizeRequest"]
    detokenize["properties"]["tokens"]["items"] = token_id
    return focused


@pytest.fixture(scope="module")
def apis(server_url, document) -> dict[str, Any]:
    aimed = aim_at_model(document)
    out = {}
    for name, variant in (("served", aimed), ("focused", focus(aimed))):
        schema = schemathesis.openapi.from_dict(variant)
        schema.config.update(base_url=server_url)
        # The test server runs open: a missing key is no error here (tests/api checks auth).
        schema.config.generation.update(with_security_parameters=False)
        out[name] = schema
    return out


def _clamp(body: dict[str, Any], name: str, limit: int, valid_up_to: int | None) -> None:
    value = body.get(name)
    if isinstance(value, int) and not isinstance(value, bool) and value > limit:
        if valid_up_to is None or value <= valid_up_to:
            body[name] = limit


def make_cheap(case: Any) -> None:
    """Small max_tokens and n, without turning a valid body invalid or the reverse."""
    if isinstance(case.body, dict) and case.path.endswith("/completions"):
        if "max_tokens" not in case.body and "max_completion_tokens" not in case.body:
            case.body["max_tokens"] = MAX_TOKENS  # the default, 16, would do too
        _clamp(case.body, "max_tokens", MAX_TOKENS, None)
        _clamp(case.body, "max_completion_tokens", MAX_TOKENS, None)
        _clamp(case.body, "n", MAX_N, 128)


def describe(case: Any) -> str:
    """The request, in full (schemathesis' curl command hides fields named like tokens)."""
    text = f"{case.method} {case.formatted_path}"
    if case.query:
        text += f" query={case.query!r}"
    if not isinstance(case.body, NotSet):
        try:
            text += f" body={json.dumps(case.body, ensure_ascii=False)}"
        except (TypeError, ValueError):
            text += f" body={case.body!r}"
    return text


@pytest.mark.parametrize(
    ("method", "path", "mode", "variant", "max_examples"),
    [
        pytest.param(*op, *run, id=f"{op[0]} {op[1]} {run[0].value}")
        for *op, runs in OPERATIONS
        for run in runs
    ],
)
def test_fuzz(apis, method, path, mode, variant, max_examples):
    operation = apis[variant][path][method]
    statuses: Counter[int] = Counter()
    refusals: Counter[str] = Counter()  # param:code of the 4xx answers
    failures: list[str] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=max_examples,
        deadline=None,
        # No shrinking: the server is shared state (a request that kills it makes
        # every later one fail), and a shrink would cost many more requests.
        phases=[Phase.explicit, Phase.generate],
        database=None,  # no .hypothesis/ folder in the repository
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
            HealthCheck.data_too_large,
        ],
    )
    def run(case: Any) -> None:
        make_cheap(case)
        request = describe(case)
        note(f"request: {request}")
        try:
            response = case.call(timeout=REQUEST_TIMEOUT_S)
        except requests.RequestException as exc:  # a hang, or the server is gone
            failures.append(f"{request}\n  -> no answer: {exc!r}")
            raise
        note(f"answer: {response.status_code} {response.text[:500]}")
        try:
            case.validate_response(response, checks=CHECKS)
        except BaseException:  # schemathesis' FailureGroup is a BaseExceptionGroup
            failures.append(f"{request}\n  -> {response.status_code} {response.text[:500]}")
            raise
        statuses[response.status_code] += 1
        if response.status_code >= 400:
            error = response.json()["error"]  # the schema check above made sure it is one
            refusals[f"{error['param']}:{error['code']}"] += 1

    started = time.monotonic()
    try:
        run()
    except BaseException as exc:
        # Hypothesis replays a failure before reporting it, and a server that died
        # answers nothing then: name the request that failed first. (An exception note
        # would do, but pytest does not show the notes of schemathesis' failure groups.)
        if not failures or isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        raise AssertionError(f"first failing request: {failures[0]}") from exc
    _totals["cases"] += sum(statuses.values())
    _totals["seconds"] += time.monotonic() - started
    print(f"\n{method} {path} {mode.value}: {dict(sorted(statuses.items()))}", end=" ")
    print(f"in {time.monotonic() - started:.1f}s; so far {dict(_totals)}")
    if refusals:
        print(f"  refusals: {dict(refusals.most_common())}")


def test_server_still_answers_after_fuzzing(client):
    assert client.get("/health").json() == {"status": "ok"}
    body = {"model": MODEL, "prompt": "The capital of France is", "temperature": 0, "max_tokens": 4}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"].startswith(" Paris")
