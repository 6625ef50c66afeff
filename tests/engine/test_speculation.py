"""Speculative decoding on CellRunner, a fake of llama.cpp's unified cache whose logits
depend on every (position, token) a sequence sees: a rejected draft's cell left
behind, or one removed too many, changes the output or trips its checks.

Whatever the draft (right, wrong, partly right, none), the output is the same,
token for token, logprob for logprob, seeded draw for seeded draw; only the
number of steps changes. Before every batch the ledger's count equals the cells
really used (CellRunner checks it), and after every step each running sequence
sees exactly its computed positions. Unit tests of the bookkeeping, not
evidence about a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from fireside.engine.engine import Engine
from fireside.engine.speculation import Drafter, SpeculationConfig
from fireside.engine.types import (
    EngineRequest,
    FinishReason,
    RequestOutput,
    SamplingParams,
    SpeculationCounts,
    TokenLogprob,
)
from tests.fakes import CellRunner, engine_config

PROMPT = tuple(3 + (5 * i) % 60 for i in range(40))


@dataclass
class Result:
    tokens: dict[int, list[int]] = field(default_factory=dict)  # per sample
    logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)
    finish: dict[int, FinishReason | None] = field(default_factory=dict)
    speculation: SpeculationCounts | None = None
    num_steps: int = 0


class Harness:
    """An engine stepped by hand on a CellRunner, checking the cells after every step."""

    def __init__(self, runner: CellRunner | None = None, **config: Any) -> None:
        self.runner = runner if runner is not None else CellRunner(1024)
        # No prompt lookup unless a test asks: "without a draft" must mean none at all.
        settings = {"max_running": 8, "token_budget": 64, "cache_entries": 4}
        settings = settings | {"speculate_auto": False} | config
        self.engine = Engine(self.runner, engine_config(**settings))
        self.runner.ledger = self.engine.scheduler.ledger
        self.outputs: dict[str, list[RequestOutput]] = {}
        self.engine.core.publish = self._collect
        self.engine.start(background=False)
        self._ids = 0

    def _collect(self, outputs) -> None:
        for _sink, out in outputs:
            self.outputs.setdefault(out.request_id, []).append(out)

    def submit(
        self, prompt: tuple[int, ...] = PROMPT, speculation: tuple[int, ...] = (), **params: Any
    ) -> str:
        self._ids += 1
        rid = f"r{self._ids}"
        sp = SamplingParams(**{"max_tokens": 48, "temperature": 0.0} | params)
        self.engine.core.submit(EngineRequest(rid, prompt, sp, speculation=speculation), None)
        return rid

    def run(self, max_steps: int = 2000) -> int:
        steps = 0
        while self.engine.scheduler.has_work() or self.engine.core.num_inbox:
            self.engine.run_once()
            self.check_cells()
            steps += 1
            assert steps < max_steps, "wedged"
        return steps

    def result(self, rid: str) -> Result:
        result = Result()
        outs = self.outputs[rid]
        assert all(o.error is None for o in outs)
        assert outs[-1].finished
        for o in outs:
            for d in o.deltas:
                result.tokens.setdefault(d.index, []).extend(d.token_ids)
                result.logprobs.setdefault(d.index, []).extend(d.logprobs or ())
                result.finish[d.index] = d.finish_reason or result.finish.get(d.index)
        result.speculation = outs[-1].speculation
        return result

    def complete(self, prompt=PROMPT, speculation=(), **params: Any) -> Result:
        rid = self.submit(prompt, speculation, **params)
        steps = self.run()
        result = self.result(rid)
        result.num_steps = steps
        return result

    def check_cells(self) -> None:
        sched, runner = self.engine.scheduler, self.runner
        assert sched.ledger.used == runner.used
        for s in sched.running:
            assert runner.positions(s.seq_id) == list(range(s.num_computed))
            assert sched.ledger.end(s.seq_id) == s.num_computed
        for entry in sched.cache.entries:
            assert runner.positions(entry.slot) == list(range(len(entry.tokens)))

    def check_empty(self) -> None:
        """Nothing left behind once the prefix cache is dropped."""
        sched = self.engine.scheduler
        assert not sched.running and not sched.waiting
        sched.clear_cache()
        assert self.runner.used == 0 and sched.ledger.used == 0
        assert sorted(sched.kv.free_slots) == list(range(self.runner.n_seq_max))


def reference(runner: CellRunner | None = None, **params: Any) -> Result:
    """The output without any draft (speculation off)."""
    return Harness(runner).complete(**params)


def edited(tokens: list[int]) -> tuple[int, ...]:
    """Mostly right: one token replaced, one inserted, one dropped."""
    draft = list(tokens)
    draft[6] = 3 if draft[6] != 3 else 4
    draft.insert(18, 5)
    del draft[30]
    return tuple(draft)


WRONG = tuple(3 + (11 * i + 1) % 60 for i in range(60))


# --- the output does not depend on the draft


@pytest.mark.parametrize("kind", ["right", "edited", "wrong", "none"])
def test_greedy_text_is_the_same_with_any_draft(kind):
    want = reference(max_tokens=48, logprobs=2)
    draft = {"right": tuple(want.tokens[0]), "edited": edited(want.tokens[0]), "wrong": WRONG}
    h = Harness()
    got = h.complete(speculation=draft.get(kind, ()), max_tokens=48, logprobs=2)
    assert got.tokens == want.tokens
    assert got.logprobs == want.logprobs  # the same rows: logprobs as without a draft
    assert got.finish == {0: FinishReason.LENGTH}
    h.check_empty()
    if kind == "right":
        # The first token comes from the prompt's step, then 16 (MAX_DRAFT) drafted and
        # one more sampled a step: 16 + 16 + 12 drafted, the last 12 cut by max_tokens.
        assert got.num_steps == 4
        assert got.speculation == SpeculationCounts(48, 44, 44, 44)
    if kind == "edited":
        assert got.num_steps < want.num_steps // 2
        spec = got.speculation
        assert spec is not None and spec.prediction_tokens == 48
        assert 30 <= spec.prediction_matched <= spec.draft_tokens
    if kind == "none":
        assert got.speculation is None
        assert got.num_steps == want.num_steps


SEEDED: list[dict[str, Any]] = [
    {},
    {"top_k": 20, "top_p": 0.9},
    {"min_p": 0.05, "typical_p": 0.95},
    {"frequency_penalty": 0.8, "presence_penalty": 0.5, "repetition_penalty": 1.3},
    {"logit_bias": ((7, 2.0), (9, -3.0))},
    {"mirostat_target": 3.0, "mirostat_lr": 0.2},
]


@pytest.mark.parametrize("extra", SEEDED, ids=lambda e: ",".join(e) or "plain")
def test_seeded_sampling_is_the_same_with_and_without_a_draft(extra):
    """One draw of the sample's generator per token, penalties over accepted tokens,
    Mirostat's mu after accepted tokens only: the same seed gives the same text."""
    params = {"temperature": 1.0, "seed": 7, "max_tokens": 40, "logprobs": 1} | extra
    want = reference(CellRunner(1024, spread=True), **params)
    assert len(set(want.tokens[0])) > 10  # a real distribution was sampled
    for draft in (tuple(want.tokens[0]), edited(want.tokens[0]), WRONG):
        h = Harness(CellRunner(1024, spread=True))
        got = h.complete(speculation=draft, **params)
        assert got.tokens == want.tokens
        assert got.logprobs == want.logprobs  # sampling_logprob included
        h.check_empty()
        spec = got.speculation
        assert spec is not None
        if draft == tuple(want.tokens[0]):
            assert spec.accepted_tokens == spec.draft_tokens >= 32
        elif draft == WRONG:
            assert spec.accepted_tokens == 0


def test_n_samples_with_a_draft_each_give_their_own_text():
    params = {"temperature": 1.0, "seed": 3, "max_tokens": 36, "n": 3}
    want = reference(CellRunner(1024, spread=True), **params)
    assert len({tuple(t) for t in want.tokens.values()}) == 3
    h = Harness(CellRunner(1024, spread=True))
    got = h.complete(speculation=tuple(want.tokens[1]), **params)
    assert got.tokens == want.tokens
    spec = got.speculation
    assert spec is not None and spec.prediction_tokens == 3 * 36
    # Sample 1 follows it all the way: 16 + 16 drafted, the rest sampled after them.
    assert spec.prediction_matched >= 32
    h.check_empty()


def test_a_stop_string_inside_the_accepted_draft_ends_the_text_there():
    # CellRunner renders every token as "x": the stop string ends the 7th token.
    want = reference(max_tokens=40, stop=("xxxxxxx",))
    assert len(want.tokens[0]) == 7 and want.finish[0] is FinishReason.STOP
    full = reference(max_tokens=40)
    h = Harness()
    got = h.complete(speculation=tuple(full.tokens[0]), max_tokens=40, stop=("xxxxxxx",))
    assert got.tokens == want.tokens and got.finish == want.finish
    assert got.num_steps < want.num_steps
    # Nothing after the stop: the cached KV is exactly the kept tokens'.
    entry = h.engine.scheduler.cache.entries[-1]
    assert entry.tokens == PROMPT + tuple(want.tokens[0][:-1])
    h.check_empty()


def test_max_tokens_inside_the_draft_ends_the_text_there():
    full = reference(max_tokens=40)
    for max_tokens in (1, 2, 5, 17, 18):
        h = Harness()
        got = h.complete(speculation=tuple(full.tokens[0]), max_tokens=max_tokens)
        assert got.tokens[0] == full.tokens[0][:max_tokens]
        assert got.finish == {0: FinishReason.LENGTH}
        # 16 drafted a step while there is room for them and one more token.
        num_output, drafted = 1, 0
        while num_output < max_tokens:
            step = min(16, max_tokens - num_output - 1)
            drafted, num_output = drafted + step, num_output + step + 1
        spec = got.speculation
        assert spec is not None and spec.draft_tokens == spec.accepted_tokens == drafted
        h.check_empty()


def test_the_context_limit_inside_the_draft_ends_the_text_there():
    runner = CellRunner(1024)
    runner.n_ctx_train = len(PROMPT) + 10
    full = reference(CellRunner(1024), max_tokens=40)
    h = Harness(runner)
    got = h.complete(speculation=tuple(full.tokens[0]), max_tokens=40)
    assert got.tokens[0] == full.tokens[0][:10]
    assert got.finish == {0: FinishReason.LENGTH}
    h.check_empty()


def test_rejected_drafts_leave_no_cells_behind_while_others_run():
    """Drafts beside plain decodes and prompt chunks, with prefix-cache hits."""
    full = reference(max_tokens=30)
    h = Harness(cache_entries=8)
    rids = [
        h.submit(speculation=tuple(full.tokens[0]), max_tokens=30),
        h.submit(speculation=WRONG, max_tokens=30),
        h.submit(speculation=edited(full.tokens[0]), max_tokens=30),
        h.submit(max_tokens=30),
        h.submit(PROMPT[:20] + (9,) * 30, speculation=WRONG[:5], max_tokens=12),
    ]
    h.run()
    for rid in rids[:4]:
        assert h.result(rid).tokens == full.tokens
    h.check_empty()


def test_drafts_fit_the_free_cells_and_the_token_budget():
    full = reference(max_tokens=40)
    # Room for the prompt and a few cells more: drafts shrink to what is free.
    h = Harness(CellRunner(64), token_budget=8)
    got = h.complete(speculation=tuple(full.tokens[0]), max_tokens=20)
    assert got.tokens[0] == full.tokens[0][:20]
    h.check_empty()


# --- automatic prompt lookup


def test_prompt_lookup_drafts_what_the_prompt_repeats():
    """With a runner that copies its prompt, `--speculate auto` drafts from the prompt
    and the drafts are accepted; the text is the same as without."""
    prompt = tuple(3 + (7 * i) % 60 for i in range(25)) * 2
    want = reference(CellRunner(1024, copy_period=25), prompt=prompt, max_tokens=60)
    h = Harness(CellRunner(1024, copy_period=25), speculate_auto=True)
    got = h.complete(prompt=prompt, max_tokens=60)
    assert got.tokens == want.tokens
    spec = got.speculation
    assert spec is not None and spec.prediction_tokens == 0
    assert spec.accepted_tokens >= 50 and got.num_steps < want.num_steps // 3
    h.check_empty()


def test_prompt_lookup_stops_for_a_sample_whose_drafts_fail():
    runner = CellRunner(1024)
    prompt = (5, 6, 7) * 40  # the hash runner's output has nothing to do with it
    want = reference(CellRunner(1024), prompt=prompt, max_tokens=200)
    h = Harness(runner, speculate_auto=True)
    got = h.complete(prompt=prompt, max_tokens=200)
    assert got.tokens == want.tokens
    assert h.engine.core.stats.spec_draft_tokens_total < 40
    h.check_empty()


def test_prompt_lookup_waits_while_many_samples_run():
    prompt = tuple(3 + (7 * i) % 60 for i in range(25)) * 2
    h = Harness(CellRunner(1024, copy_period=25), speculate_auto=True, speculate_max_running=2)
    got = h.complete(prompt=prompt, max_tokens=20, n=3, temperature=0.0)
    assert got.speculation == SpeculationCounts()  # three running: no drafts
    h.check_empty()


# --- the drafter alone


def drafter(prediction=(), auto=False, max_tokens=100, context=1000, num_prompt=4) -> Drafter:
    config = SpeculationConfig(auto=auto, auto_max_running=4, max_draft=8)
    return Drafter(tuple(prediction), num_prompt, max_tokens, context, config)


def test_the_prediction_is_followed_and_realigned_after_an_edit():
    prompt = [90, 91, 92, 93]
    prediction = list(range(10, 40))
    d = drafter(prediction)
    assert d.propose(prompt, 100, 1) == ()  # nothing generated yet: the prompt's step
    assert d.propose(prompt + [10], 100, 1) == tuple(range(11, 19))
    d.verified(8, 8)
    out = prompt + list(range(10, 20))
    assert d.propose(out, 100, 1) == tuple(range(20, 28))
    d.verified(8, 1)  # 20 accepted, then 77 instead of 21
    out += [20, 77]
    assert d.propose(out, 100, 1) == ()  # "20 77" is nowhere in the prediction
    d.verified(0, 0)
    out += [22]  # back on the prediction after the replaced word
    assert d.propose(out, 100, 1) == ()  # "77 22": still not
    out += [23]
    assert d.propose(out, 100, 1) == (24, 25)  # "22 23" is; the length fell back to 2
    counts = d.counts
    assert counts.prediction_tokens == 30 and counts.prediction_matched == 9


def test_drafts_stop_short_of_max_tokens_and_the_context():
    prediction = list(range(10, 40))
    assert drafter(prediction, max_tokens=5).propose([1, 2, 3, 4, 10], 100, 1) == (11, 12, 13)
    assert drafter(prediction, context=8).propose([1, 2, 3, 4, 10], 100, 1) == (11, 12)
    assert drafter(prediction).propose([1, 2, 3, 4, 10], 3, 1) == (11, 12, 13)


def test_prompt_lookup_continues_the_latest_earlier_match():
    d = drafter(auto=True, num_prompt=8)
    tokens = [1, 2, 3, 4, 5, 1, 2, 9, 1, 2]
    assert d.propose(tokens, 100, 1) == (9, 1, 2)  # "1 2" last seen before 9
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 7, 1, 2, 3]
    assert d.propose(tokens, 100, 1) == (4, 5, 6, 7)  # "1 2 3" beats "2 3"; 4 to start
    assert d.propose(tokens, 100, 5) == ()  # more running than auto_max_running


def test_a_source_that_keeps_failing_stops_drafting():
    d = drafter(auto=True, num_prompt=2)
    tokens = [1, 2, 1, 2]
    for _ in range(30):
        draft = d.propose(tokens, 100, 1)
        if not draft:
            break
        d.verified(len(draft), 0)
    assert d.propose(tokens, 100, 1) == ()
    assert 0 < d.counts.draft_tokens <= 30
