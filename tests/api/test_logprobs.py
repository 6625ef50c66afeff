"""Logprobs over HTTP: both formats, echo scoring, text offsets, streamed and not.

The fake engine's numbers (tests/api/fake_engine.py): the token sampled at step
k has logprob -0.25 (k+1), sampling logprob half that, and is the most likely
token at even steps; alternatives are " alt0", " alt1", ... at -2, -3, ...;
prompt position i scores -0.5 i.
"""

from __future__ import annotations

import json
import math

import pytest

from fireside.api.logprobs import (
    OffsetCounter,
    Position,
    TokenTexts,
    logprobs_dict,
    scored_positions,
)
from fireside.api.protocol import LogprobsFormat
from fireside.engine.types import TokenLogprob

from .fake_engine import FakeEngine
from .helpers import MODEL, assert_error, complete, stream_chunks

LEGACY_KEYS = ["tokens", "token_logprobs", "top_logprobs", "text_offset", "token_ids"]
CONTENT_KEYS = [
    "token",
    "bytes",
    "logprob",
    "sampling_logprob",
    "token_id",
    "text_offset",
    "top_logprobs",
]


def merge_legacy(parts: list[dict]) -> dict:
    return {key: [v for part in parts for v in part[key]] for key in LEGACY_KEYS}


def streamed_logprobs(chunks: list[dict], fmt: str) -> dict[int, dict]:
    """Each choice's chunk logprobs joined together, as one object."""
    parts: dict[int, list[dict]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            parts.setdefault(choice["index"], []).append(choice["logprobs"])
    if fmt == "legacy":
        return {i: merge_legacy(p) for i, p in parts.items()}
    return {i: {"content": [e for part in p for e in part["content"]]} for i, p in parts.items()}


def assert_legacy_consistent(choice: dict, num_top: int) -> None:
    """Equal lengths, offsets inside the text at each token, at most N+1 alternatives."""
    logprobs = choice["logprobs"]
    assert list(logprobs) == LEGACY_KEYS
    assert len({len(logprobs[key]) for key in LEGACY_KEYS}) == 1
    text = choice["text"]
    for token, offset, top in zip(
        logprobs["tokens"], logprobs["text_offset"], logprobs["top_logprobs"], strict=True
    ):
        assert 0 <= offset <= len(text)
        if "\ufffd" not in token:  # the fake's text is exactly its tokens' bytes
            assert text[offset:].startswith(token)
        assert top is None or 1 <= len(top) <= num_top + 1


# --- the legacy format: logprobs N


def test_legacy_logprobs(client, engine):
    body = complete(client, prompt="a b c", max_tokens=3, logprobs=2)
    choice = body["choices"][0]
    assert choice["text"] == " s0t0 s0t1 s0t2"
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == [" s0t0", " s0t1", " s0t2"]
    assert logprobs["token_logprobs"] == [-0.25, -0.5, -0.75]
    assert logprobs["text_offset"] == [0, 5, 10]
    assert logprobs["token_ids"] == [engine.token_id(t.encode()) for t in logprobs["tokens"]]
    # The sampled token plus N alternatives; at even steps it is one of them.
    assert logprobs["top_logprobs"] == [
        {" s0t0": -0.25, " alt0": -2.0},
        {" alt0": -2.0, " alt1": -3.0, " s0t1": -0.5},
        {" s0t2": -0.75, " alt0": -2.0},
    ]
    assert_legacy_consistent(choice, 2)
    params = engine.requests[0].params
    assert (params.logprobs, params.prompt_logprobs) == (2, None)


def test_logprobs_zero_gives_only_the_sampled_token(client, engine):
    choice = complete(client, prompt="a", max_tokens=2, logprobs=0)["choices"][0]
    assert choice["logprobs"]["top_logprobs"] == [{" s0t0": -0.25}, {" s0t1": -0.5}]
    assert engine.requests[0].params.logprobs == 0


def test_top_logprobs_overrides_the_legacy_count(client, engine):
    choice = complete(client, prompt="a", max_tokens=2, logprobs=1, top_logprobs=3)["choices"][0]
    assert engine.requests[0].params.logprobs == 3
    assert [len(top) for top in choice["logprobs"]["top_logprobs"]] == [3, 4]
    assert_legacy_consistent(choice, 3)


@pytest.mark.parametrize("logprobs", [None, False])
def test_logprobs_off(client, engine, logprobs):
    choice = complete(client, prompt="a", echo=True, logprobs=logprobs)["choices"][0]
    assert choice["logprobs"] is None
    assert engine.requests[0].params.logprobs is None
    assert engine.requests[0].params.prompt_logprobs is None


def test_every_choice_has_its_own_logprobs(client):
    body = complete(client, prompt=["a", "b b"], n=2, max_tokens=2, logprobs=1)
    tokens = [c["logprobs"]["tokens"] for c in body["choices"]]
    assert tokens == [[" s0t0", " s0t1"], [" s1t0", " s1t1"]] * 2


# --- the content[] format: logprobs true


def test_content_logprobs(client, engine):
    choice = complete(client, prompt="a", max_tokens=2, logprobs=True, top_logprobs=2)["choices"][0]
    content = choice["logprobs"]["content"]
    assert list(choice["logprobs"]) == ["content"]
    assert [list(entry) for entry in content] == [CONTENT_KEYS] * 2
    first, second = content
    assert first["token"] == " s0t0"
    assert first["bytes"] == list(b" s0t0")
    assert first["token_id"] == engine.token_id(b" s0t0")
    assert (first["logprob"], first["sampling_logprob"]) == (-0.25, -0.125)
    assert [e["text_offset"] for e in content] == [0, 5]
    # Only the alternatives (the sampled token is there when it is one of them).
    assert first["top_logprobs"] == [
        {
            "token": " s0t0",
            "logprob": -0.25,
            "token_id": first["token_id"],
            "bytes": list(b" s0t0"),
        },
        {
            "token": " alt0",
            "logprob": -2.0,
            "token_id": engine.token_id(b" alt0"),
            "bytes": list(b" alt0"),
        },
    ]
    assert [t["token"] for t in second["top_logprobs"]] == [" alt0", " alt1"]
    assert engine.requests[0].params.logprobs == 2


def test_content_logprobs_default_to_no_alternatives(client, engine):
    choice = complete(client, prompt="a", max_tokens=2, logprobs=True)["choices"][0]
    assert engine.requests[0].params.logprobs == 0
    assert [e["top_logprobs"] for e in choice["logprobs"]["content"]] == [[], []]
    assert [e["logprob"] for e in choice["logprobs"]["content"]] == [-0.25, -0.5]


# --- echo: the prompt's tokens are scored too


def test_echo_with_legacy_logprobs_scores_the_prompt(client, engine):
    choice = complete(client, prompt="hello big world", echo=True, max_tokens=2, logprobs=1)[
        "choices"
    ][0]
    assert choice["text"] == "hello big world s0t0 s0t1"
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == ["hello", " big", " world", " s0t0", " s0t1"]
    # The first prompt token has no predecessor, so nothing scores it.
    assert logprobs["token_logprobs"] == [None, -0.5, -1.0, -0.25, -0.5]
    assert logprobs["top_logprobs"][0] is None
    assert logprobs["top_logprobs"][1] == {" alt0": -3.0, " big": -0.5}
    assert logprobs["text_offset"] == [0, 5, 9, 15, 20]
    assert logprobs["token_ids"][:3] == list(engine.requests[0].prompt_token_ids)
    assert_legacy_consistent(choice, 1)
    params = engine.requests[0].params
    assert (params.prompt_logprobs, params.prompt_logprobs_start) == (1, 0)


def test_echo_with_content_logprobs(client, engine):
    choice = complete(client, prompt="hello big", echo=True, max_tokens=1, logprobs=True)[
        "choices"
    ][0]
    content = choice["logprobs"]["content"]
    assert [e["token"] for e in content] == ["hello", " big", " s0t0"]
    assert [e["logprob"] for e in content] == [None, -0.5, -0.25]
    assert [e["sampling_logprob"] for e in content] == [None, None, -0.125]
    assert [e["text_offset"] for e in content] == [0, 5, 9]
    assert content[0]["bytes"] == list(b"hello")
    assert engine.requests[0].params.prompt_logprobs == 0


def test_echo_of_token_ids_renders_control_tokens_like_a_text_prompt(client):
    """Issue 11: `[0, 0, 0]` echoed as "" because control tokens render empty."""
    choice = complete(client, prompt=[0, 0, 0], echo=True, max_tokens=1, logprobs=1)["choices"][0]
    assert choice["text"] == "<|c0|><|c0|><|c0|> s0t0"
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == ["<|c0|>"] * 3 + [" s0t0"]
    assert logprobs["text_offset"] == [0, 6, 12, 18]
    last = complete(client, prompt=[0, 0, 0], echo_last=2, max_tokens=1, logprobs=True)
    content = last["choices"][0]["logprobs"]["content"]
    assert last["choices"][0]["text"] == "<|c0|><|c0|> s0t0"
    assert [e["token"] for e in content] == ["<|c0|>", "<|c0|>", " s0t0"]
    assert content[0]["bytes"] == list(b"<|c0|>")


def test_echo_last_scores_only_the_last_tokens(client, engine):
    choice = complete(client, prompt="one two three four", echo_last=2, max_tokens=1, logprobs=1)[
        "choices"
    ][0]
    assert choice["text"] == " three four s0t0"
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == [" three", " four", " s0t0"]
    # Position 2 has a predecessor, so the first echoed token is scored.
    assert logprobs["token_logprobs"] == [-1.0, -1.5, -0.25]
    assert logprobs["text_offset"] == [0, 6, 11]
    assert_legacy_consistent(choice, 1)
    params = engine.requests[0].params
    assert (params.prompt_logprobs, params.prompt_logprobs_start) == (1, 2)


def test_echo_last_without_echo_or_logprobs_echoes_text_only(client, engine):
    choice = complete(client, prompt="one two three", echo_last=1, max_tokens=1)["choices"][0]
    assert choice["text"] == " three s0t0"
    assert choice["logprobs"] is None
    assert engine.requests[0].params.prompt_logprobs is None


def test_echo_last_of_the_whole_prompt_is_echo(client):
    fields = {"prompt": "  spaced   prompt", "max_tokens": 1, "logprobs": 2}
    whole = complete(client, echo=True, **fields)["choices"]
    assert whole[0]["text"] == "  spaced   prompt s0t0"  # the prompt as sent
    assert complete(client, echo_last=2, **fields)["choices"] == whole
    assert complete(client, echo_last=50, **fields)["choices"] == whole


def test_echo_last_zero_echoes_nothing(client, engine):
    choice = complete(client, prompt="a b", echo=True, echo_last=0, max_tokens=1, logprobs=0)[
        "choices"
    ][0]
    assert choice["text"] == " s0t0"
    assert choice["logprobs"]["tokens"] == [" s0t0"]
    assert engine.requests[0].params.prompt_logprobs is None


def test_echo_last_wins_over_echo(client):
    choice = complete(client, prompt="a b c", echo=True, echo_last=1, max_tokens=1)["choices"][0]
    assert choice["text"] == " c s0t0"


def test_scoring_with_max_tokens_zero_goes_to_the_engine(client, engine):
    body = complete(client, prompt=["a b c", "d e"], echo=True, max_tokens=0, logprobs=1, n=2)
    assert [r.params.max_tokens for r in engine.requests] == [0, 0]
    assert [r.params.prompt_logprobs for r in engine.requests] == [1, 1]
    choices = body["choices"]
    assert [c["text"] for c in choices] == ["a b c", "a b c", "d e", "d e"]
    assert {c["finish_reason"] for c in choices} == {"length"}
    assert choices[0]["logprobs"]["token_logprobs"] == [None, -0.5, -1.0]
    assert choices[2]["logprobs"]["tokens"] == ["d", " e"]
    for choice in choices:
        assert_legacy_consistent(choice, 1)
    assert body["usage"]["completion_tokens"] == 0


def test_max_tokens_zero_with_logprobs_but_no_echo_stays_out_of_the_engine(client, engine):
    choice = complete(client, prompt="a b", max_tokens=0, logprobs=2)["choices"][0]
    assert engine.requests == []
    assert choice["text"] == ""
    assert choice["logprobs"] == {key: [] for key in LEGACY_KEYS}


def test_engine_without_prompt_logprobs_is_a_500(make_client):
    client = make_client(engines={MODEL: FakeEngine(omit_prompt_logprobs=True)})
    response = client.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": "a b", "echo": True, "logprobs": 1},
    )
    assert_error(response, 500, None, "internal_error")


# --- tokens that split a character


SPLIT = [b" caf", b"\xc3", b"\xa9 ok", "😀".encode()[:2], "😀".encode()[2:]]


def test_tokens_inside_a_character(make_client):
    client = make_client(engines={MODEL: FakeEngine(script=SPLIT)})
    choice = complete(client, prompt="a", max_tokens=5, logprobs=True)["choices"][0]
    assert choice["text"] == " café ok😀"
    content = choice["logprobs"]["content"]
    assert [e["token"] for e in content] == [
        " caf",
        "\ufffd",
        "\ufffd ok",
        "\ufffd",
        "\ufffd\ufffd",
    ]
    assert [bytes(e["bytes"]) for e in content] == SPLIT
    # A partial character counts once complete: offsets stay on character boundaries.
    assert [e["text_offset"] for e in content] == [0, 4, 4, 8, 8]


def test_streamed_tokens_inside_a_character(make_client):
    client = make_client(engines={MODEL: FakeEngine(script=SPLIT)})
    fields = {"prompt": "a", "max_tokens": 5, "logprobs": 0}
    whole = complete(client, **fields)["choices"][0]
    chunks = stream_chunks(client, **fields)  # usage rides on the last: no chunk to drop
    # A token that ends inside a character adds no text yet, but its logprobs still go out.
    assert [c["choices"][0]["text"] for c in chunks] == [" caf", "", "é ok", "", "😀"]
    assert streamed_logprobs(chunks, "legacy") == {0: whole["logprobs"]}


# --- streaming


@pytest.mark.parametrize(
    ("fmt", "fields"),
    [("legacy", {"logprobs": 2}), ("content", {"logprobs": True, "top_logprobs": 1})],
)
@pytest.mark.parametrize("echo", [False, True])
def test_streamed_logprobs_equal_non_streamed(client, fmt, fields, echo):
    fields = {"prompt": ["a b c", "d"], "n": 2, "max_tokens": 3, "echo": echo, **fields}
    whole = complete(client, **fields)
    chunks = stream_chunks(client, **fields)
    expected = {c["index"]: c["logprobs"] for c in whole["choices"]}
    assert streamed_logprobs(chunks, fmt) == expected


def test_stream_echo_chunk_carries_the_prompt_logprobs(client):
    chunks = stream_chunks(client, prompt=["a b", "c"], n=2, echo=True, max_tokens=2, logprobs=1)
    choices = [c["choices"][0] for c in chunks]
    for index, prompt in enumerate(["a b", "a b", "c", "c"]):
        own = [c for c in choices if c["index"] == index]
        # The echo first, with the prompt's scores; then one chunk per token.
        assert [c["text"] for c in own] == [prompt, f" s{index % 2}t0", f" s{index % 2}t1"]
        assert own[0]["logprobs"]["token_logprobs"][0] is None
        assert len(own[0]["logprobs"]["tokens"]) == len(prompt.split())
        assert own[0]["finish_reason"] is None
        assert own[1]["logprobs"]["text_offset"] == [len(prompt)]


def test_stream_scoring_with_max_tokens_zero(client, engine):
    chunks = stream_chunks(client, prompt="a b", echo=True, max_tokens=0, logprobs=True)
    echo, finish = chunks
    assert echo["choices"][0]["text"] == "a b"
    assert [e["logprob"] for e in echo["choices"][0]["logprobs"]["content"]] == [None, -0.5]
    assert finish["choices"][0]["text"] == ""
    assert finish["choices"][0]["finish_reason"] == "length"
    assert finish["choices"][0]["logprobs"] == {"content": []}
    assert finish["usage"]["completion_tokens"] == 0
    assert len(engine.requests) == 1


def test_stream_engine_without_prompt_logprobs_is_an_error_event(make_client):
    client = make_client(engines={MODEL: FakeEngine(omit_prompt_logprobs=True)})
    body = {"model": MODEL, "prompt": "a b", "echo": True, "logprobs": 1, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        text = "".join(response.iter_text())
    events = [e.removeprefix("data: ") for e in text.split("\n\n")[:-1]]
    assert json.loads(events[-2])["error"]["type"] == "internal_error"
    assert events[-1] == "[DONE]"


# --- the builders themselves


def test_offset_counter_counts_whole_characters():
    counter = OffsetCounter(start=3)
    offsets = [counter.add(data) for data in [b"ab", b"\xe2\x82", b"\xac", b"\xff", b"c"]]
    # "€" is counted once its last byte comes; invalid bytes count nothing.
    assert offsets == [3, 5, 5, 6, 6]
    assert counter.num_chars == 7


def test_prompt_offsets_stay_inside_the_echo():
    # The echo is the prompt as sent, which its tokens' bytes need not spell exactly
    # (a tokenizer's added leading space, say).
    texts = TokenTexts(lambda token_id: b" ab")
    scores = [None, TokenLogprob(1, -1.0)]
    positions = scored_positions([1, 1], scores, OffsetCounter(), texts, limit=4)
    assert [p.text_offset for p in positions] == [0, 3]
    positions = scored_positions([1, 1], scores, OffsetCounter(), texts, limit=2)
    assert [p.text_offset for p in positions] == [0, 2]
    assert [p.scores for p in positions] == scores


def test_offsets_are_clamped_into_the_text_and_logprobs_kept_finite():
    texts = TokenTexts(lambda token_id: b"xy")
    score = TokenLogprob(1, -math.inf, ((2, -math.inf),), -math.inf)
    positions = [Position(1, score, offset) for offset in (0, 2, 4, 6)]
    legacy = logprobs_dict(LogprobsFormat.LEGACY, positions, texts, 1, limit=5)
    # A stop string left out of the text can end past it: the offsets stay inside.
    assert legacy["text_offset"] == [0, 2, 4, 5]
    assert legacy["token_logprobs"] == [-9999.0] * 4
    shifted = logprobs_dict(LogprobsFormat.CONTENT, positions, texts, 1, limit=3, shift=2)
    assert [e["text_offset"] for e in shifted["content"]] == [0, 0, 2, 3]
    assert shifted["content"][0]["sampling_logprob"] == -9999.0
    assert shifted["content"][0]["top_logprobs"][0]["logprob"] == -9999.0


def test_legacy_top_keeps_the_sampled_tokens_logprob_when_strings_collide():
    # Two ids that both end inside a character render as "\ufffd".
    texts = TokenTexts(lambda token_id: b"\xe2" if token_id == 1 else b"\xf0")
    score = TokenLogprob(1, -1.5, ((2, -0.5), (1, -1.5)))
    legacy = logprobs_dict(LogprobsFormat.LEGACY, [Position(1, score, 0)], texts, 1, limit=0)
    assert legacy["top_logprobs"] == [{"\ufffd": -1.5}]
    assert legacy["tokens"] == ["\ufffd"]
