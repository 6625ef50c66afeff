"""The fields the fireworks-ai SDK documents beyond the source document (issue 14):
each is accepted with its documented types, refused otherwise, and reaches the
engine request as docs/api.md says."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from fireside.api.app import ISOLATION_HEADER
from fireside.engine.types import EngineRequest

from .helpers import MODEL, assert_error, complete

BASE = {"model": MODEL, "prompt": "hello world", "max_tokens": 8}
KEY_A, KEY_B = "sk-tenant-a", "sk-tenant-b"


def engine_request(client, engine, **fields: Any) -> EngineRequest:
    response = client.post("/v1/completions", json={**BASE, **fields})
    assert response.status_code == 200, response.text
    return engine.requests[-1]


# --- accepted, with their documented types

VALID: list[dict[str, Any]] = [
    {"mirostat_target": 3.0},
    {"mirostat_target": 0, "mirostat_lr": 0},
    {"mirostat_target": 5, "mirostat_lr": 0.5},
    {"mirostat_lr": 0.2},  # alone: nothing to steer, no effect
    {"prompt_cache_key": "session-1"},
    {"prompt_cache_isolation_key": "tenant-x"},
    {"prompt_cache_isolation_key": ""},
    {"metadata": {"trace": "abc", "team": ""}},
    {"metadata": {}},
    {"service_tier": "auto"},
    {"service_tier": "default"},
    {"service_tier": "flex"},
    {"service_tier": "priority"},
    {"speculation": "hello there"},
    {"speculation": [5, 6, 7]},
    {"speculation": []},
    {"speculation": ""},
    {"prediction": "hello there"},
    {"prediction": {"type": "content", "content": "hello"}},
    {"prediction": {"content": "hello"}},  # `type` is optional in the SDK's shape
    {"prediction": {"type": "content", "content": [{"type": "text", "text": "a"}]}},
    {"prediction": {"type": "content", "content": []}},
    *({"reasoning_effort": effort} for effort in ("low", "medium", "high", "none")),
    {"reasoning_effort": True},
    {"reasoning_effort": False},
    {"reasoning_effort": 1},
    {"reasoning_effort": 4096},
    {"reasoning_history": "disabled"},
    {"reasoning_history": "interleaved"},
    {"reasoning_history": "preserved"},
    {"thinking": {"type": "enabled"}},
    {"thinking": {"type": "enabled", "budget_tokens": 1024}},
    {"thinking": {"type": "enabled", "budget_tokens": None}},
    {"thinking": {"type": "disabled"}},
    {"thinking": None, "reasoning_effort": "low"},
    {"speculation": None, "prediction": "x"},
    {"user": "u-1", "metadata": {"k": "v"}, "prompt_cache_key": "s", "service_tier": None},
]


@pytest.mark.parametrize("fields", VALID, ids=lambda v: repr(v)[:60])
def test_sdk_fields_are_accepted(client, engine, fields):
    engine_request(client, engine, **fields)


INVALID: list[tuple[dict[str, Any], str, str]] = [
    ({"mirostat_target": -1}, "mirostat_target", "invalid_value"),
    ({"mirostat_target": "5"}, "mirostat_target", "invalid_type"),
    ({"mirostat_lr": -0.1}, "mirostat_lr", "invalid_value"),
    ({"mirostat_lr": True}, "mirostat_lr", "invalid_type"),
    ({"prompt_cache_key": 5}, "prompt_cache_key", "invalid_type"),
    ({"prompt_cache_isolation_key": ["a"]}, "prompt_cache_isolation_key", "invalid_type"),
    ({"metadata": {"a": 1}}, "metadata", "invalid_type"),
    ({"metadata": ["a"]}, "metadata", "invalid_type"),
    ({"metadata": "a=b"}, "metadata", "invalid_type"),
    ({"service_tier": "premium"}, "service_tier", "invalid_value"),
    ({"service_tier": 1}, "service_tier", "invalid_value"),
    ({"speculation": 5}, "speculation", "invalid_type"),
    ({"speculation": [1, "a"]}, "speculation", "invalid_type"),
    ({"speculation": [True]}, "speculation", "invalid_type"),
    ({"speculation": [-1]}, "speculation", "invalid_value"),
    ({"speculation": [1000]}, "speculation", "invalid_value"),  # the fake's vocab is 1000
    ({"prediction": 5}, "prediction", "invalid_type"),
    ({"prediction": {"type": "content"}}, "prediction", "invalid_type"),
    ({"prediction": {"type": "text", "content": "x"}}, "prediction", "invalid_value"),
    ({"prediction": {"content": "x", "extra": 1}}, "prediction", "invalid_value"),
    ({"prediction": {"content": 5}}, "prediction", "invalid_type"),
    ({"prediction": {"content": ["x"]}}, "prediction", "invalid_type"),
    (
        {"prediction": {"content": [{"type": "image_url", "image_url": {"url": "x"}}]}},
        "prediction",
        "unsupported",
    ),
    ({"prediction": {"content": [{"type": "text", "text": 5}]}}, "prediction", "invalid_value"),
    ({"speculation": "a", "prediction": "a"}, "prediction", "invalid_value"),
    ({"speculation": [], "prediction": "a"}, "prediction", "invalid_value"),
    ({"reasoning_effort": "max"}, "reasoning_effort", "invalid_value"),
    ({"reasoning_effort": 0}, "reasoning_effort", "invalid_value"),
    ({"reasoning_effort": 1.5}, "reasoning_effort", "invalid_type"),
    ({"reasoning_effort": ["low"]}, "reasoning_effort", "invalid_type"),
    ({"reasoning_history": "all"}, "reasoning_history", "invalid_value"),
    ({"thinking": "enabled"}, "thinking", "invalid_type"),
    ({"thinking": {"type": "on"}}, "thinking", "invalid_value"),
    ({"thinking": {}}, "thinking", "invalid_value"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1023}}, "thinking", "invalid_value"),
    ({"thinking": {"type": "enabled", "budget_tokens": "2048"}}, "thinking", "invalid_type"),
    ({"thinking": {"type": "disabled", "budget_tokens": 2048}}, "thinking", "invalid_value"),
    ({"thinking": {"type": "enabled", "extra": 1}}, "thinking", "invalid_value"),
    ({"reasoning_effort": "low", "thinking": {"type": "enabled"}}, "thinking", "invalid_value"),
]


@pytest.mark.parametrize(("fields", "param", "code"), INVALID, ids=lambda v: repr(v)[:60])
def test_sdk_fields_with_wrong_values_are_400(client, engine, fields, param, code):
    assert_error(client.post("/v1/completions", json={**BASE, **fields}), 400, param, code)
    assert engine.requests == []


def test_a_field_no_sdk_documents_is_still_refused(client):
    assert_error(
        client.post("/v1/completions", json={**BASE, "mirostat_tau": 5}),
        400,
        "mirostat_tau",
        "unknown_parameter",
    )


# --- Mirostat


def test_mirostat_reaches_the_sampling_params(client, engine):
    params = engine_request(client, engine, mirostat_target=3.5, mirostat_lr=0.25).params
    assert (params.mirostat_target, params.mirostat_lr) == (3.5, 0.25)
    params = engine_request(client, engine, mirostat_target=2).params
    assert (params.mirostat_target, params.mirostat_lr) == (2, 0.1)  # llama.cpp's eta
    params = engine_request(client, engine, mirostat_lr=0.5).params
    assert params.mirostat_target is None


# --- speculation and prediction


def test_speculation_text_is_tokenized_without_bos(client, engine):
    engine.add_bos = True
    request = engine_request(client, engine, speculation="hello there")
    assert request.speculation == (engine.token_id(b"hello"), engine.token_id(b" there"))
    assert request.prompt_token_ids[0] == 1  # the prompt still gets its BOS


def test_speculation_ids_are_passed_as_given(client, engine):
    assert engine_request(client, engine, speculation=[5, 999, 5]).speculation == (5, 999, 5)


@pytest.mark.parametrize(
    "prediction",
    [
        " a b",
        {"type": "content", "content": " a b"},
        {"content": [{"type": "text", "text": " a"}, {"type": "text", "text": " b"}]},
    ],
)
def test_every_prediction_shape_is_the_same_draft(client, engine, prediction):
    request = engine_request(client, engine, prediction=prediction)
    assert request.speculation == (engine.token_id(b" a"), engine.token_id(b" b"))
    assert engine_request(client, engine, speculation=" a b").speculation == request.speculation


def test_a_draft_is_cut_to_max_tokens_and_goes_to_every_prompt(client, engine):
    complete(client, prompt=["x", "y"], max_tokens=2, speculation=[5, 6, 7, 8])
    assert [r.speculation for r in engine.requests] == [(5, 6), (5, 6)]


def test_no_draft_is_an_empty_speculation(client, engine):
    assert engine_request(client, engine).speculation == ()
    assert engine_request(client, engine, speculation="").speculation == ()


# --- service tiers, cache keys


@pytest.mark.parametrize(
    ("tier", "priority"),
    [(None, False), ("auto", False), ("default", False), ("flex", False), ("priority", True)],
)
def test_only_the_priority_tier_is_priority(client, engine, tier, priority):
    assert engine_request(client, engine, service_tier=tier).priority is priority


def test_prompt_cache_key_then_user_is_the_engine_requests_cache_key(client, engine):
    assert engine_request(client, engine, prompt_cache_key="session-7").cache_key == "key:session-7"
    both = engine_request(client, engine, prompt_cache_key="s", user="u-1")
    assert both.cache_key == "key:s"  # prompt_cache_key wins over user, as the hosted API says
    assert engine_request(client, engine, user="u-1").cache_key == "user:u-1"
    assert engine_request(client, engine).cache_key is None


def post_as(client, key: str | None, headers: dict[str, str] | None = None, **fields: Any):
    all_headers = dict(headers or {})
    if key is not None:
        all_headers["Authorization"] = f"Bearer {key}"
    response = client.post("/v1/completions", json={**BASE, **fields}, headers=all_headers)
    assert response.status_code == 200, response.text


def isolation_keys(engine) -> list[str | None]:
    return [r.cache_isolation_key for r in engine.requests]


def test_isolation_key_comes_from_the_body_else_the_header(make_client, engine):
    client = make_client(service_kwargs={"isolate_cache_per_key": False})
    post_as(client, None)
    post_as(client, None, prompt_cache_isolation_key="body")
    post_as(client, None, {ISOLATION_HEADER: "header"})
    post_as(client, None, {ISOLATION_HEADER: "header"}, prompt_cache_isolation_key="body")
    post_as(client, None, {ISOLATION_HEADER: ""})  # an empty header is no header
    assert isolation_keys(engine) == [None, "body", "header", "body", None]


def test_per_key_isolation_separates_api_keys_without_holding_them(make_client, engine):
    client = make_client(api_keys=[KEY_A, KEY_B], service_kwargs={"isolate_cache_per_key": True})
    post_as(client, KEY_A)
    post_as(client, KEY_A)
    post_as(client, KEY_B)
    post_as(client, KEY_A, prompt_cache_isolation_key="x")
    post_as(client, KEY_B, {ISOLATION_HEADER: "x"})
    a, a_again, b, a_x, b_x = isolation_keys(engine)
    assert a == a_again and a != b
    assert a_x != b_x and a_x.startswith(a) and b_x.startswith(b)
    assert all(KEY_A not in k and KEY_B not in k for k in (a, b, a_x, b_x))


def test_shared_isolation_lets_api_keys_share(make_client, engine):
    client = make_client(api_keys=[KEY_A, KEY_B], service_kwargs={"isolate_cache_per_key": False})
    post_as(client, KEY_A)
    post_as(client, KEY_B)
    post_as(client, KEY_B, prompt_cache_isolation_key="x")
    assert isolation_keys(engine) == [None, None, "x"]


def test_per_key_isolation_on_an_open_server_is_the_explicit_key(make_client, engine):
    client = make_client(service_kwargs={"isolate_cache_per_key": True})
    post_as(client, None)
    post_as(client, None, prompt_cache_isolation_key="x")
    assert isolation_keys(engine) == [None, "x"]


# --- never logged


def test_metadata_values_and_isolation_keys_are_never_logged(client, caplog):
    caplog.set_level(logging.DEBUG, logger="fireside")
    complete(
        client,
        **BASE,
        user="user-in-the-log",
        metadata={"secret-name": "secret-value"},
        prompt_cache_isolation_key="secret-isolation",
        prompt_cache_key="secret-session",
    )
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "user-in-the-log" in text  # the start line's user=, as documented
    assert "secret" not in text


def test_a_refused_metadata_value_is_not_in_the_message(client):
    response = client.post("/v1/completions", json={**BASE, "metadata": {"k": ["secret"]}})
    error = assert_error(response, 400, "metadata", "invalid_type")
    assert "secret" not in error["message"]
