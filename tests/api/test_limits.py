"""Backpressure and limits: a full queue is 429 with Retry-After, oversized asks are 400,
and a request past the time limit ends with a clear error (stream or not)."""

from __future__ import annotations

import json

from tests.fakes import service_settings

from .fake_engine import FakeEngine
from .helpers import MODEL, assert_error


def post(client, **fields):
    return client.post("/v1/completions", json={"model": MODEL, "prompt": "a b", **fields})


def test_a_full_queue_is_429_with_retry_after(make_client, engine):
    # The fake engine always reports one request waiting.
    client = make_client(service_kwargs={"max_waiting": 2})
    assert post(client).status_code == 200  # 1 waiting + 1 fits in 2
    r = post(client, prompt=["x", "y"])  # 1 + 2 does not
    error = assert_error(r, 429, None, "queue_full")
    assert int(r.headers["Retry-After"]) >= 1
    assert "busy" in error["message"]
    assert len(engine.requests) == 1  # the refused request never reached the engine
    r = post(client, prompt=["x", "y"], stream=True)
    assert r.status_code == 429  # a stream is refused before it starts


def test_prompt_count_and_n_are_bounded(make_client):
    client = make_client(service_kwargs={"max_prompts": 4})
    assert_error(post(client, prompt=["a"] * 5), 400, "prompt")
    assert_error(post(client, prompt=["a", "b"], n=3), 400, "n")
    assert post(client, prompt=["a", "b"], n=2).status_code == 200


def test_total_requested_tokens_are_bounded(make_client):
    client = make_client(service_kwargs={"max_total_tokens": 100})
    assert_error(post(client, prompt=["a", "b"], n=2, max_tokens=30), 400, "max_tokens")
    assert post(client, prompt=["a", "b"], n=2, max_tokens=25).status_code == 200


def test_a_request_past_the_time_limit_ends_with_an_error():
    engine = FakeEngine(hang=True)
    from fastapi.testclient import TestClient

    from fireside.api import CompletionService, create_app

    service = CompletionService({MODEL: engine}, **service_settings(request_timeout_s=0.3))
    client = TestClient(create_app(service), raise_server_exceptions=False)
    assert_error(post(client), 408, None, "request_timeout")
    assert engine.closed_early  # the engine request was aborted
    r = post(client, stream=True)
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[-2])["error"]["code"] == "request_timeout"
    assert events[-1] == "[DONE]"
