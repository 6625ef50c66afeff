"""Service tiers and Mirostat through the whole engine, on a fake runner (unit tests of
scheduling and per-sample state, not evidence about a model)."""

from __future__ import annotations

from fireside.engine.engine import Engine
from fireside.engine.request import Request
from fireside.engine.types import EngineRequest, RequestOutput, SamplingParams
from tests.fakes import FakeRunner, engine_config


class Recorder:
    """Stands in for `publish`: keeps every output, in the order the engine sent them."""

    def __init__(self) -> None:
        self.outputs: list[RequestOutput] = []

    def __call__(self, items: list[tuple[object, RequestOutput]]) -> None:
        self.outputs += [output for _, output in items]

    def first_tokens_order(self) -> list[str]:
        order: list[str] = []
        for out in self.outputs:
            if any(d.token_ids for d in out.deltas) and out.request_id not in order:
                order.append(out.request_id)
        return order

    def tokens(self, request_id: str) -> dict[int, list[int]]:
        by_sample: dict[int, list[int]] = {}
        for out in self.outputs:
            if out.request_id == request_id:
                for d in out.deltas:
                    by_sample.setdefault(d.index, []).extend(d.token_ids)
        return by_sample


def stepped_engine(**config) -> tuple[Engine, Recorder]:
    engine = Engine(FakeRunner(), engine_config(**config))
    recorder = Recorder()
    engine.core.publish = recorder
    engine.start(background=False)
    return engine, recorder


def submit(engine: Engine, rid: str, priority: bool = False, **params) -> None:
    sp = SamplingParams(**{"max_tokens": 4, "temperature": 0, **params})
    engine.core.submit(EngineRequest(rid, (3, 4, 5, 6), sp, priority=priority), sink=None)  # type: ignore[arg-type]


def run_until_idle(engine: Engine) -> None:
    for _ in range(1000):
        engine.run_once()
        if not engine.scheduler.has_work() and not engine.core.num_inbox:
            return
    raise AssertionError("the engine never ran out of work")


def test_with_one_slot_a_priority_request_submitted_last_starts_first():
    engine, recorder = stepped_engine(max_running=1, cache_entries=0)
    submit(engine, "running", max_tokens=6)
    engine.run_once()  # it holds the one slot
    for rid in ("d1", "d2", "d3"):
        submit(engine, rid)
    submit(engine, "vip", priority=True)
    run_until_idle(engine)
    assert recorder.first_tokens_order() == ["running", "vip", "d1", "d2", "d3"]


def test_priority_requests_keep_their_arrival_order_among_themselves():
    engine, recorder = stepped_engine(max_running=1, cache_entries=0)
    for rid, priority in (("d1", False), ("p1", True), ("d2", False), ("p2", True)):
        submit(engine, rid, priority=priority)
    run_until_idle(engine)
    assert recorder.first_tokens_order() == ["p1", "p2", "d1", "d2"]


def test_a_seeded_mirostat_request_gives_the_same_text_and_its_samples_differ():
    params = {"temperature": 1.0, "seed": 7, "n": 3, "max_tokens": 12, "mirostat_target": 5.0}
    runs = []
    for _ in range(2):
        engine, recorder = stepped_engine(max_running=8, cache_entries=0)
        submit(engine, "m", **params)
        run_until_idle(engine)
        runs.append(recorder.tokens("m"))
    assert runs[0] == runs[1]
    assert len({tuple(tokens) for tokens in runs[0].values()}) == 3  # one generator each


def test_each_sample_has_its_own_mirostat_state():
    params = SamplingParams(n=3, mirostat_target=2.5)
    request = Request.create(EngineRequest("r", (1, 2), params), None, 0)  # type: ignore[arg-type]
    states = [s.mirostat for s in request.samples]
    assert all(state is not None and state.mu == 5.0 for state in states)
    assert len({id(state) for state in states}) == 3
    plain = Request.create(EngineRequest("p", (1, 2), SamplingParams()), None, 0)  # type: ignore[arg-type]
    assert plain.samples[0].mirostat is None
