"""The request log: one `done` line for every `start` line, however the request ends;
one `refused` line (status and error code) for every request refused before it
started; never a body, a prompt, an output or a key."""

from __future__ import annotations

import asyncio
import gc
import logging
import re

import pytest
from fastapi.testclient import TestClient

from fireside.api import CompletionService, create_app
from fireside.api.protocol import CompletionRequest
from fireside.api.serving import ClientDisconnected
from tests.fakes import service_settings

from .fake_engine import FakeEngine
from .helpers import MODEL

KEY = "sk-very-secret-key-123"
PROMPT = "a secret prompt"


@pytest.fixture(autouse=True)
def _info(caplog):
    caplog.set_level(logging.INFO, logger="fireside")


def lines(caplog, kind: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{kind} ")]


def field(line: str, name: str) -> str:
    m = re.search(rf"\b{name}=(\S+)", line)
    assert m, line
    return m.group(1)


def assert_nothing_private(caplog) -> None:
    for record in caplog.records:
        text = record.getMessage()
        assert KEY not in text and "secret" not in text and "s0t0" not in text, text


def test_a_401_and_a_400_each_log_one_refused_line(make_client, caplog):
    client = make_client(api_keys=[KEY])
    body = {"model": MODEL, "prompt": PROMPT}
    assert client.post("/v1/completions", json=body).status_code == 401
    r = client.post(
        "/v1/completions",
        json={**body, "bogus": 1},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert r.status_code == 400
    refused = lines(caplog, "refused")
    assert len(refused) == 2, refused
    assert (field(refused[0], "status"), field(refused[0], "code")) == ("401", "invalid_api_key")
    assert (field(refused[1], "status"), field(refused[1], "code")) == ("400", "unknown_parameter")
    assert not lines(caplog, "start") and not lines(caplog, "done")
    assert_nothing_private(caplog)


def test_other_refusals_are_logged_once_each(make_client, caplog):
    client = make_client(service_kwargs={"max_waiting": 1})  # the fake always has 1 waiting
    assert client.get("/nowhere").status_code == 404
    assert client.get("/v1/completions").status_code == 405
    assert client.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
    assert client.post("/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code == 429
    assert client.post("/v1/completions", content=b"{").status_code == 400
    codes = [(field(x, "status"), field(x, "code")) for x in lines(caplog, "refused")]
    assert codes == [
        ("404", "not_found"),
        ("405", "method_not_allowed"),
        ("404", "model_not_found"),
        ("429", "queue_full"),
        ("400", "invalid_json"),
    ]


def test_each_finished_request_logs_one_done_line(make_client, caplog):
    client = make_client(api_keys=[KEY])
    headers = {"Authorization": f"Bearer {KEY}"}
    for stream in (False, True):
        r = client.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": PROMPT, "stream": stream},
            headers=headers,
        )
        assert r.status_code == 200
    starts, dones = lines(caplog, "start"), lines(caplog, "done")
    assert len(starts) == len(dones) == 2
    assert [field(x, "id") for x in starts] == [field(x, "id") for x in dones]
    assert [field(x, "status") for x in dones] == ["200", "200"]
    assert not lines(caplog, "refused")
    assert_nothing_private(caplog)


def test_timeouts_and_engine_failures_end_with_a_done_line_not_a_refusal(caplog):
    for engine, expected in (
        (FakeEngine(hang=True), "timeout"),
        (FakeEngine(error_at_step=0), "500"),
    ):
        caplog.clear()
        service = CompletionService({MODEL: engine}, **service_settings(request_timeout_s=0.2))
        client = TestClient(create_app(service), raise_server_exceptions=False)
        for stream in (False, True):
            client.post("/v1/completions", json={"model": MODEL, "prompt": "a", "stream": stream})
        starts, dones = lines(caplog, "start"), lines(caplog, "done")
        assert len(starts) == len(dones) == 2, (starts, dones)
        assert [field(x, "status") for x in dones] == [expected] * 2
        assert not lines(caplog, "refused")


def run_plan(engine: FakeEngine, **fields):
    service = CompletionService({MODEL: engine}, **service_settings())
    request = CompletionRequest.model_validate({"model": MODEL, **fields})
    return service, asyncio.run(service.prepare(request))


def test_a_stream_the_client_left_logs_done_aborted(caplog):
    service, plan = run_plan(FakeEngine(num_words=100), prompt="a", max_tokens=50, stream=True)

    async def leave() -> None:
        events = service.stream(plan)
        await anext(events)
        await events.aclose()  # what Starlette's cancellation amounts to

    asyncio.run(leave())
    dones = lines(caplog, "done")
    assert len(dones) == 1 and field(dones[0], "status") == "aborted"
    assert field(dones[0], "id") == plan.cmpl_id


def test_a_cancelled_stream_logs_done_aborted(caplog):
    service, plan = run_plan(FakeEngine(hang=True), prompt="a", stream=True)

    async def cancel() -> None:
        async def consume() -> None:
            async for _ in service.stream(plan):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(cancel())
    dones = lines(caplog, "done")
    assert len(dones) == 1 and field(dones[0], "status") == "aborted"


def test_a_non_streamed_request_the_client_left_logs_done_aborted(caplog):
    service, plan = run_plan(FakeEngine(hang=True), prompt="a")

    async def client_left() -> bool:
        return True

    async def run() -> None:
        with pytest.raises(ClientDisconnected):
            await service.complete(plan, client_left)

    asyncio.run(asyncio.wait_for(run(), timeout=5))
    dones = lines(caplog, "done")
    assert len(dones) == 1 and field(dones[0], "status") == "aborted"


def test_a_plan_dropped_before_it_ran_logs_done_aborted(caplog):
    # The client left before Starlette began iterating the stream.
    service, plan = run_plan(FakeEngine(), prompt="a", stream=True)
    cmpl_id = plan.cmpl_id
    events = service.stream(plan)
    del plan, events
    gc.collect()
    dones = lines(caplog, "done")
    assert len(dones) == 1 and field(dones[0], "status") == "aborted"
    assert field(dones[0], "id") == cmpl_id
    assert len(lines(caplog, "start")) == 1


def auth_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "auth" in r.getMessage()]


def test_an_open_server_warns_once_that_auth_is_off(caplog):
    create_app(CompletionService({MODEL: FakeEngine()}, **service_settings()))
    records = auth_records(caplog)
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING
    assert "auth off" in records[0].getMessage()
    assert "no API key" in records[0].getMessage()


def test_with_keys_a_line_says_auth_is_on(caplog):
    create_app(
        CompletionService({MODEL: FakeEngine()}, **service_settings()), api_keys=[KEY, "another"]
    )
    records = auth_records(caplog)
    assert [r.getMessage() for r in records] == ["auth on: 2 API keys"]
    assert records[0].levelno == logging.INFO
    assert_nothing_private(caplog)
