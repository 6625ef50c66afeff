"""Choosing the next token from logits rows.

Greedy rows are one vectorised arg-max. Sampled rows draw one uniform number
per token from their sequence's own generator, so a seeded request gives the
same text whatever else shares the batch.
"""

from __future__ import annotations

import numpy as np

from fireside.engine.types import SamplingParams

# The nucleus almost always lies within the most likely few hundred tokens;
# sorting only those instead of the whole vocabulary is ~50x cheaper. When the
# pool holds less than top_p of the mass we fall back to a full sort, so the
# result is exact either way.
_NUCLEUS_POOL = 1024


def sample_rows(
    logits: np.ndarray, params: list[SamplingParams], rngs: list[np.random.Generator]
) -> list[int]:
    """One token per row of `logits` ([rows, vocab] float32)."""
    tokens = [0] * len(params)
    greedy = [i for i, p in enumerate(params) if p.is_greedy]
    if greedy:
        picks = np.argmax(logits[greedy], axis=1)
        for i, t in zip(greedy, picks, strict=True):
            tokens[i] = int(t)
    for i, p in enumerate(params):
        if not p.is_greedy:
            tokens[i] = sample_one(logits[i], p, rngs[i].random())
    return tokens


def filtered_distribution(
    logits: np.ndarray, params: SamplingParams
) -> tuple[np.ndarray, np.ndarray | None]:
    """The distribution sampled from: (probabilities, token ids or None for all)."""
    x = logits.astype(np.float64) / params.temperature
    ids: np.ndarray | None = None
    k = params.top_k
    if 0 < k < x.size:
        ids = np.argpartition(x, -k)[-k:]
        x = x[ids]
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        keep = _nucleus(probs, params.top_p)
        probs = probs[keep]
        probs /= probs.sum()
        ids = keep if ids is None else ids[keep]
    return probs, ids


def sample_one(logits: np.ndarray, params: SamplingParams, u: float) -> int:
    probs, ids = filtered_distribution(logits, params)
    cdf = np.cumsum(probs)
    j = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    j = min(j, probs.size - 1)  # u * total can round up to the last edge
    return int(ids[j]) if ids is not None else j


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Indices of the smallest most-likely set whose mass reaches top_p, most likely first."""
    if probs.size > _NUCLEUS_POOL:
        pool = np.argpartition(probs, -_NUCLEUS_POOL)[-_NUCLEUS_POOL:]
        if probs[pool].sum() < top_p:
            pool = np.arange(probs.size)
    else:
        pool = np.arange(probs.size)
    order = pool[np.argsort(-probs[pool], kind="stable")]
    cum = np.cumsum(probs[order])
    cut = int(np.searchsorted(cum, top_p, side="left")) + 1
    return order[: min(cut, order.size)]
