"""Issue 11, end to end on the real model: the stream's usage chunk as OpenAI clients
read it, the tokenizer endpoints lm-evaluation-harness uses, and the server-wide
default for keeping stop strings."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.e2e.conftest import MODEL

PROMPT = "The capital of France is"
PROMPT_IDS = [504, 3575, 282, 4649, 314]  # SmolLM2's tokens for PROMPT


@pytest.fixture
def sdk(server_url):
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused")


# --- streaming usage


def test_sdk_loop_reading_choices_0_and_usage_on_the_last_chunk(sdk):
    """The loop that 8 tests of the peers' suites use raised IndexError on `choices: []`."""
    stream = sdk.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, stream=True
    )
    chunks = list(stream)
    text = "".join(chunk.choices[0].text for chunk in chunks)
    whole = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    assert text == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == 5
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_sdk_n_choices_every_chunk_has_one(sdk):
    stream = sdk.completions.create(
        model=MODEL, prompt=["Hi", "Bye"], n=2, max_tokens=3, seed=1, stream=True
    )
    chunks = list(stream)
    assert all(len(chunk.choices) == 1 for chunk in chunks)
    assert {chunk.choices[0].index for chunk in chunks} == {0, 1, 2, 3}
    assert sum(1 for c in chunks if c.choices[0].finish_reason) == 4
    assert chunks[-1].choices[0].finish_reason is not None
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert 4 <= chunks[-1].usage.completion_tokens <= 12


def test_sdk_include_usage_true_and_false(sdk):
    stream = sdk.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=4,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    *text_chunks, last = list(stream)
    assert last.choices == [] and last.usage.completion_tokens == 4
    assert all(len(c.choices) == 1 and c.usage is None for c in text_chunks)
    quiet = sdk.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=4,
        temperature=0,
        stream=True,
        stream_options={"include_usage": False},
    )
    assert all(len(c.choices) == 1 and c.usage is None for c in quiet)


def test_stream_options_without_stream_is_400(sdk):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=1, stream_options={"include_usage": True}
        )
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == "stream_options"


# --- tokenizer endpoints


def test_tokenize_matches_completions_and_detokenize_round_trips(client):
    for prefix in ("", "/v1", "/inference/v1"):
        out = client.post(f"{prefix}/tokenize", json={"prompt": PROMPT}).json()
        assert out["tokens"] == PROMPT_IDS and out["count"] == 5
        back = client.post(f"{prefix}/detokenize", json={"tokens": out["tokens"]}).json()
        assert back == {"prompt": PROMPT}
    plain = client.post("/tokenize", json={"prompt": PROMPT, "add_special_tokens": False})
    assert plain.json()["tokens"] == PROMPT_IDS  # SmolLM2 adds no BOS
    strs = client.post("/tokenize", json={"prompt": PROMPT, "return_token_strs": True}).json()
    assert "".join(strs["token_strs"]) == PROMPT
    model = client.get(f"/v1/models/{MODEL}").json()
    assert out["max_model_len"] == model["context_length"]


def test_tokenizer_info_and_special_tokens(client):
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == "<|im_end|>"
    assert info["model_max_length"] == client.get(f"/v1/models/{MODEL}").json()["context_length"]
    assert "<|im_start|>" in info["chat_template"]
    assert info["add_bos_token"] is False
    # lm-eval's eos_token_id is `encode(eos_token)[0]`: the string must be one token.
    (eos_id,) = client.post(
        "/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}
    ).json()["tokens"]
    assert client.post("/detokenize", json={"tokens": [eos_id]}).json()["prompt"] == "<|im_end|>"
    chat = client.post("/tokenize", json={"prompt": "<|im_start|>user\nHi<|im_end|>"}).json()
    text = client.post("/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
    assert text == "<|im_start|>user\nHi<|im_end|>"
    assert eos_id in chat["tokens"]


def test_tokenizer_errors(client):
    vocab = client.post("/detokenize", json={"tokens": [10**8]})
    assert vocab.status_code == 400 and vocab.json()["error"]["param"] == "tokens"
    assert client.post("/tokenize", json={"prompt": 1}).status_code == 400
    missing = client.post("/tokenize", json={"prompt": "x", "model": "nope"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


# --- stop strings


@pytest.fixture(scope="module")
def openai_style_url(start_module_server):
    return start_module_server("--no-include-stop-str-in-output", "--prefix-cache", "0").url


def test_server_option_drops_stop_strings_unless_a_request_keeps_them(openai_style_url):
    base = {"model": MODEL, "prompt": PROMPT, "temperature": 0, "max_tokens": 16}
    with httpx.Client(base_url=openai_style_url, timeout=120) as client:
        dropped = client.post("/v1/completions", json={**base, "stop": ["Paris"]}).json()
        assert dropped["choices"][0]["text"] == " "
        assert dropped["choices"][0]["finish_reason"] == "stop"
        kept = client.post(
            "/v1/completions",
            json={**base, "stop": ["Paris"], "include_stop_str_in_output": True},
        ).json()
        assert kept["choices"][0]["text"] == " Paris"
        streamed = []
        with client.stream(
            "POST", "/v1/completions", json={**base, "stop": "Paris", "stream": True}
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    streamed.append(json.loads(line.removeprefix("data: ")))
        assert "".join(c["choices"][0]["text"] for c in streamed) == " "
