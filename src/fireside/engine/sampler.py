"""Choosing the next token from logits rows, and scoring tokens.

The pipeline for one row is: logit_bias, then penalties (repetition,
frequency, presence), then temperature, then the truncations in the order
Hugging Face applies them (top_k, top_p, min_p, typical_p), then Mirostat 2.0
when asked for, then one draw. (llama.cpp's own sampler chain also puts
temperature before Mirostat, but skips the other truncations under Mirostat;
here a request gets every one it asked for.)

Each path costs only what it uses. Greedy rows are one vectorised arg-max;
rows with plain temperature share one vectorised softmax and cumulative sum;
only rows that truncate the distribution are handled one by one. Every
sampled row draws one uniform number from its sequence's own generator, and
no row's arithmetic depends on the other rows, so a seeded request gives the
same text whatever else shares the batch.

Logprobs are computed from the raw rows (`logprobs_of`), before any of this.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fireside.engine.types import SamplingParams

# The nucleus almost always lies within the most likely few hundred tokens;
# sorting only those instead of the whole vocabulary is ~50x cheaper. When the
# pool holds less than top_p of the mass we fall back to a full sort, so the
# result is exact either way.
_NUCLEUS_POOL = 1024
_BLOCK = 256  # two-level inverse-CDF sampling: blocks of this many tokens
_SCORE_BLOCK = 8  # logits rows scored at a time
_FINITE = float(np.finfo(np.float32).max) / 4  # penalised logits stay well inside float32


@dataclass
class History:
    """The tokens penalties look at, for one row."""

    prompt_unique: np.ndarray  # distinct prompt token ids (repetition penalty only)
    output: Sequence[int]  # generated tokens so far


@dataclass
class Mirostat:
    """One sample's Mirostat 2.0 state (Basu et al. 2021; llama.cpp's mirostat_v2).

    Each draw keeps the tokens whose surprise, -log2 p, is at most `mu` (at least
    the most likely one), renormalises, draws, then moves `mu` by the error of the
    chosen token's surprise against the target tau: `mu -= eta * (observed - tau)`.
    As in llama.cpp, `observed` is measured under the renormalised distribution,
    the one actually drawn from.
    """

    mu: float  # bits

    @classmethod
    def start(cls, params: SamplingParams) -> Mirostat | None:
        """The state for a new sample: mu = 2 tau; None when Mirostat is off."""
        target = params.mirostat_target
        return None if target is None else cls(2.0 * target)

    def keep(self, probs: np.ndarray) -> np.ndarray:
        """Indices of the tokens whose surprise is at most mu, in index order."""
        with np.errstate(divide="ignore"):
            surprise = -np.log2(probs)
        keep = np.flatnonzero(surprise <= self.mu)
        return keep if keep.size else np.array([int(np.argmax(probs))])

    def update(self, prob: float, params: SamplingParams) -> None:
        """After drawing a token of probability `prob` (renormalised, so > 0)."""
        target = params.mirostat_target
        if target is not None:
            self.mu -= params.mirostat_lr * (-math.log2(prob) - target)


@dataclass
class Sampled:
    tokens: list[int]
    # log-probability of each token under the distribution it was drawn from
    # (0 for greedy rows, whose distribution is a point mass)
    sampling_logprobs: list[float]


def sample_rows(
    logits: np.ndarray,
    params: Sequence[SamplingParams],
    rngs: Sequence[np.random.Generator],
    histories: Sequence[History | None] | None = None,
    mirostat: Sequence[Mirostat | None] | None = None,
) -> Sampled:
    """One token per row of `logits` ([rows, vocab] float32, modified in place).

    Rows with `mirostat_target` need their sample's `Mirostat` state in
    `mirostat`, which each draw updates (greedy rows leave it alone).
    """
    num_rows = len(params)
    states = list(mirostat) if mirostat is not None else [None] * num_rows
    for p, state in zip(params, states, strict=True):
        if p.mirostat_target is not None and state is None and not p.is_greedy:
            raise ValueError("a Mirostat row needs its sample's Mirostat state")
    tokens = [0] * num_rows
    sampling_logprobs = [0.0] * num_rows
    for i, p in enumerate(params):
        if p.logit_bias or p.has_penalties:
            history = histories[i] if histories is not None else None
            process_row(logits[i], p, history)
            if not np.isfinite(logits[i]).any():  # nothing left to choose from: keep the raw row
                logits[i] = 0.0

    greedy = [i for i, p in enumerate(params) if p.is_greedy]
    if greedy:
        for i, t in zip(greedy, np.argmax(logits[greedy], axis=1), strict=True):
            tokens[i] = int(t)

    plain = [
        i
        for i, p in enumerate(params)
        if not p.is_greedy and not p.truncates and p.mirostat_target is None
    ]
    if plain:
        temps = np.array([params[i].temperature for i in plain], dtype=np.float32)
        x = logits[plain] / temps[:, None]
        x -= x.max(axis=1, keepdims=True)
        np.exp(x, out=x)
        picks = _draw_rows(x, [rngs[i].random() for i in plain])
        for r, i in enumerate(plain):
            tokens[i], sampling_logprobs[i] = picks[r]

    for i, p in enumerate(params):
        if p.is_greedy or not (p.truncates or p.mirostat_target is not None):
            continue
        probs, ids = filtered_distribution(logits[i], p)
        state = states[i]
        if state is not None:  # the last cut, on what the others left
            keep = state.keep(probs)
            probs = probs[keep] / probs[keep].sum()
            ids = keep if ids is None else ids[keep]
        j = _draw(np.cumsum(probs), rngs[i].random())
        tokens[i] = int(ids[j]) if ids is not None else j
        sampling_logprobs[i] = float(np.log(probs[j]))
        if state is not None:
            state.update(float(probs[j]), p)
    return Sampled(tokens, sampling_logprobs)


def _draw_rows(weights: np.ndarray, us: list[float]) -> list[tuple[int, float]]:
    """Inverse-CDF draws from unnormalised weight rows: (token, its log-probability).

    A cumulative sum over the whole vocabulary is the slow part of sampling, so it
    is done in two levels: over block sums, then within the one block drawn.
    """
    num_rows, vocab = weights.shape
    full = vocab - vocab % _BLOCK
    sums = weights[:, :full].reshape(num_rows, -1, _BLOCK).sum(axis=2, dtype=np.float64)
    if full < vocab:
        tail = weights[:, full:].sum(axis=1, dtype=np.float64)
        sums = np.concatenate([sums, tail[:, None]], axis=1)
    block_cdf = np.cumsum(sums, axis=1)
    picks = []
    for r, u in enumerate(us):
        total = block_cdf[r, -1]
        target = u * total
        b = min(int(np.searchsorted(block_cdf[r], target, side="right")), block_cdf.shape[1] - 1)
        while sums[r, b] == 0.0 and b > 0:  # rounding can land past the last weighted block
            b -= 1
        before = block_cdf[r, b - 1] if b else 0.0
        block = weights[r, b * _BLOCK : (b + 1) * _BLOCK]
        j = b * _BLOCK + _draw(np.cumsum(block, dtype=np.float64), (target - before) / sums[r, b])
        picks.append((j, float(np.log(weights[r, j] / total))))
    return picks


def _draw(cdf: np.ndarray, u: float) -> int:
    """Inverse-CDF draw: the first index whose cumulative mass exceeds u * total."""
    j = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    return min(j, cdf.size - 1)  # u * total can round up to the last edge


def process_row(row: np.ndarray, params: SamplingParams, history: History | None) -> None:
    """Apply logit_bias and penalties to one row of logits, in place."""
    if params.logit_bias:
        ids = np.fromiter((t for t, _ in params.logit_bias), dtype=np.int64)
        values = np.fromiter((b for _, b in params.logit_bias), dtype=np.float32)
        np.add.at(row, ids, values)
    if history is None or not params.has_penalties:
        return
    output = np.asarray(history.output, dtype=np.int64)
    if params.repetition_penalty != 1.0:
        seen = np.union1d(history.prompt_unique, output)
        values = row[seen].astype(np.float64)
        penalty = params.repetition_penalty
        penalized = np.where(values > 0, values / penalty, values * penalty)
        # A tiny penalty divides past float32's range: keep the ordering, stay finite.
        row[seen] = np.clip(penalized, -_FINITE, _FINITE)
    if output.size and (params.frequency_penalty or params.presence_penalty):
        ids, counts = np.unique(output, return_counts=True)
        row[ids] -= counts * np.float32(params.frequency_penalty) + np.float32(
            params.presence_penalty
        )


def filtered_distribution(
    logits: np.ndarray, params: SamplingParams
) -> tuple[np.ndarray, np.ndarray | None]:
    """The distribution sampled from: (probabilities, token ids or None for all).

    Probabilities are normalised and in float64; ids map them back to tokens.
    """
    x = logits.astype(np.float64) / params.temperature
    ids: np.ndarray | None = None
    k = params.top_k
    if 0 < k < x.size:
        ids = np.argpartition(x, -k)[-k:]
        x = x[ids]
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    for keep_of in (_top_p_keep, _min_p_keep, _typical_keep):
        keep = keep_of(probs, params)
        if keep is not None:
            probs = probs[keep]
            probs /= probs.sum()
            ids = keep if ids is None else ids[keep]
    return probs, ids


def _top_p_keep(probs: np.ndarray, params: SamplingParams) -> np.ndarray | None:
    if params.top_p >= 1.0:
        return None
    return _nucleus(probs, params.top_p)


def _min_p_keep(probs: np.ndarray, params: SamplingParams) -> np.ndarray | None:
    """Tokens at least min_p times as likely as the most likely one."""
    if params.min_p <= 0.0:
        return None
    return np.flatnonzero(probs >= params.min_p * probs.max())


def _typical_keep(probs: np.ndarray, params: SamplingParams) -> np.ndarray | None:
    """Locally typical sampling: the tokens whose surprise is closest to the entropy,
    fewest first, until their mass reaches typical_p."""
    if params.typical_p >= 1.0:
        return None
    with np.errstate(divide="ignore"):
        surprise = -np.log(probs)
    finite = np.isfinite(surprise)
    entropy = float(np.sum(probs[finite] * surprise[finite]))
    order = np.argsort(np.abs(surprise - entropy), kind="stable")
    cum = np.cumsum(probs[order])
    cut = int(np.searchsorted(cum, params.typical_p, side="left")) + 1
    return order[: min(cut, order.size)]


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Indices of the smallest most-likely set whose mass reaches top_p, most likely first."""
    pool = np.arange(probs.size)
    for size in (_NUCLEUS_POOL, 8 * _NUCLEUS_POOL):
        if probs.size > size:
            candidates = np.argpartition(probs, -size)[-size:]
            if probs[candidates].sum() >= top_p:
                pool = candidates
                break
    order = pool[np.argsort(-probs[pool], kind="stable")]
    cum = np.cumsum(probs[order])
    cut = int(np.searchsorted(cum, top_p, side="left")) + 1
    return order[: min(cut, order.size)]


def logprobs_of(
    rows: np.ndarray, targets: Sequence[int], num_top: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Log-softmax scores of raw logits rows ([k, vocab] float32).

    Returns (the target token's logprob per row [k], the ids of the num_top most
    likely tokens per row, most likely first [k, num_top], and their logprobs).
    Rows go in small blocks: a whole prompt's worth of temporaries (hundreds of
    MB of fresh pages for exp and argpartition) cost more than the arithmetic.
    """
    k, vocab = rows.shape
    num_top = max(0, min(num_top, vocab))
    target_lp = np.empty(k)
    top = np.empty((k, num_top), dtype=np.int64)
    top_lp = np.empty((k, num_top))
    target_ids = np.asarray(targets, dtype=np.int64)
    for lo in range(0, k, _SCORE_BLOCK):
        hi = min(lo + _SCORE_BLOCK, k)
        block = rows[lo:hi]
        peak = block.max(axis=1)
        shifted = np.exp(block - peak[:, None])
        lse = peak.astype(np.float64) + np.log(shifted.sum(axis=1, dtype=np.float64))
        target_lp[lo:hi] = block[np.arange(hi - lo), target_ids[lo:hi]] - lse
        if num_top:
            ids = np.argpartition(block, -num_top, axis=1)[:, -num_top:]
            values = np.take_along_axis(block, ids, axis=1)
            order = np.argsort(-values, axis=1, kind="stable")
            top[lo:hi] = np.take_along_axis(ids, order, axis=1)
            top_lp[lo:hi] = np.take_along_axis(values, order, axis=1) - lse[:, None]
    return target_lp, top, top_lp
