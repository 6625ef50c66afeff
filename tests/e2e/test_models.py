"""Several models in one server, each with its own engine, and aliases."""

from __future__ import annotations

import httpx

from fireside.models import default_model_path

ALIAS = "accounts/fireworks/models/small"


def test_two_models_and_an_alias_each_answer(start_server):
    path = str(default_model_path())
    server = start_server(
        "--model",
        f"first={path}",
        "--model",
        f"second={path}",
        "--alias",
        f"{ALIAS}=second",
        "--parallel",
        "4",
        "--ctx-size",
        "2048",
    )
    with httpx.Client(base_url=server.url, timeout=120) as c:
        ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert ids == ["first", "second", ALIAS]
        assert c.get(f"/v1/models/{ALIAS}").json()["id"] == ALIAS
        texts = {}
        for model in ("first", "second", ALIAS):
            r = c.post(
                "/v1/completions",
                json={
                    "model": model,
                    "max_tokens": 6,
                    "prompt": "The capital of France is",
                    "temperature": 0,
                },
            )
            assert r.status_code == 200, r.text
            assert r.json()["model"] == model
            texts[model] = r.json()["choices"][0]["text"]
        assert texts["first"].startswith(" Paris") and texts["second"].startswith(" Paris")
        assert c.post("/v1/completions", json={"model": "third", "prompt": "x"}).status_code == 404
        metrics = c.get("/metrics").text
        assert 'model_name="first"' in metrics and 'model_name="second"' in metrics
        # An alias is not another engine: engine gauges are per model only.
        assert f'fireside:num_requests_running{{model_name="{ALIAS}"}}' not in metrics
        assert 'fireside:num_requests_running{model_name="second"}' in metrics
    assert server.stop() == 0
