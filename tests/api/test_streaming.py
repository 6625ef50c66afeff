"""SSE framing over HTTP, and what happens when the consumer leaves early."""

from __future__ import annotations

import asyncio
import json

from fireside.api import CompletionService
from fireside.api.protocol import CompletionRequest
from tests.fakes import service_settings

from .fake_engine import FakeEngine
from .helpers import MODEL, assert_error, stream_chunks


def stream_events(client, **fields) -> tuple[object, list[str]]:
    body = {"model": MODEL, "stream": True, **fields}
    with client.stream("POST", "/v1/completions", json=body) as response:
        text = "".join(response.iter_text())
    assert text.endswith("\n\n")
    events = text.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events), events
    return response, [e.removeprefix("data: ") for e in events]


def test_stream_framing(client):
    response, events = stream_events(client, prompt="hi there", max_tokens=2)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"].startswith("no-cache")
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "text_completion" and c["model"] == MODEL for c in chunks)
    # Usage rides on the chunk that finishes the last choice: every chunk has a choice.
    assert [list(c) for c in chunks] == [
        ["id", "object", "created", "model", "choices", "usage"]
    ] * 2
    assert chunks[0]["usage"] is None
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 2,
        "total_tokens": 4,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    choices = [c["choices"][0] for c in chunks]
    assert [c["text"] for c in choices] == [" s0t0", " s0t1"]
    assert [c["finish_reason"] for c in choices] == [None, "length"]
    assert all(c["logprobs"] is None and c["index"] == 0 for c in choices)


def test_every_chunk_has_a_choice_and_usage_comes_with_the_last_finish(client):
    """Issue 11: a separate `choices: []` usage chunk broke `chunk.choices[0]` loops."""
    fields = {"prompt": ["a b", "c"], "n": 2, "max_tokens": 3}
    whole = client.post("/v1/completions", json={"model": MODEL, **fields}).json()
    chunks = stream_chunks(client, **fields)
    assert all(len(c["choices"]) == 1 for c in chunks)
    finishes = [i for i, c in enumerate(chunks) if c["choices"][0]["finish_reason"]]
    assert len(finishes) == 4 and finishes[-1] == len(chunks) - 1
    assert [c["usage"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["usage"] == whole["usage"]


def test_include_usage_true_sends_openais_usage_chunk(client):
    fields = {"prompt": ["a b", "c"], "n": 2, "max_tokens": 3}
    whole = client.post("/v1/completions", json={"model": MODEL, **fields}).json()
    chunks = stream_chunks(client, stream_options={"include_usage": True}, **fields)
    *text_chunks, last = chunks
    assert last["choices"] == [] and last["usage"] == whole["usage"]
    assert list(last) == ["id", "object", "created", "model", "choices", "usage"]
    # As OpenAI and vLLM: every other chunk says `usage: null`.
    assert all(len(c["choices"]) == 1 and c["usage"] is None for c in text_chunks)
    assert sum(1 for c in text_chunks if c["choices"][0]["finish_reason"]) == 4


def test_include_usage_false_sends_no_usage(client):
    chunks = stream_chunks(
        client, prompt="a b", max_tokens=2, stream_options={"include_usage": False}
    )
    assert [c["choices"][0]["text"] for c in chunks] == [" s0t0", " s0t1"]
    assert all("usage" not in c for c in chunks)


def test_stream_options_without_include_usage_keep_the_default(client):
    chunks = stream_chunks(client, prompt="a b", max_tokens=2, stream_options={})
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 2


def test_continuous_usage_stats_give_each_chunk_its_choices_usage(make_client):
    client = make_client(engines={MODEL: FakeEngine(cached_tokens=1)})
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = stream_chunks(client, prompt=["a b", "c"], max_tokens=2, stream_options=options)
    *text_chunks, last = chunks
    seen = [
        (c["choices"][0]["index"], c["usage"]["prompt_tokens"], c["usage"]["completion_tokens"])
        for c in text_chunks
    ]
    assert sorted(seen) == [(0, 2, 1), (0, 2, 2), (1, 1, 1), (1, 1, 2)]
    assert all(c["usage"]["prompt_tokens_details"] == {"cached_tokens": 1} for c in text_chunks)
    assert last["choices"] == []
    assert last["usage"]["prompt_tokens"] == 3 and last["usage"]["completion_tokens"] == 4


def test_stream_options_need_stream_true(client):
    for stream in (False, None):
        response = client.post(
            "/v1/completions",
            json={
                "model": MODEL,
                "prompt": "x",
                "stream": stream,
                "stream_options": {"include_usage": True},
            },
        )
        assert_error(response, 400, "stream_options", "invalid_value")
    missing = {"model": MODEL, "prompt": "x", "stream_options": {"include_usage": False}}
    assert_error(client.post("/v1/completions", json=missing), 400, "stream_options")
    # null is "not given", so it is fine without a stream.
    ok = client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "x", "stream_options": None}
    )
    assert ok.status_code == 200, ok.text


def test_streamed_text_equals_non_streamed_text(client):
    fields = {"prompt": ["a b", "c"], "n": 2, "max_tokens": 3, "echo": True}
    whole = client.post("/v1/completions", json={"model": MODEL, **fields}).json()
    _, events = stream_events(client, **fields)
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for event in events[:-1]:
        for choice in json.loads(event)["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            if choice["finish_reason"]:
                reasons[choice["index"]] = choice["finish_reason"]
    assert texts == {c["index"]: c["text"] for c in whole["choices"]}
    assert reasons == {c["index"]: c["finish_reason"] for c in whole["choices"]}
    assert json.loads(events[-2])["usage"] == whole["usage"]


def test_stream_echo_comes_first(client):
    _, events = stream_events(client, prompt="say this", echo=True, max_tokens=1)
    first = json.loads(events[0])["choices"][0]
    assert first == {"index": 0, "text": "say this", "finish_reason": None, "logprobs": None}


def test_stream_max_tokens_zero(client, engine):
    _, events = stream_events(client, prompt="score me", echo=True, max_tokens=0)
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["text"] == "score me"
    assert chunks[0]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 0
    assert engine.requests == []


def test_engine_error_mid_stream_is_an_error_event(make_client):
    client = make_client(engines={MODEL: FakeEngine(error_at_step=1)})
    response, events = stream_events(client, prompt="x", max_tokens=3)
    assert response.status_code == 200  # headers were already sent
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])
    assert list(error) == ["error"]
    assert error["error"]["type"] == "internal_error"
    assert "boom" not in events[-2]


def test_stream_validation_errors_are_http_errors(client):
    response = client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True, "n": 0}
    )
    assert response.status_code == 400


def run_plan(engine: FakeEngine, **fields):
    service = CompletionService({MODEL: engine}, **service_settings())
    request = CompletionRequest.model_validate({"model": MODEL, **fields})
    return service, asyncio.run(service.prepare(request))


def test_leaving_a_stream_early_closes_every_engine_request():
    engine = FakeEngine(num_words=100)
    service, plan = run_plan(engine, prompt=["a", "b", "c"], max_tokens=50, stream=True)

    async def consume_two() -> None:
        events = service.stream(plan)
        await anext(events)
        await anext(events)
        await events.aclose()  # what Starlette's cancellation amounts to

    asyncio.run(consume_two())
    assert len(engine.requests) == 3
    assert sorted(engine.closed_early) == sorted(r.request_id for r in engine.requests)


def test_cancelled_stream_closes_every_engine_request():
    engine = FakeEngine(hang=True)
    service, plan = run_plan(engine, prompt=["a", "b"], stream=True)

    async def cancel_while_waiting() -> None:
        async def consume() -> None:
            async for _ in service.stream(plan):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0)

    asyncio.run(cancel_while_waiting())
    assert len(engine.closed_early) == 2


def test_non_streamed_request_is_aborted_when_the_client_leaves():
    engine = FakeEngine(hang=True)
    service, plan = run_plan(engine, prompt=["a", "b"])

    async def client_left() -> bool:
        return True

    async def complete() -> None:
        from fireside.api.serving import ClientDisconnected

        try:
            await service.complete(plan, client_left)
        except ClientDisconnected:
            return
        raise AssertionError("expected ClientDisconnected")

    asyncio.run(asyncio.wait_for(complete(), timeout=5))
    assert len(engine.closed_early) == 2
