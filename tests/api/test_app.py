"""Routes other than the completion body: auth, models, health, metrics, errors."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fireside.api import CompletionService, ModelInfo, create_app
from tests.fakes import service_settings

from .fake_engine import FakeEngine
from .helpers import MODEL, assert_error

KEY = "sk-test-key"
PROTECTED = [
    ("POST", "/v1/completions"),
    ("POST", "/inference/v1/completions"),
    ("GET", "/v1/models"),
    ("GET", "/inference/v1/models"),
    ("GET", f"/v1/models/{MODEL}"),
    ("GET", "/metrics"),
]
COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 1}


def call(client, method, path, headers=None):
    if method == "POST":
        return client.post(path, json=COMPLETION, headers=headers)
    return client.get(path, headers=headers)


# --- auth


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_open_server_needs_no_key(client, method, path):
    assert call(client, method, path).status_code == 200


@pytest.mark.parametrize(("method", "path"), PROTECTED)
@pytest.mark.parametrize(
    "headers",
    [None, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic x"}],
)
def test_missing_or_wrong_key_is_401(make_client, method, path, headers):
    client = make_client(api_keys=[KEY, "sk-other"])
    error = assert_error(call(client, method, path, headers), 401, None, "invalid_api_key")
    assert error["type"] == "authentication_error"
    assert "wrong" not in error["message"]


@pytest.mark.parametrize("key", [KEY, "sk-other"])
def test_any_configured_key_works(make_client, key):
    client = make_client(api_keys=[KEY, "sk-other"])
    for method, path in PROTECTED:
        response = call(client, method, path, {"Authorization": f"Bearer {key}"})
        assert response.status_code == 200, path


def test_health_needs_no_key(make_client):
    client = make_client(api_keys=[KEY])
    assert client.get("/health").json() == {"status": "ok"}


# --- 404, 405, 500, 503


def test_unknown_model_is_404(client):
    response = client.post("/v1/completions", json={**COMPLETION, "model": "nope"})
    error = assert_error(response, 404, "model", "model_not_found")
    assert error["type"] == "not_found_error"


def test_unknown_path_is_404_envelope(client):
    assert_error(client.get("/v2/nothing"), 404, None)
    assert_error(client.post("/v1/chat/nothing", json={}), 404, None)


def test_wrong_method_is_405_envelope(client):
    assert_error(client.get("/v1/completions"), 405, None)


def test_unexpected_exception_is_500_without_details(client, engine):
    engine.fail_tokenize = True
    response = client.post("/v1/completions", json=COMPLETION)
    error = assert_error(response, 500, None)
    assert error["type"] == "internal_error"
    assert "secret" not in response.text


def test_engine_failure_is_500(make_client):
    client = make_client(engines={MODEL: FakeEngine(error_at_step=0)})
    error = assert_error(client.post("/v1/completions", json=COMPLETION), 500, None)
    assert "boom" not in error["message"]


def test_unhealthy_engine(client, engine):
    engine.healthy = False
    assert_error(client.post("/v1/completions", json=COMPLETION), 503, None)
    response = client.get("/health")
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable"}


# --- models


def test_models_listing(client):
    for path in ("/v1/models", "/inference/v1/models"):
        body = client.get(path).json()
        assert body["object"] == "list"
        (model,) = body["data"]
        assert list(model) == [
            "id",
            "object",
            "created",
            "owned_by",
            "context_length",
            "capabilities",
        ]
        assert model["capabilities"] == ["completion"]
        assert model["id"] == MODEL
        assert model["object"] == "model"
        assert model["owned_by"] == "fireside"
        assert model["context_length"] == 64
        assert isinstance(model["created"], int)


def test_model_ids_with_a_slash():
    name = "accounts/fireside/models/smollm2"
    service = CompletionService({name: FakeEngine()}, **service_settings())
    models = [ModelInfo(name, 64, 1_700_000_000)]
    from fastapi.testclient import TestClient

    client = TestClient(create_app(service, models, []))
    for path in (f"/v1/models/{name}", "/v1/models/accounts%2Ffireside%2Fmodels%2Fsmollm2"):
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.json()["id"] == name
        assert response.json()["created"] == 1_700_000_000
    assert client.get(f"/inference/v1/models/{name}").status_code == 200
    assert_error(client.get("/v1/models/accounts/other"), 404, "model", "model_not_found")
    completion = client.post("/v1/completions", json={"model": name, "prompt": "x"})
    assert completion.status_code == 200


def test_several_models_route_by_name(make_client):
    small, large = FakeEngine(), FakeEngine(context_length=4096)
    client = make_client(engines={"small": small, "large": large})
    client.post("/v1/completions", json={"model": "large", "prompt": "x"})
    assert len(large.requests) == 1 and small.requests == []
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["small", "large"]


# --- metrics


def metric_samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_text(client):
    client.post("/v1/completions", json={**COMPLETION, "prompt": "a b c", "n": 2})
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "fireside:num_requests_running" in response.text
    samples = metric_samples(response.text)
    model = ("model_name", MODEL)
    expected = {
        "fireside:num_requests_running": 2,
        "fireside:num_requests_waiting": 1,
        "fireside:kv_cache_usage_perc": 0.25,
        "fireside:prefill_tokens_computed_total": 7,
        "fireside:generation_tokens_total": 11,
        "fireside:prompt_tokens_total": 3,
        "fireside:prefix_cache_queries_total": 40,
        "fireside:prefix_cache_hits_total": 30,
        "fireside:grammar_masks_total": 5,
        "fireside:grammar_mask_seconds_total": 0.5,
        "fireside:spec_decode_num_draft_tokens_total": 9,
        "fireside:spec_decode_num_accepted_tokens_total": 4,
    }
    for name, value in expected.items():
        assert samples[(name, frozenset([model]))] == value, name
    success = ("fireside:request_success_total", frozenset([model, ("finished_reason", "length")]))
    assert samples[success] == 2


def test_each_app_has_its_own_registry(make_client):
    first, second = make_client(), make_client()
    first.post("/v1/completions", json=COMPLETION)
    assert "fireside:prompt_tokens_total" in second.get("/metrics").text
    samples = metric_samples(second.get("/metrics").text)
    assert samples[("fireside:prompt_tokens_total", frozenset([("model_name", MODEL)]))] == 0
    assert not any(name == "fireside:request_success_total" for name, _ in samples)
