"""Admission: a planned request holds its places in the waiting queue until the engine
has its requests, so a burst cannot pass the 429 check all at once; a plan that is
run or dropped gives them back."""

from __future__ import annotations

import asyncio
import gc

import pytest

from fireside.api import APIError, CompletionService
from fireside.api.protocol import CompletionRequest
from tests.fakes import service_settings

from .fake_engine import FakeEngine
from .helpers import MODEL

# The fake engine always reports 1 waiting request: 2 more fit.
MAX_WAITING = 3


def request(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": MODEL, "prompt": "a", **fields})


@pytest.fixture
def service() -> CompletionService:
    return CompletionService({MODEL: FakeEngine()}, **service_settings(max_waiting=MAX_WAITING))


def test_planned_requests_count_as_waiting(service):
    async def run() -> None:
        plans = [await service.prepare(request()), await service.prepare(request())]
        assert service.admission.num_held(MODEL) == 2
        with pytest.raises(APIError) as refused:
            await service.prepare(request())
        assert refused.value.status == 429
        await service.complete(plans[0])  # submitted: its place is the engine's now
        assert service.admission.num_held(MODEL) == 1
        await service.prepare(request())

    asyncio.run(run())


def test_a_stream_gives_its_places_back_once_submitted(service):
    async def run() -> None:
        plan = await service.prepare(request(prompt=["a", "b"], stream=True))
        assert service.admission.num_held(MODEL) == 2
        events = service.stream(plan)
        await anext(events)
        assert service.admission.num_held(MODEL) == 0
        await events.aclose()

    asyncio.run(run())


def test_a_plan_dropped_unrun_gives_its_places_back(service):
    plan = asyncio.run(service.prepare(request(prompt=["a", "b"])))
    assert service.admission.num_held(MODEL) == 2
    del plan
    gc.collect()
    assert service.admission.num_held(MODEL) == 0


def test_a_prompt_with_nothing_to_generate_holds_no_place(service):
    plan = asyncio.run(service.prepare(request(max_tokens=0, echo=True)))
    assert not plan.prompts[0].needs_engine
    assert service.admission.num_held(MODEL) == 0


def test_releasing_a_hold_twice_gives_back_its_places_once():
    service = CompletionService({MODEL: FakeEngine()}, **service_settings())
    admission = service.admission
    first, second = admission.hold(MODEL, 2), admission.hold(MODEL, 3)
    with first:
        pass
    first.release()
    assert admission.num_held(MODEL) == 3
    second.release()
    assert admission.num_held(MODEL) == 0
