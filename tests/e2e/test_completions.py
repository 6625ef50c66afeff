"""End to end: the real server, the real embedded model, official SDKs and raw HTTP."""

from __future__ import annotations

import json

import httpx
import openai

from tests.e2e.conftest import MODEL


def _complete(client, **body):
    r = client.post("/v1/completions", json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    return r.json()


def _stream_text(client, **body):
    chunks = []
    with client.stream(
        "POST", "/v1/completions", json={"model": MODEL, "stream": True, **body}
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    return [json.loads(c) for c in chunks[:-1]]


def test_greedy_matches_the_known_answer(client):
    out = _complete(client, prompt="The capital of France is", temperature=0, max_tokens=8)
    assert out["object"] == "text_completion"
    assert out["choices"][0]["text"].startswith(" Paris")
    assert out["usage"]["prompt_tokens"] == 5
    assert out["usage"]["completion_tokens"] == 8


def test_stream_equals_non_stream_and_usage_is_last(client):
    body = dict(prompt="Once upon a time", temperature=0, max_tokens=24)
    plain = _complete(client, **body)["choices"][0]["text"]
    events = _stream_text(client, **body)
    assert len({e["id"] for e in events}) == 1
    assert "".join(c["text"] for e in events for c in e["choices"]) == plain
    assert events[-1]["usage"]["completion_tokens"] == 24


def test_token_prompt_equals_string_prompt(client):
    text = _complete(client, prompt="The capital of France is", temperature=0, max_tokens=8)
    ids = _complete(client, prompt=[504, 3575, 282, 4649, 314], temperature=0, max_tokens=8)
    assert ids["choices"][0]["text"] == text["choices"][0]["text"]


def test_prompts_times_n_are_prompt_major(client):
    out = _complete(client, prompt=["a", "b", "c"], n=2, max_tokens=3, seed=1)
    assert [c["index"] for c in out["choices"]] == list(range(6))


def test_seed_reproducible_and_seeds_differ(cold_server_url):
    # On the cold server: where earlier requests left KV cells (the prefix cache keeps
    # some) moves llama.cpp's float sums, and a sample can flip at a near-tie.
    client = httpx.Client(base_url=cold_server_url, timeout=120)
    body = dict(prompt="My favourite colour is", temperature=1.0, max_tokens=16)
    a = _complete(client, seed=42, **body)["choices"][0]["text"]
    b = _complete(client, seed=42, **body)["choices"][0]["text"]
    c = _complete(client, seed=7, **body)["choices"][0]["text"]
    assert a == b
    assert a != c


def test_stop_included_by_default_and_excluded_on_request(client):
    base = dict(prompt="The capital of France is", temperature=0, max_tokens=16)
    inc = _complete(client, stop=["Paris"], **base)["choices"][0]
    assert inc["text"] == " Paris" and inc["finish_reason"] == "stop"
    exc = _complete(client, stop="Paris", include_stop_str_in_output=False, **base)["choices"][0]
    assert exc["text"] == " "


def test_bad_inputs_are_400_with_envelope(client):
    for body in (
        {"model": MODEL, "prompt": "x", "temperature": 3},
        {"model": MODEL, "prompt": ""},
        {"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]},
        {"model": MODEL, "prompt": [99999999]},
        {"model": MODEL, "prompt": "x", "bogus": 1},
    ):
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 400, body
        assert set(r.json()["error"]) >= {"message", "type", "param", "code"}
    assert client.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
    assert client.get("/health").json() == {"status": "ok"}


def test_openai_sdk(server_url, api_key):
    sdk = openai.OpenAI(base_url=f"{server_url}/v1", api_key=api_key)
    out = sdk.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
    assert out.choices[0].text
    stream = sdk.completions.create(
        model=MODEL, prompt="Hello", max_tokens=4, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == out.choices[0].text


def test_fireworks_sdk(server_url, api_key):
    from fireworks import Fireworks

    sdk = Fireworks(base_url=server_url, api_key=api_key)
    out = sdk.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
    assert out.choices[0].text
    stream = sdk.completions.create(
        model=MODEL, prompt="Hello", max_tokens=4, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == out.choices[0].text


def test_echo_and_truncate_vs_error(client):
    out = _complete(client, prompt="Hello there", echo=True, max_tokens=3, temperature=0)
    assert out["choices"][0]["text"].startswith("Hello there")
    fits = _complete(
        client, prompt="Hi", max_tokens=10**6, temperature=0, ignore_eos=True, stop=["."]
    )
    assert fits["choices"][0]["finish_reason"] == "stop"
    r = client.post(
        "/v1/completions",
        json={
            "model": MODEL,
            "prompt": "Hi",
            "max_tokens": 10**6,
            "context_length_exceeded_behavior": "error",
        },
    )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_echo_renders_control_tokens_the_same_for_text_and_token_id_prompts(client):
    """Issue 11: `[0, 0, 0]` echoed as "" while a text prompt kept `<|im_start|>`."""
    text = "<|im_start|>user\nHi<|im_end|>"
    ids = client.post("/tokenize", json={"prompt": text}).json()["tokens"]
    fields = {"echo": True, "logprobs": 1, "max_tokens": 0}
    by_text = _complete(client, prompt=text, **fields)["choices"][0]
    by_ids = _complete(client, prompt=ids, **fields)["choices"][0]
    assert by_text["text"] == by_ids["text"] == text
    assert by_text["logprobs"]["tokens"] == by_ids["logprobs"]["tokens"]
    assert by_ids["logprobs"]["tokens"][0] == "<|im_start|>"
    assert "".join(by_ids["logprobs"]["tokens"]) == text
    zeros = _complete(client, prompt=[0, 0, 0], **fields)["choices"][0]
    assert zeros["text"] == "<|endoftext|>" * 3
    assert zeros["logprobs"]["tokens"] == ["<|endoftext|>"] * 3
    assert zeros["logprobs"]["text_offset"] == [0, 13, 26]
