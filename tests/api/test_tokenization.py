"""`GET /tokenizer_info`, `POST /tokenize`, `POST /detokenize` in vLLM's shapes, on the
fake engine (whose tokens are words, and whose ids below 10 play control tokens)."""

from __future__ import annotations

import dataclasses

import pytest

from .fake_engine import FakeEngine
from .helpers import MODEL, assert_error, complete

PREFIXES = ["", "/inference", "/v1", "/inference/v1"]
KEY = "sk-test-key"


@pytest.mark.parametrize("prefix", PREFIXES)
def test_tokenize_gives_the_ids_a_completion_uses(client, prefix):
    response = client.post(f"{prefix}/tokenize", json={"prompt": "hello big world"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert list(body) == ["count", "max_model_len", "tokens", "token_strs"]
    used = complete(client, prompt="hello big world", max_tokens=1, return_token_ids=True)
    assert body["tokens"] == used["choices"][0]["prompt_token_ids"]
    assert body["count"] == 3 and body["max_model_len"] == 64
    assert body["token_strs"] is None


def test_add_special_tokens_adds_bos_only_when_asked(client, engine):
    engine.add_bos = True
    with_bos = client.post("/tokenize", json={"prompt": "a b"}).json()["tokens"]
    without = client.post("/tokenize", json={"prompt": "a b", "add_special_tokens": False})
    assert with_bos[0] == 1 and without.json()["tokens"] == with_bos[1:]
    # null means "not given", as in completions.
    null = client.post("/tokenize", json={"prompt": "a b", "add_special_tokens": None})
    assert null.json()["tokens"] == with_bos


def test_return_token_strs(client):
    body = client.post("/tokenize", json={"prompt": "a bc", "return_token_strs": True}).json()
    assert body["token_strs"] == ["a", " bc"]
    assert client.post("/tokenize", json={"prompt": ""}).json()["tokens"] == []


@pytest.mark.parametrize("prefix", PREFIXES)
def test_detokenize_round_trips_and_writes_special_tokens(client, prefix):
    tokens = client.post("/tokenize", json={"prompt": "a b c"}).json()["tokens"]
    response = client.post(f"{prefix}/detokenize", json={"tokens": tokens})
    assert response.status_code == 200, response.text
    assert response.json() == {"prompt": "a b c"}
    special = client.post(f"{prefix}/detokenize", json={"tokens": [1, *tokens, 2]}).json()
    assert special == {"prompt": "<|c1|>a b c<|c2|>"}
    assert client.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize("prefix", PREFIXES)
def test_tokenizer_info(client, prefix):
    response = client.get(f"{prefix}/tokenizer_info")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "tokenizer_class": "LlamaCppTokenizer",
        "bos_token": "<|c1|>",
        "eos_token": "<|c2|>",
        "pad_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 64,
        "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}",
    }


def test_tokenizer_info_leaves_out_a_missing_chat_template(client, engine):
    engine.tokenizer = dataclasses.replace(engine.tokenizer, chat_template=None)
    body = client.get("/tokenizer_info").json()
    assert "chat_template" not in body
    assert "eos_token" in body  # lm-eval's auto-detection needs the key


def test_lm_eval_remote_tokenizer_detection(client):
    """What lm-eval's `check_remote_tokenizer_support` and `RemoteTokenizer` send."""
    info = client.get("/tokenizer_info")
    assert info.status_code == 200 and "eos_token" in info.json()
    probe = client.post("/tokenize", json={"prompt": "test", "add_special_tokens": False})
    assert isinstance(probe.json().get("tokens"), list)
    decoded = client.post("/detokenize", json={"tokens": probe.json()["tokens"]})
    assert decoded.json()["prompt"] == "test"


@pytest.mark.parametrize(
    ("path", "body", "param", "code"),
    [
        ("/tokenize", {}, "prompt", "missing_required_parameter"),
        ("/tokenize", {"prompt": 5}, "prompt", "invalid_type"),
        ("/tokenize", {"prompt": "x", "add_special_tokens": "no"}, "add_special_tokens", None),
        ("/tokenize", {"prompt": "x", "messages": []}, "messages", "unknown_parameter"),
        ("/tokenize", {"prompt": "x", "model": "nope"}, "model", "model_not_found"),
        ("/detokenize", {}, "tokens", "missing_required_parameter"),
        ("/detokenize", {"tokens": [1.5]}, "tokens", "invalid_type"),
        ("/detokenize", {"tokens": [True]}, "tokens", "invalid_type"),
        ("/detokenize", {"tokens": [-1]}, "tokens", "invalid_value"),
        ("/detokenize", {"tokens": [5, 1000]}, "tokens", "invalid_value"),  # vocab is 1000
        ("/detokenize", {"tokens": [1], "model": "nope"}, "model", "model_not_found"),
    ],
)
def test_bad_bodies_are_errors_in_the_envelope(client, path, body, param, code):
    status = 404 if code == "model_not_found" else 400
    assert_error(client.post(path, json=body), status, param, code)


@pytest.mark.parametrize("path", ["/tokenize", "/v1/detokenize"])
def test_unparseable_bodies(client, path):
    assert_error(client.post(path, content=b"{"), 400, None, "invalid_json")
    assert_error(client.post(path, json=[1]), 400, None, "invalid_type")


def test_model_is_needed_only_when_several_are_served(make_client):
    one, other = FakeEngine(), FakeEngine(context_length=128)
    client = make_client(engines={MODEL: one, "other": other})
    assert_error(
        client.post("/tokenize", json={"prompt": "x"}), 400, "model", "missing_required_parameter"
    )
    assert_error(client.get("/tokenizer_info"), 400, "model", "missing_required_parameter")
    chosen = client.post("/tokenize", json={"prompt": "x", "model": "other"}).json()
    assert chosen["max_model_len"] == 128
    info = client.get("/tokenizer_info", params={"model": "other"}).json()
    assert info["model_max_length"] == 128
    assert_error(client.get("/tokenizer_info?model=nope"), 404, "model", "model_not_found")
    # An alias is the same model: one engine under two ids needs no `model`.
    aliased = make_client(engines={MODEL: one, "alias": one})
    assert aliased.post("/tokenize", json={"prompt": "x"}).status_code == 200


@pytest.mark.parametrize("prefix", PREFIXES)
def test_same_auth_as_completions(make_client, prefix):
    client = make_client(api_keys=[KEY])
    for method, path, body in (
        ("GET", "/tokenizer_info", None),
        ("POST", "/tokenize", {"prompt": "x"}),
        ("POST", "/detokenize", {"tokens": [1]}),
    ):
        url = prefix + path
        assert_error(client.request(method, url, json=body), 401, None, "invalid_api_key")
        wrong = client.request(method, url, json=body, headers={"Authorization": "Bearer nope"})
        assert_error(wrong, 401, None, "invalid_api_key")
        good = client.request(method, url, json=body, headers={"Authorization": f"Bearer {KEY}"})
        assert good.status_code == 200, good.text


def test_body_size_limit(make_client):
    client = make_client(max_body_bytes=100)
    response = client.post("/tokenize", json={"prompt": "x" * 200})
    assert_error(response, 413, None, "request_too_large")
