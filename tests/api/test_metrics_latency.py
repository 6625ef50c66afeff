"""Latency histograms and response counts by status, on the fake engine."""

from __future__ import annotations

from fastapi.testclient import TestClient

from fireside.api import CompletionService, create_app
from fireside.api.status import StatusCounter
from tests.fakes import service_settings

from .fake_engine import FakeEngine
from .helpers import MODEL


def test_latency_histograms_and_status_counts():
    service = CompletionService({MODEL: FakeEngine()}, **service_settings())
    app = create_app(service)
    client = TestClient(StatusCounter(app, service.counters.responses))
    assert (
        client.post(
            "/v1/completions", json={"model": MODEL, "prompt": "a b", "max_tokens": 3}
        ).status_code
        == 200
    )
    client.post("/v1/completions", json={"model": MODEL, "prompt": "a", "stream": True})
    assert client.post("/v1/completions", json={"model": "nope", "prompt": "a"}).status_code == 404
    text = client.get("/metrics").text
    assert f'fireside:time_to_first_token_seconds_count{{model_name="{MODEL}"}} 2.0' in text
    assert f'fireside:e2e_request_latency_seconds_count{{model_name="{MODEL}"}} 2.0' in text
    # three outputs per request in the fake engine: two gaps each
    assert f'fireside:inter_token_latency_seconds_count{{model_name="{MODEL}"}} 4.0' in text
    assert 'fireside:http_requests_total{status="200"} 2.0' in text
    assert 'fireside:http_requests_total{status="404"} 1.0' in text
