"""Non-streamed completions over HTTP: response shape, choices, usage, context rules."""

from __future__ import annotations

import re

import pytest

from fireside.engine.types import SamplingParams

from .fake_engine import FakeEngine
from .helpers import MODEL, assert_error


def post(client, **fields):
    return client.post("/v1/completions", json={"model": MODEL, **fields})


def test_response_shape_and_key_order(client):
    response = post(client, prompt="hello world", max_tokens=2)
    assert response.status_code == 200
    body = response.json()
    assert list(body) == ["id", "object", "created", "model", "choices", "usage"]
    assert re.fullmatch(r"cmpl-[0-9a-f]{32}", body["id"])
    assert body["object"] == "text_completion"
    assert isinstance(body["created"], int)
    assert body["model"] == MODEL
    assert body["choices"] == [
        {"index": 0, "text": " s0t0 s0t1", "finish_reason": "length", "logprobs": None}
    ]
    assert list(body["choices"][0]) == ["index", "text", "finish_reason", "logprobs"]
    assert body["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 2,
        "total_tokens": 4,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_inference_prefix_is_the_same_handler(client):
    response = client.post("/inference/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert response.status_code == 200
    assert response.json()["object"] == "text_completion"


def test_finish_reason_stop_when_the_engine_stops(client):
    body = post(client, prompt="hi", max_tokens=10).json()  # the fake stops after 3 tokens
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 3


def test_choice_indices_are_prompt_major(client, engine):
    body = post(client, prompt=["a", "b b", "c c c"], n=2, max_tokens=1).json()
    choices = body["choices"]
    assert [c["index"] for c in choices] == list(range(6))
    # index = prompt_index * n + j; the fake's text names the sample j.
    assert [c["text"] for c in choices] == [" s0t0", " s1t0"] * 3
    ids = [r.request_id for r in engine.requests]
    assert sorted(ids) == [f"{body['id']}-{i}" for i in range(3)]
    assert sorted(len(r.prompt_token_ids) for r in engine.requests) == [1, 2, 3]
    # Each prompt counted once whatever n is; every choice's tokens counted.
    assert body["usage"]["prompt_tokens"] == 6
    assert body["usage"]["completion_tokens"] == 6


def test_token_prompts(client, engine):
    body = post(client, prompt=[[5, 6], [7]], max_tokens=1).json()
    assert len(body["choices"]) == 2
    assert sorted(r.prompt_token_ids for r in engine.requests) == [(5, 6), (7,)]
    assert body["usage"]["prompt_tokens"] == 3
    post(client, prompt=[8, 9, 10], max_tokens=1)
    assert engine.requests[-1].prompt_token_ids == (8, 9, 10)


def test_sampling_params_reach_the_engine(client, engine):
    post(
        client,
        prompt="x",
        max_tokens=5,
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        seed=7,
        n=3,
        stop=["\n", "END"],
        include_stop_str_in_output=False,
        ignore_eos=True,
        min_p=0.05,
        typical_p=0.9,
        frequency_penalty=0.5,
        presence_penalty=-0.25,
        repetition_penalty=1.1,
        logit_bias={"999": -100, "7": 2.5, "0": 1},
        logprobs=3,
    )
    assert engine.requests[0].params == SamplingParams(
        max_tokens=5,
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        seed=7,
        n=3,
        stop=("\n", "END"),
        include_stop_str_in_output=False,
        ignore_eos=True,
        min_p=0.05,
        typical_p=0.9,
        frequency_penalty=0.5,
        presence_penalty=-0.25,
        repetition_penalty=1.1,
        logit_bias=((0, 1.0), (7, 2.5), (999, -100.0)),  # ids, in order
        logprobs=3,
    )
    post(client, prompt="x", stop="##")
    assert engine.requests[-1].params.stop == ("##",)


def test_logit_bias_outside_the_vocabulary_submits_nothing(client, engine):
    response = post(client, prompt="x", logit_bias={"5": 1, "1000": -1})
    error = assert_error(response, 400, "logit_bias", "invalid_value")
    assert "1000" in error["message"]
    assert engine.requests == []


def test_defaults_come_from_sampling_params(client, engine):
    post(client, prompt="x")
    assert engine.requests[0].params == SamplingParams()


def test_negative_seed_is_mapped_to_a_non_negative_one(client, engine):
    post(client, prompt="x", seed=-1)
    assert engine.requests[0].params.seed == 2**64 - 1


def test_default_max_tokens_is_configurable(make_client, engine):
    client = make_client(default_max_tokens=2)
    post(client, prompt="x")
    assert engine.requests[0].params.max_tokens == 2


def test_max_completion_tokens_is_an_alias(client, engine):
    post(client, prompt="x", max_completion_tokens=3)
    assert engine.requests[0].params.max_tokens == 3


def test_echo_string_prompt_keeps_the_original_text(client):
    body = post(client, prompt="  spaced   prompt", echo=True, max_tokens=1).json()
    assert body["choices"][0]["text"] == "  spaced   prompt s0t0"


def test_echo_token_prompt_is_detokenized(client, engine):
    ids = engine.tokenize("alpha beta")
    body = post(client, prompt=ids, echo=True, max_tokens=1).json()
    assert body["choices"][0]["text"] == "alpha beta s0t0"


def test_max_tokens_zero_with_echo_returns_the_prompt_alone(client, engine):
    body = post(client, prompt=["one two", "three"], echo=True, max_tokens=0, n=2).json()
    assert [c["text"] for c in body["choices"]] == ["one two", "one two", "three", "three"]
    assert {c["finish_reason"] for c in body["choices"]} == {"length"}
    assert body["usage"]["completion_tokens"] == 0
    assert body["usage"]["prompt_tokens"] == 3
    assert engine.requests == []


def test_max_tokens_zero_without_echo_is_empty(client):
    body = post(client, prompt="x", max_tokens=0).json()
    assert body["choices"] == [
        {"index": 0, "text": "", "finish_reason": "length", "logprobs": None}
    ]


def test_cached_tokens_are_reported(make_client):
    client = make_client(engines={MODEL: FakeEngine(cached_tokens=2)})
    body = post(client, prompt=["a b c", "d e f"], max_tokens=1).json()
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 4}


def test_long_prompt_is_tokenized(make_client):
    client = make_client(engines={MODEL: FakeEngine(context_length=4096)})
    prompt = "word " * 3000  # past the threshold for tokenizing in a worker thread
    body = post(client, prompt=prompt, max_tokens=1).json()
    assert body["usage"]["prompt_tokens"] == 3000


# --- context length (the fake's context is 64 tokens)


def words(count: int) -> str:
    return " ".join(f"w{i}" for i in range(count))


@pytest.mark.parametrize("behavior", ["truncate", "error"])
def test_prompt_longer_than_context_is_400(client, behavior):
    response = post(
        client, prompt=words(65), max_tokens=1, context_length_exceeded_behavior=behavior
    )
    assert_error(response, 400, "prompt", "context_length_exceeded")


@pytest.mark.parametrize("behavior", ["truncate", "error"])
def test_prompt_filling_context_is_400(client, behavior):
    response = post(
        client, prompt=words(64), max_tokens=1, context_length_exceeded_behavior=behavior
    )
    assert_error(response, 400, "prompt", "context_length_exceeded")


def test_prompt_filling_context_can_still_be_scored(client):
    response = post(client, prompt=words(64), max_tokens=0, echo=True)
    assert response.status_code == 200
    assert response.json()["choices"][0]["text"] == words(64)


def test_error_mode_rejects_prompt_plus_max_tokens_over_context(client, engine):
    response = post(
        client, prompt=words(60), max_tokens=5, context_length_exceeded_behavior="error"
    )
    assert_error(response, 400, "max_tokens", "context_length_exceeded")
    assert engine.requests == []
    ok = post(client, prompt=words(60), max_tokens=4, context_length_exceeded_behavior="error")
    assert ok.status_code == 200


def test_truncate_mode_lowers_max_tokens_to_fit(client, engine):
    response = post(client, prompt=words(62), max_tokens=50)
    assert response.status_code == 200
    assert engine.requests[0].params.max_tokens == 2
    assert response.json()["choices"][0]["finish_reason"] == "length"


def test_truncate_is_per_prompt(client, engine):
    post(client, prompt=[words(62), words(10)], max_tokens=50)
    by_length = {len(r.prompt_token_ids): r.params.max_tokens for r in engine.requests}
    assert by_length == {62: 2, 10: 50}


def test_nothing_is_submitted_when_a_later_prompt_is_invalid(client, engine):
    response = post(client, prompt=[words(3), words(70)], max_tokens=1)
    assert_error(response, 400, "prompt", "context_length_exceeded")
    assert engine.requests == []


def test_prompt_cache_max_len_reaches_the_engine(client, engine):
    assert post(client, prompt="a b c", prompt_cache_max_len=5).status_code == 200
    assert post(client, prompt="a b c").status_code == 200
    assert [r.params.prompt_cache_max_len for r in engine.requests] == [5, None]


def test_the_server_sets_the_default_for_include_stop_str_in_output(make_client, engine):
    """Issue 11: a deployment for OpenAI-style clients drops stop strings by default;
    a request that says otherwise still wins."""

    def included(client, **fields) -> bool:
        assert post(client, prompt="x", stop="##", **fields).status_code == 200
        return engine.requests[-1].params.include_stop_str_in_output

    openai_style = make_client(service_kwargs={"include_stop_str_in_output": False})
    assert included(openai_style) is False
    assert included(openai_style, include_stop_str_in_output=None) is False  # null: not given
    assert included(openai_style, include_stop_str_in_output=True) is True
    document = make_client()
    assert included(document) is True  # the source document's rule, unless configured
    assert included(document, include_stop_str_in_output=False) is False
