"""What a request can ask to see beyond the text: token ids, raw output, perf metrics."""

from __future__ import annotations

import pytest

from .fake_engine import FakeEngine
from .helpers import MODEL, complete, stream_chunks

PERF_KEYS = [
    "prompt-tokens",
    "cached-prompt-tokens",
    "server-time-to-first-token",
    "server-processing-time",
    "speculation-prompt-tokens",
    "speculation-prompt-matched-tokens",
    "speculation-generated-tokens",
    "speculation-accepted-tokens",
]


def ids_of(engine: FakeEngine, *tokens: str) -> list[int]:
    return [engine.token_id(t.encode()) for t in tokens]


def choice_chunks(chunks: list[dict], index: int) -> list[dict]:
    return [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]


# --- return_token_ids


def test_return_token_ids(client, engine):
    body = complete(
        client, prompt=["a b", "c"], n=2, max_tokens=2, echo=True, return_token_ids=True
    )
    choices = body["choices"]
    assert list(choices[0]) == [
        "index",
        "text",
        "finish_reason",
        "logprobs",
        "prompt_token_ids",
        "token_ids",
    ]
    prompts = {len(r.prompt_token_ids): list(r.prompt_token_ids) for r in engine.requests}
    assert [c["prompt_token_ids"] for c in choices] == [
        prompts[2],
        prompts[2],
        prompts[1],
        prompts[1],
    ]
    # Only the generated tokens, even when the text starts with the echo.
    assert choices[1]["token_ids"] == ids_of(engine, " s1t0", " s1t1")
    assert choices[2]["token_ids"] == ids_of(engine, " s0t0", " s0t1")


def test_token_ids_are_absent_unless_asked(client):
    choice = complete(client, prompt="a", raw_output=False, return_token_ids=False)["choices"][0]
    assert list(choice) == ["index", "text", "finish_reason", "logprobs"]


@pytest.mark.parametrize("echo", [False, True])
def test_streamed_token_ids(client, engine, echo):
    fields = {"prompt": ["a b", "c"], "n": 2, "max_tokens": 3, "return_token_ids": True}
    whole = complete(client, echo=echo, **fields)["choices"]
    chunks = stream_chunks(client, echo=echo, **fields)
    for expected in whole:
        own = choice_chunks(chunks, expected["index"])
        # The prompt's ids once, in the choice's first chunk (the echo when echoing).
        assert own[0]["prompt_token_ids"] == expected["prompt_token_ids"]
        assert all("prompt_token_ids" not in c for c in own[1:])
        assert [t for c in own for t in c["token_ids"]] == expected["token_ids"]
        assert own[0]["token_ids"] == ([] if echo else expected["token_ids"][:1])


def test_streamed_prompt_ids_come_with_the_finish_when_nothing_is_generated(client, engine):
    chunks = stream_chunks(client, prompt="a b", max_tokens=0, return_token_ids=True)
    (choice,) = chunks[0]["choices"]
    assert choice["prompt_token_ids"] == ids_of(engine, "a", " b")
    assert choice["token_ids"] == []
    assert choice["finish_reason"] == "length"


# --- raw_output


def test_raw_output(client, engine):
    choice = complete(client, prompt="a b", echo=True, max_tokens=2, raw_output=True)["choices"][0]
    assert list(choice) == ["index", "text", "finish_reason", "logprobs", "raw_output"]
    assert choice["raw_output"] == {
        "prompt_fragments": ["a b"],
        "prompt_token_ids": list(engine.requests[0].prompt_token_ids),
        "completion": " s0t0 s0t1",  # without the echo
        "completion_token_ids": ids_of(engine, " s0t0", " s0t1"),
        "completion_logprobs": None,
    }


def test_raw_output_of_a_token_prompt_lists_the_ids(client):
    choices = complete(client, prompt=[[5, 6], [7]], max_tokens=1, raw_output=True)["choices"]
    assert [c["raw_output"]["prompt_fragments"] for c in choices] == [[5, 6], [7]]
    assert [c["raw_output"]["prompt_token_ids"] for c in choices] == [[5, 6], [7]]


def test_raw_output_logprobs_are_content_format_of_the_completion(client):
    choice = complete(client, prompt="a b", echo=True, max_tokens=2, logprobs=2, raw_output=True)[
        "choices"
    ][0]
    raw = choice["raw_output"]["completion_logprobs"]
    assert list(raw) == ["content"]
    assert [e["token"] for e in raw["content"]] == [" s0t0", " s0t1"]
    assert [e["logprob"] for e in raw["content"]] == [-0.25, -0.5]
    assert [len(e["top_logprobs"]) for e in raw["content"]] == [2, 2]
    # Offsets into `completion`, not into the echoed text.
    assert [e["text_offset"] for e in raw["content"]] == [0, 5]
    assert choice["logprobs"]["text_offset"][-2:] == [3, 8]


def test_streamed_raw_output_comes_with_the_finish(client):
    fields = {"prompt": ["a b", "c"], "n": 2, "max_tokens": 2, "logprobs": True, "echo": True}
    whole = complete(client, raw_output=True, **fields)["choices"]
    chunks = stream_chunks(client, raw_output=True, **fields)
    for expected in whole:
        own = choice_chunks(chunks, expected["index"])
        assert [("raw_output" in c) for c in own] == [False] * (len(own) - 1) + [True]
        assert own[-1]["finish_reason"] == "length"
        assert own[-1]["raw_output"] == expected["raw_output"]


# --- perf metrics


def test_perf_metrics_in_body_and_headers(make_client):
    client = make_client(engines={MODEL: FakeEngine(cached_tokens=1)})
    response = client.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": ["a b", "c"], "perf_metrics_in_response": True},
    )
    body = response.json()
    metrics = body["perf_metrics"]
    assert list(body)[-2:] == ["usage", "perf_metrics"]
    assert list(metrics) == PERF_KEYS
    assert metrics["prompt-tokens"] == body["usage"]["prompt_tokens"] == 3
    assert metrics["cached-prompt-tokens"] == 2
    ttft, total = metrics["server-time-to-first-token"], metrics["server-processing-time"]
    assert isinstance(ttft, float) and isinstance(total, float)
    assert 0 <= ttft <= total
    for key in PERF_KEYS:
        assert response.headers[f"fireworks-{key}"] == str(metrics[key])


def test_perf_metrics_sum_the_speculation_counts_over_prompts(client):
    """The engine sends each prompt's totals so far; the response adds up the last ones
    (FakeEngine: 3 steps, a draft of 2 tokens per sample, n = 2)."""
    response = client.post(
        "/v1/completions",
        json={
            "model": MODEL,
            "prompt": ["a b", "c"],
            "n": 2,
            "speculation": [5, 6],
            "perf_metrics_in_response": True,
        },
    )
    assert response.status_code == 200, response.text
    metrics = response.json()["perf_metrics"]
    assert metrics["speculation-prompt-tokens"] == 2 * 2 * 2  # two prompts, n = 2
    assert metrics["speculation-prompt-matched-tokens"] == 2 * 2
    assert metrics["speculation-generated-tokens"] == 2 * 4
    assert metrics["speculation-accepted-tokens"] == 2 * 2
    assert response.headers["fireworks-speculation-generated-tokens"] == "8"
    plain = client.post("/v1/completions", json={"model": MODEL, "prompt": "a b"})
    assert plain.headers["fireworks-speculation-prompt-tokens"] == "0"


def test_perf_headers_are_always_sent(client):
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": "a b"})
    assert "perf_metrics" not in response.json()
    assert response.headers["fireworks-prompt-tokens"] == "2"
    assert response.headers["fireworks-cached-prompt-tokens"] == "0"
    assert float(response.headers["fireworks-server-processing-time"]) >= float(
        response.headers["fireworks-server-time-to-first-token"]
    )


def test_streamed_perf_metrics_are_in_the_usage_chunk(client):
    chunks = stream_chunks(client, prompt="a b", perf_metrics_in_response=True)
    *text_chunks, last = chunks
    assert last["choices"][0]["finish_reason"] and last["usage"]
    assert list(last)[-2:] == ["usage", "perf_metrics"]
    assert list(last["perf_metrics"]) == PERF_KEYS
    assert last["perf_metrics"]["prompt-tokens"] == 2
    assert all("perf_metrics" not in c for c in text_chunks)
    assert "perf_metrics" not in stream_chunks(client, prompt="a b")[-1]
    # With OpenAI's usage chunk they ride on it; without usage, on the last chunk.
    separate = stream_chunks(
        client, prompt="a b", perf_metrics_in_response=True, stream_options={"include_usage": True}
    )
    assert separate[-1]["choices"] == [] and list(separate[-1]["perf_metrics"]) == PERF_KEYS
    assert all("perf_metrics" not in c for c in separate[:-1])
    none = stream_chunks(
        client, prompt="a b", perf_metrics_in_response=True, stream_options={"include_usage": False}
    )
    assert "usage" not in none[-1] and list(none[-1]["perf_metrics"]) == PERF_KEYS
