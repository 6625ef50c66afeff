"""The sampler's transforms against plain numpy references on fixed logits.

The references are written the slow, obvious way (full sorts, explicit loops),
so they share no code path with the sampler.
"""

from __future__ import annotations

import numpy as np
import pytest

from fireside.engine.sampler import (
    History,
    Mirostat,
    filtered_distribution,
    logprobs_of,
    process_row,
    sample_rows,
)
from fireside.engine.types import SamplingParams

V = 500


@pytest.fixture
def logits() -> np.ndarray:
    return np.random.default_rng(7).normal(0, 3, size=V).astype(np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def reference_distribution(logits: np.ndarray, p: SamplingParams) -> dict[int, float]:
    """Token -> probability after temperature, top_k, top_p, min_p, typical_p."""
    probs = softmax(logits.astype(np.float64) / p.temperature)
    alive = dict(enumerate(probs))

    def renorm(keep: list[int]) -> None:
        total = sum(alive[t] for t in keep)
        kept = {t: alive[t] / total for t in keep}
        alive.clear()
        alive.update(kept)

    if p.top_k:
        renorm(sorted(alive, key=lambda t: -alive[t])[: p.top_k])
    if p.top_p < 1:
        keep, mass = [], 0.0
        for t in sorted(alive, key=lambda t: -alive[t]):
            keep.append(t)
            mass += alive[t]
            if mass >= p.top_p:
                break
        renorm(keep)
    if p.min_p > 0:
        top = max(alive.values())
        renorm([t for t in alive if alive[t] >= p.min_p * top])
    if p.typical_p < 1:
        entropy = -sum(q * np.log(q) for q in alive.values() if q > 0)
        keep, mass = [], 0.0
        for t in sorted(alive, key=lambda t: abs(-np.log(alive[t]) - entropy)):
            keep.append(t)
            mass += alive[t]
            if mass >= p.typical_p:
                break
        renorm(keep)
    return alive


def as_dict(probs: np.ndarray, ids: np.ndarray | None) -> dict[int, float]:
    tokens = range(probs.size) if ids is None else ids
    return {int(t): float(q) for t, q in zip(tokens, probs, strict=True) if q > 0}


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_k=20),
        SamplingParams(temperature=1.0, top_p=0.8),
        SamplingParams(temperature=1.3, min_p=0.05),
        SamplingParams(temperature=1.0, typical_p=0.6),
        SamplingParams(temperature=0.9, top_k=50, top_p=0.9, min_p=0.02, typical_p=0.9),
    ],
    ids=["top_k", "top_p", "min_p", "typical_p", "all"],
)
def test_filtered_distribution_matches_reference(logits: np.ndarray, params) -> None:
    got = as_dict(*filtered_distribution(logits, params))
    want = reference_distribution(logits, params)
    assert set(got) == set(want)
    for t, q in want.items():
        assert got[t] == pytest.approx(q, rel=1e-9, abs=1e-12)
    assert len(got) < V  # each of these really cuts the distribution


def test_typical_p_keeps_the_tokens_nearest_the_entropy() -> None:
    # One dominant token and a flat tail: the entropy is low, so the typical set
    # starts with the dominant token, not with the rare ones.
    x = np.array([5.0, 1.0, 1.0, 1.0, 1.0, -3.0], dtype=np.float32)
    probs, ids = filtered_distribution(x, SamplingParams(typical_p=0.5))
    assert ids is not None and 0 in set(ids.tolist()) and 5 not in set(ids.tolist())


def test_process_row_matches_the_documented_formulas(logits: np.ndarray) -> None:
    params = SamplingParams(
        frequency_penalty=0.5,
        presence_penalty=0.3,
        repetition_penalty=1.5,
        logit_bias=((3, 10.0), (4, -100.0)),
    )
    prompt = [1, 2, 2, 7]
    output = [7, 9, 9, 9, 11]
    row = logits.copy()
    process_row(row, params, History(np.unique(prompt), output))

    want = logits.astype(np.float64).copy()
    want[3] += 10.0
    want[4] -= 100.0
    for t in set(prompt) | set(output):
        want[t] = want[t] / 1.5 if want[t] > 0 else want[t] * 1.5
    for t in set(output):
        want[t] -= output.count(t) * 0.5 + 0.3
    np.testing.assert_allclose(row, want, rtol=1e-5, atol=1e-4)


def test_frequency_and_presence_count_only_generated_tokens(logits: np.ndarray) -> None:
    row = logits.copy()
    process_row(row, SamplingParams(presence_penalty=1.0), History(np.array([5]), []))
    np.testing.assert_array_equal(row, logits)


def test_logit_bias_forces_and_bans_at_any_temperature(logits: np.ndarray) -> None:
    best = int(np.argmax(logits))
    forced = int(np.argmin(logits))
    for temperature in (0.0, 1.0):
        p = SamplingParams(temperature=temperature, logit_bias=((forced, 100.0),))
        rows = np.tile(logits, (8, 1))
        out = sample_rows(rows, [p] * 8, [np.random.default_rng(i) for i in range(8)])
        assert out.tokens == [forced] * 8
    p = SamplingParams(temperature=0.0, logit_bias=((best, -100.0),))
    out = sample_rows(logits[None].copy(), [p], [np.random.default_rng(0)])
    assert out.tokens[0] != best


def test_greedy_is_argmax_with_zero_sampling_logprob(logits: np.ndarray) -> None:
    rows = np.stack([logits, -logits])
    out = sample_rows(rows.copy(), [SamplingParams(temperature=0.0)] * 2, [None, None])  # type: ignore[list-item]
    assert out.tokens == [int(np.argmax(logits)), int(np.argmax(-logits))]
    assert out.sampling_logprobs == [0.0, 0.0]


def test_plain_temperature_samples_the_softmax() -> None:
    x = np.array([2.0, 1.0, 0.0, -1.0], dtype=np.float32)
    p = SamplingParams(temperature=0.8)
    rng = np.random.default_rng(1)
    n = 20000
    counts = np.zeros(4)
    for _ in range(n // 100):
        out = sample_rows(np.tile(x, (100, 1)), [p] * 100, [rng] * 100)
        np.add.at(counts, out.tokens, 1)
    want = softmax(x / 0.8)
    np.testing.assert_allclose(counts / n, want, atol=0.015)


def test_plain_temperature_draws_across_blocks_and_the_tail() -> None:
    # 600 tokens: two full blocks of 256 and a tail of 88, a likely token in each.
    x = np.full(600, -30.0, dtype=np.float32)
    x[[5, 300, 599]] = [1.0, 0.5, 0.0]
    rng = np.random.default_rng(2)
    counts: dict[int, int] = {}
    for _ in range(100):
        out = sample_rows(np.tile(x, (100, 1)), [SamplingParams()] * 100, [rng] * 100)
        for t in out.tokens:
            counts[t] = counts.get(t, 0) + 1
    assert set(counts) == {5, 300, 599}
    want = softmax(np.array([1.0, 0.5, 0.0]))
    got = np.array([counts[5], counts[300], counts[599]]) / 10000
    np.testing.assert_allclose(got, want, atol=0.02)


def test_sampling_logprob_is_under_the_distribution_sampled_from(logits: np.ndarray) -> None:
    plain = SamplingParams(temperature=0.5)
    cut = SamplingParams(temperature=0.5, top_k=3)
    out = sample_rows(np.stack([logits, logits]), [plain, cut], [np.random.default_rng(3)] * 2)
    full = np.log(softmax(logits.astype(np.float64) / 0.5))
    assert out.sampling_logprobs[0] == pytest.approx(full[out.tokens[0]], abs=1e-4)
    top3 = np.sort(full)[-3:]
    renorm = full[out.tokens[1]] - np.log(np.exp(top3).sum())
    assert out.sampling_logprobs[1] == pytest.approx(renorm, abs=1e-4)


def test_a_row_draws_the_same_whatever_else_is_in_the_batch(logits: np.ndarray) -> None:
    mine = SamplingParams(temperature=1.0, top_p=0.9)
    alone = sample_rows(logits[None].copy(), [mine], [np.random.default_rng(42)])
    others = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7), mine]
    rows = np.stack([-logits, logits * 0.5, logits])
    rngs = [np.random.default_rng(1), np.random.default_rng(2), np.random.default_rng(42)]
    mixed = sample_rows(rows, others, rngs)
    assert mixed.tokens[2] == alone.tokens[0]


def test_logprobs_of_is_log_softmax(logits: np.ndarray) -> None:
    rows = np.stack([logits, logits[::-1].copy()])
    target_lp, top, top_lp = logprobs_of(rows, [3, 17], 4)
    for r in range(2):
        ref = np.log(softmax(rows[r].astype(np.float64)))
        assert target_lp[r] == pytest.approx(ref[[3, 17][r]], abs=1e-5)
        order = np.argsort(-ref)[:4]
        assert top[r].tolist() == order.tolist()
        np.testing.assert_allclose(top_lp[r], ref[order], atol=1e-5)
    _, top0, top0_lp = logprobs_of(rows, [0, 0], 0)
    assert top0.shape == (2, 0) and top0_lp.shape == (2, 0)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1e-300),
        SamplingParams(temperature=5e-324, top_p=0.9),
        SamplingParams(repetition_penalty=1e-240, min_p=1e-240),
        SamplingParams(repetition_penalty=1e-46, top_p=0.5),
        SamplingParams(repetition_penalty=2.0, frequency_penalty=2, presence_penalty=-2),
    ],
    ids=[
        "tiny-temperature",
        "tiny-temperature-top-p",
        "tiny-penalty-min-p",
        "tiny-penalty",
        "all-penalties",
    ],
)
def test_extreme_but_valid_values_give_a_real_token_and_finite_scores(logits, params):
    """Found by fuzzing: float32 underflow once made NaN distributions (and crashed)."""
    history = History(np.array([1, 2, 3]), [int(np.argmax(logits)), 5, 5])
    out = sample_rows(logits[None].copy(), [params], [np.random.default_rng(0)], [history])
    assert 0 <= out.tokens[0] < V
    assert np.isfinite(out.sampling_logprobs[0])
    if params.temperature < 1e-5 and not params.has_penalties:
        assert out.tokens[0] == int(np.argmax(logits))  # tiny temperature is greedy


# --- Mirostat 2.0


def reference_mirostat(
    rows: np.ndarray, us: list[float], tau: float, eta: float, temperature: float
) -> tuple[list[int], list[float], list[float]]:
    """Mirostat 2.0 written out (llama.cpp's llama_sampler_mirostat_v2_apply): the
    tokens, their probabilities under the truncated distribution, and mu after each."""
    mu = 2 * tau
    tokens, probs, mus = [], [], []
    for row, u in zip(rows, us, strict=True):
        p = softmax(row.astype(np.float64) / temperature)
        keep = [t for t in range(p.size) if p[t] > 0 and -np.log2(p[t]) <= mu]
        if not keep:
            keep = [int(np.argmax(p))]
        total = sum(p[t] for t in keep)
        q = {t: p[t] / total for t in keep}
        # Inverse CDF in token-id order, as the sampler draws.
        acc, chosen = 0.0, keep[-1]
        for t in keep:
            acc += q[t]
            if acc > u:
                chosen = t
                break
        mu -= eta * (-np.log2(q[chosen]) - tau)
        tokens.append(chosen)
        probs.append(q[chosen])
        mus.append(mu)
    return tokens, probs, mus


@pytest.mark.parametrize(("tau", "eta", "temperature"), [(3.0, 0.1, 1.0), (1.0, 0.5, 0.7)])
def test_mirostat_matches_the_reference_step_by_step(tau, eta, temperature) -> None:
    rows = np.random.default_rng(11).normal(0, 3, size=(200, V)).astype(np.float32)
    params = SamplingParams(temperature=temperature, mirostat_target=tau, mirostat_lr=eta)
    state = Mirostat.start(params)
    assert state is not None and state.mu == 2 * tau
    rng = np.random.default_rng(5)
    tokens, logprobs, mus = [], [], []
    for row in rows:
        out = sample_rows(row[None].copy(), [params], [rng], None, [state])
        tokens.append(out.tokens[0])
        logprobs.append(out.sampling_logprobs[0])
        mus.append(state.mu)
    us = list(np.random.default_rng(5).random(len(rows)))  # one draw per step
    want_tokens, want_probs, want_mus = reference_mirostat(rows, us, tau, eta, temperature)
    assert tokens == want_tokens
    np.testing.assert_allclose(np.exp(logprobs), want_probs, rtol=1e-9)
    np.testing.assert_allclose(mus, want_mus, rtol=1e-9, atol=1e-9)


def test_a_lower_mirostat_target_samples_less_surprising_tokens() -> None:
    rows = np.random.default_rng(12).normal(0, 2, size=(400, V)).astype(np.float32)

    def mean_raw_surprise(tau: float) -> float:
        params = SamplingParams(mirostat_target=tau)
        state, rng = Mirostat.start(params), np.random.default_rng(6)
        total = 0.0
        for row in rows:
            token = sample_rows(row[None].copy(), [params], [rng], None, [state]).tokens[0]
            total += -np.log2(softmax(row.astype(np.float64))[token])
        return total / len(rows)

    low, high = mean_raw_surprise(1.5), mean_raw_surprise(5.0)
    assert low < high - 1.0, (low, high)


def test_mirostat_applies_after_the_other_truncations_and_keeps_the_top_token(logits) -> None:
    params = SamplingParams(top_k=5, mirostat_target=0.0, mirostat_lr=0.0)
    state = Mirostat(mu=-1.0)  # no token is unsurprising enough: the most likely one stays
    out = sample_rows(logits[None].copy(), [params], [np.random.default_rng(0)], None, [state])
    assert out.tokens == [int(np.argmax(logits))]
    assert out.sampling_logprobs == [0.0]
    assert state.mu == -1.0  # eta 0: mu stays


def test_mirostat_never_picks_a_masked_token(logits) -> None:
    masked = logits.copy()
    allowed = [3, 40, 41, 200]
    masked[np.setdiff1d(np.arange(V), allowed)] = -np.inf  # a grammar mask, applied first
    params = SamplingParams(mirostat_target=50.0)  # mu far above any finite surprise
    state, rng = Mirostat.start(params), np.random.default_rng(1)
    for _ in range(50):
        out = sample_rows(masked[None].copy(), [params], [rng], None, [state])
        assert out.tokens[0] in allowed and np.isfinite(out.sampling_logprobs[0])


def test_greedy_ignores_mirostat_and_a_row_without_its_state_is_refused(logits) -> None:
    greedy = SamplingParams(temperature=0.0, mirostat_target=2.0)
    state = Mirostat.start(greedy)
    out = sample_rows(logits[None].copy(), [greedy], [np.random.default_rng(0)], None, [state])
    assert out.tokens == [int(np.argmax(logits))] and state is not None and state.mu == 4.0
    with pytest.raises(ValueError, match="Mirostat state"):
        sample_rows(
            logits[None].copy(), [SamplingParams(mirostat_target=2.0)], [np.random.default_rng(0)]
        )


def test_a_mirostat_row_draws_the_same_whatever_else_is_in_the_batch(logits) -> None:
    mine = SamplingParams(mirostat_target=3.0)
    alone_state = Mirostat.start(mine)
    alone = sample_rows(
        logits[None].copy(), [mine], [np.random.default_rng(9)], None, [alone_state]
    )
    state = Mirostat.start(mine)
    rows = np.stack([-logits, logits])
    params = [SamplingParams(temperature=0.7), mine]
    rngs = [np.random.default_rng(1), np.random.default_rng(9)]
    mixed = sample_rows(rows, params, rngs, None, [None, state])
    assert mixed.tokens[1] == alone.tokens[0]
    assert state is not None and alone_state is not None and state.mu == alone_state.mu
