"""Every invalid body is a 400 envelope naming the field; never a 422."""

from __future__ import annotations

from typing import Any

import pytest

from .helpers import MODEL, assert_error

BASE = {"model": MODEL, "prompt": "hello world"}

INVALID: list[tuple[dict[str, Any], str, str | None]] = [
    # (fields replacing BASE's, param, code)
    ({"temperature": 2.5}, "temperature", "invalid_value"),
    ({"temperature": -0.1}, "temperature", "invalid_value"),
    ({"temperature": "1"}, "temperature", "invalid_type"),
    ({"temperature": True}, "temperature", "invalid_type"),
    ({"top_p": 1.5}, "top_p", "invalid_value"),
    ({"top_k": -1}, "top_k", "invalid_value"),
    ({"top_k": 1.5}, "top_k", "invalid_type"),
    ({"top_k": True}, "top_k", "invalid_type"),
    ({"min_p": 1.1}, "min_p", "invalid_value"),
    ({"typical_p": -0.5}, "typical_p", "invalid_value"),
    ({"frequency_penalty": 2.5}, "frequency_penalty", "invalid_value"),
    ({"presence_penalty": -3}, "presence_penalty", "invalid_value"),
    ({"repetition_penalty": 0}, "repetition_penalty", "invalid_value"),
    ({"repetition_penalty": 2.5}, "repetition_penalty", "invalid_value"),
    ({"min_p": -0.1}, "min_p", "invalid_value"),
    ({"typical_p": 1.5}, "typical_p", "invalid_value"),
    ({"frequency_penalty": "1"}, "frequency_penalty", "invalid_type"),
    ({"presence_penalty": 2.1}, "presence_penalty", "invalid_value"),
    ({"repetition_penalty": -1}, "repetition_penalty", "invalid_value"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "invalid_value"),
    ({"logit_bias": {"-1": 1}}, "logit_bias", "invalid_value"),
    ({"logit_bias": {"5": -100.5}}, "logit_bias", "invalid_value"),
    # Out of the vocabulary (the fake's is 1000): known only once the model is.
    ({"logit_bias": {"1000": 1}}, "logit_bias", "invalid_value"),
    ({"logit_bias": {"5": 1, "99999999999999999999": -1}}, "logit_bias", "invalid_value"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "invalid_value"),
    ({"logit_bias": {"5": "x"}}, "logit_bias", "invalid_type"),
    ({"logit_bias": [1]}, "logit_bias", "invalid_type"),
    ({"logprobs": 6}, "logprobs", "invalid_value"),
    ({"logprobs": -1}, "logprobs", "invalid_value"),
    ({"logprobs": "2"}, "logprobs", "invalid_type"),
    ({"logprobs": 1.5}, "logprobs", "invalid_type"),
    ({"logprobs": [1]}, "logprobs", "invalid_type"),
    ({"logprobs": 7, "top_logprobs": 2}, "logprobs", "invalid_value"),  # the first error
    ({"logprobs": 1, "top_logprobs": 6}, "top_logprobs", "invalid_value"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs", "invalid_value"),
    ({"logprobs": True, "top_logprobs": "2"}, "top_logprobs", "invalid_type"),
    ({"logprobs": True, "top_logprobs": True}, "top_logprobs", "invalid_type"),
    # top_logprobs without logprobs asks for alternatives of nothing.
    ({"top_logprobs": 2}, "top_logprobs", "invalid_value"),
    ({"logprobs": None, "top_logprobs": 1}, "top_logprobs", "invalid_value"),
    ({"logprobs": False, "top_logprobs": 0}, "top_logprobs", "invalid_value"),
    ({"echo": "yes"}, "echo", "invalid_type"),
    ({"echo_last": -1}, "echo_last", "invalid_value"),
    ({"echo_last": "2"}, "echo_last", "invalid_type"),
    ({"echo_last": 1.5}, "echo_last", "invalid_type"),
    ({"echo_last": True}, "echo_last", "invalid_type"),
    ({"max_tokens": -1}, "max_tokens", "invalid_value"),
    ({"max_tokens": "16"}, "max_tokens", "invalid_type"),
    ({"max_tokens": 1.5}, "max_tokens", "invalid_type"),
    ({"max_completion_tokens": -1}, "max_completion_tokens", "invalid_value"),
    ({"max_tokens": 4, "max_completion_tokens": 4}, "max_completion_tokens", "invalid_value"),
    ({"n": 0}, "n", "invalid_value"),
    ({"n": 129}, "n", "invalid_value"),
    ({"n": True}, "n", "invalid_type"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
    ({"stop": ""}, "stop", "invalid_value"),
    ({"stop": ["a", ""]}, "stop", "invalid_value"),
    ({"stop": 3}, "stop", "invalid_type"),
    ({"stop": ["a", 1]}, "stop", "invalid_type"),
    ({"seed": "1"}, "seed", "invalid_type"),
    ({"seed": 2**64}, "seed", "invalid_value"),
    ({"context_length_exceeded_behavior": "drop"}, "context_length_exceeded_behavior", None),
    ({"stream": "true"}, "stream", "invalid_type"),
    ({"ignore_eos": 1}, "ignore_eos", "invalid_type"),
    ({"include_stop_str_in_output": "no"}, "include_stop_str_in_output", "invalid_type"),
    ({"response_format": {"type": "xml"}}, "response_format", "invalid_value"),
    ({"response_format": "json"}, "response_format", "invalid_type"),
    ({"return_token_ids": "x"}, "return_token_ids", "invalid_type"),
    ({"raw_output": 1}, "raw_output", "invalid_type"),
    ({"perf_metrics_in_response": "x"}, "perf_metrics_in_response", "invalid_type"),
    ({"prompt_cache_max_len": -1}, "prompt_cache_max_len", "invalid_value"),
    ({"user": 5}, "user", "invalid_type"),
    ({"images": "data:image/png;base64,AAAA"}, "images", "invalid_type"),
    ({"images": ["data:image/png;base64,AAAA"]}, "images", "invalid_value"),
    ({"stream_options": 1, "stream": True}, "stream_options", "invalid_type"),
    ({"stream_options": {"include_usage": 1}, "stream": True}, "stream_options", "invalid_type"),
    ({"stream_options": {"usage": True}, "stream": True}, "stream_options", "invalid_value"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
    ({"suffix": "tail"}, "suffix", "unsupported"),
    ({"best_of": 2}, "best_of", "unsupported"),
    ({"model": 5}, "model", "invalid_type"),
    ({"prompt": ""}, "prompt", "invalid_value"),
    ({"prompt": []}, "prompt", "invalid_value"),
    ({"prompt": ["a", ""]}, "prompt", "invalid_value"),
    ({"prompt": [[1], []]}, "prompt", "invalid_value"),
    ({"prompt": [1, "a"]}, "prompt", "invalid_type"),
    ({"prompt": [1.5]}, "prompt", "invalid_type"),
    ({"prompt": [[1], [True]]}, "prompt", "invalid_type"),
    ({"prompt": 5}, "prompt", "invalid_type"),
    ({"prompt": {"text": "hi"}}, "prompt", "invalid_type"),
    ({"prompt": [1000]}, "prompt", "invalid_value"),  # the fake's vocab is 1000
    ({"prompt": [[5], [-1]]}, "prompt", "invalid_value"),
]


@pytest.mark.parametrize(("fields", "param", "code"), INVALID, ids=lambda v: repr(v)[:60])
def test_invalid_field_is_400_naming_it(client, fields, param, code):
    response = client.post("/v1/completions", json={**BASE, **fields})
    assert_error(response, 400, param, code)


SUPPORTED: list[dict[str, Any]] = [
    {"prompt_cache_max_len": 0},
    {"prompt_cache_max_len": 100},
    {"logprobs": 0},  # 0 still asks for the sampled token's logprob
    {"logprobs": 5},
    {"logprobs": True},
    {"logprobs": 0, "top_logprobs": 5},
    {"logprobs": True, "top_logprobs": 0},
    {"echo_last": 0},
    {"echo_last": 100},  # more than the prompt: the whole prompt
    {"echo_last": 1, "logprobs": 1},
    {"min_p": 0.1},
    {"typical_p": 0.5},
    {"frequency_penalty": 2, "presence_penalty": -2, "repetition_penalty": 2},
    {"logit_bias": {"5": 100, "999": -100}},
    {"return_token_ids": True},
    {"raw_output": True},
    {"perf_metrics_in_response": True},
]


@pytest.mark.parametrize("fields", SUPPORTED, ids=lambda v: repr(v)[:60])
def test_formerly_unsupported_fields_are_accepted(client, engine, fields):
    response = client.post("/v1/completions", json={**BASE, **fields})
    assert response.status_code == 200, response.text
    assert len(engine.requests) == 1


NEUTRAL: list[dict[str, Any]] = [
    {"logprobs": None},
    {"logprobs": False},
    {"top_logprobs": None},
    {"min_p": 0},
    {"typical_p": 1},
    {"frequency_penalty": 0, "presence_penalty": 0.0, "repetition_penalty": 1},
    {"logit_bias": {}},
    {"response_format": {"type": "text"}},
    {"response_format": None},
    {"stream_options": {"include_usage": True}, "stream": True},
    {"stream_options": {"include_obfuscation": False, "include_usage": None}, "stream": True},
    {"stream_options": None},
    {"suffix": None},
    {"best_of": 1},
    {"best_of": None},
    {"user": "someone"},
    {"images": []},
    {"temperature": 0, "top_p": 1, "top_k": 5},  # a JSON int is a fine float
    {"temperature": None, "echo": None, "stream": None},  # null means the default
    {"seed": -1},
]


@pytest.mark.parametrize("fields", NEUTRAL, ids=lambda v: repr(v)[:60])
def test_neutral_values_are_accepted(client, fields):
    response = client.post("/v1/completions", json={**BASE, **fields})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("field", ["model", "prompt"])
def test_required_field_missing(client, field):
    body = {k: v for k, v in BASE.items() if k != field}
    assert_error(client.post("/v1/completions", json=body), 400, field)


def test_unknown_field_is_named_in_message(client):
    response = client.post("/v1/completions", json={**BASE, "frobnicate": 1})
    error = assert_error(response, 400, "frobnicate")
    assert "frobnicate" in error["message"]


@pytest.mark.parametrize(
    "body", [b"{not json", b"", b"[1, 2]", b'"text"', b'{"model": NaN}', b"\xff\xfe"]
)
def test_unparseable_or_non_object_body_is_400(client, body):
    response = client.post(
        "/v1/completions", content=body, headers={"Content-Type": "application/json"}
    )
    assert_error(response, 400, None)


def test_validation_never_answers_422(client):
    # Wrong types everywhere at once: still one 400, for the first field.
    body = {"model": 1, "prompt": 2, "temperature": "x", "n": "y"}
    assert_error(client.post("/v1/completions", json=body), 400, "model")


def test_body_over_limit_is_413(make_client):
    client = make_client(max_body_bytes=100)
    response = client.post("/v1/completions", json={**BASE, "prompt": "word " * 100})
    assert_error(response, 413, None, "request_too_large")
