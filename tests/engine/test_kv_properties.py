"""Property tests of the scheduler, the prefix cache and the KV ledger, on CellRunner.

Random sequences of requests fill the context, overflow it, abort and hit the
prefix cache, and the engine is stepped by hand. Whatever the sequence:

- every request that was not aborted finishes, without error, with exactly the
  tokens it asked for (max_tokens, or what the context leaves);
- before every batch, the ledger's count of used cells equals the cells the
  runner really uses (CellRunner checks it), and llama.cpp is never asked for
  more cells than exist (no KVCacheFull);
- after every step, each running sequence sees exactly positions
  0..num_computed-1 and each cache entry exactly its tokens' positions;
- dropping the cache at the end leaves the runner empty and every slot free.

Requests may carry a draft (speculative decoding: the family's continuation, or
garbage) and `--speculate auto` may be on; a runner that copies what it saw a
period ago makes drafts that are accepted, so accepted and rejected drafts, their
truncated cells, the prefix cache and preemption all meet.

The same properties hold on StreamRunner (a stream of cells per sequence id, as
llama.cpp without a unified cache: copies instead of shared cells, no shared
pool to run out of, fewer ids than a request may have samples).

Unit tests of the bookkeeping on a fake runner, not evidence about a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fireside.engine.engine import Engine
from fireside.engine.types import EngineRequest, RequestOutput, SamplingParams
from tests.fakes import CellRunner, StreamRunner, engine_config

# Prompts come from a few families so that they share prefixes (cache hits).
FAMILIES = [[3 + (7 * i + f * 11) % 60 for i in range(512)] for f in range(3)]


@dataclass
class Driver:
    engine: Engine
    runner: CellRunner  # or StreamRunner
    outputs: dict[str, list[RequestOutput]] = field(default_factory=dict)
    expected: dict[str, int] = field(default_factory=dict)  # tokens per sample
    aborted: set[str] = field(default_factory=set)
    full_errors: int = 0

    @classmethod
    def make(
        cls,
        n_ctx: int,
        cache_entries: int,
        max_running: int,
        copy_period: int = 0,
        speculate_auto: bool = False,
        streams: int = 0,
    ) -> Driver:
        """With `streams`, a StreamRunner of that many ids of n_ctx cells each."""
        runner = (
            StreamRunner(n_ctx, streams, copy_period=copy_period)
            if streams
            else CellRunner(n_ctx, copy_period=copy_period)
        )
        engine = Engine(
            runner,
            engine_config(
                max_running=max_running,
                token_budget=32,
                cache_entries=cache_entries,
                prefill_chunk=16,
                speculate_auto=speculate_auto,
            ),
        )
        runner.ledger = engine.scheduler.ledger
        driver = cls(engine, runner)
        engine.core.publish = driver._collect
        forward = runner.forward

        def counted_forward(batch):
            try:
                return forward(batch)
            except Exception:
                driver.full_errors += 1
                raise

        runner.forward = counted_forward  # type: ignore[method-assign]
        engine.start(background=False)
        return driver

    def _collect(self, outputs) -> None:
        for _sink, out in outputs:
            self.outputs.setdefault(out.request_id, []).append(out)

    def submit(
        self,
        rid: str,
        prompt: list[int],
        max_tokens: int,
        n: int,
        seed: int,
        speculation: tuple[int, ...] = (),
    ) -> None:
        params = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, n=n)
        request = EngineRequest(rid, tuple(prompt), params, speculation=speculation)
        self.engine.core.submit(request, sink=None)
        self.expected[rid] = min(max_tokens, self.engine.context_length - len(prompt))

    def live(self) -> list[str]:
        return [
            rid
            for rid in self.expected
            if rid not in self.aborted and not any(o.finished for o in self.outputs.get(rid, []))
        ]

    def step(self) -> None:
        self.engine.run_once()
        self.check_cells()

    def check_cells(self) -> None:
        sched, runner = self.engine.scheduler, self.runner
        assert sched.ledger.used == runner.used
        assert runner.used <= runner.n_ctx
        for s in sched.running:
            assert runner.positions(s.seq_id) == list(range(s.num_computed))
            assert sched.ledger.end(s.seq_id) == s.num_computed
        for entry in sched.cache.entries:
            assert runner.positions(entry.slot) == list(range(len(entry.tokens)))


ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("submit"),
            st.integers(0, len(FAMILIES) - 1),  # family
            st.floats(0.0, 1.0),  # shared part of the context, as a fraction
            st.integers(0, 5),  # own tail
            st.sampled_from([1, 4, 30, 100_000]),  # max_tokens: short, or fill the context
            st.sampled_from([1, 1, 1, 2, 3]),  # n
            st.sampled_from(["none", "none", "family", "edited", "garbage"]),  # draft
        ),
        st.tuples(st.just("steps"), st.integers(1, 40)),
        st.tuples(st.just("abort"), st.integers(0, 10)),
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_ctx=st.sampled_from([48, 96, 256]),
    cache_entries=st.sampled_from([0, 1, 4]),
    max_running=st.sampled_from([1, 3, 8]),
    copy_period=st.sampled_from([0, 20, 60]),
    speculate_auto=st.booleans(),
    ops=ops,
)
def test_random_workloads_finish_and_the_ledger_matches_the_cells(
    n_ctx, cache_entries, max_running, copy_period, speculate_auto, ops
):
    run_workload(Driver.make(n_ctx, cache_entries, max_running, copy_period, speculate_auto), ops)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_ctx_seq=st.sampled_from([48, 96, 256]),
    cache_entries=st.sampled_from([0, 1, 4]),
    max_running=st.sampled_from([1, 2, 3]),
    copy_period=st.sampled_from([0, 20, 60]),
    speculate_auto=st.booleans(),
    ops=ops,
)
def test_random_workloads_on_a_stream_per_sequence_id_finish_with_the_same_properties(
    n_ctx_seq, cache_entries, max_running, copy_period, speculate_auto, ops
):
    # --parallel + --prefix-cache ids, as the server gives llama.cpp: n = 3 exceeds them.
    streams = max_running + cache_entries
    d = Driver.make(
        n_ctx_seq, cache_entries, max_running, copy_period, speculate_auto, streams=streams
    )
    run_workload(d, ops)
    assert isinstance(d.runner, StreamRunner)
    assert d.engine.scheduler.num_preempted == 0  # no shared pool to run out of


def run_workload(d: Driver, ops: list) -> None:
    n_ctx = d.runner.n_ctx_seq
    for i, op in enumerate(ops):
        if op[0] == "submit":
            _, family, shared, tail, max_tokens, n, draft = op
            head = max(1, int(shared * (n_ctx - 8)))
            prompt = (FAMILIES[family][:head] + [4 + i % 50] * tail)[: n_ctx - 1]
            # What follows in the family: the output, where the runner copies period 60.
            follows = FAMILIES[family][len(prompt) : len(prompt) + 40]
            edits = [3 if j in (3, 17) else t for j, t in enumerate(follows)]  # rejected midway
            speculation = {
                "none": (),
                "family": tuple(follows),
                "edited": tuple(edits),
                "garbage": tuple(3 + (13 * j + i) % 60 for j in range(30)),
            }[draft]
            d.submit(f"r{i}", prompt, max_tokens, n, seed=i, speculation=speculation)
        elif op[0] == "steps":
            for _ in range(op[1]):
                d.step()
        else:
            live = d.live()
            if live:
                rid = live[op[1] % len(live)]
                d.engine.abort(rid)
                d.aborted.add(rid)

    steps = 0
    while d.live():
        d.step()
        steps += 1
        assert steps < 20_000, f"wedged: {d.live()} never finish"
    d.step()  # the last aborts

    for rid, want in d.expected.items():
        if rid in d.aborted:
            continue
        outs = d.outputs[rid]
        assert all(o.error is None for o in outs)
        assert outs[-1].finished
        per_sample: dict[int, int] = {}
        for o in outs:
            for delta in o.deltas:
                per_sample[delta.index] = per_sample.get(delta.index, 0) + len(delta.token_ids)
        assert set(per_sample.values()) == {want}, (rid, per_sample, want)

    sched = d.engine.scheduler
    assert d.full_errors == 0  # our count always agreed with the runner's room
    assert not sched.running and not sched.waiting
    sched.clear_cache()
    assert d.runner.used == 0 and sched.ledger.used == 0
    assert sorted(sched.kv.free_slots) == list(range(d.runner.n_seq_max))


def test_a_request_that_fills_the_context_does_not_wedge_the_next_one():
    """Issue 11: a finished request holding the whole context in the cache blocked
    every later prompt of more than one token."""
    d = Driver.make(n_ctx=256, cache_entries=32, max_running=16)
    d.submit("fill", FAMILIES[0][:5], 100_000, 1, seed=1)
    steps = 0
    while d.live():
        d.step()
        steps += 1
    assert d.engine.scheduler.kv_used() <= 256 // 4  # the cache keeps at most a quarter
    d.submit("next", FAMILIES[1][:4], 4, 1, seed=2)
    for _ in range(50):
        d.step()
    assert d.outputs["next"][-1].finished and d.outputs["next"][-1].error is None
