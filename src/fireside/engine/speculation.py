"""Speculative decoding: the tokens a sample guesses it will generate next.

A sample with a `Drafter` may check a few guessed tokens (a draft) in the step
that computes its last token. The scheduler puts the draft after that token in
the batch, with logits at every position (`Scheduler._add_drafts`); the step
samples the positions in order with the normal sampler and keeps the tokens up
to and including the first one that differs from the draft
(`StepExecutor._verify`); the rejected positions' cells are removed in
`Scheduler.postprocess`. A position is sampled only once every token before it
is accepted, with the same generator draw, penalties and grammar state as
without a draft, so a draft changes how many tokens a step makes and never
which (up to the batch shape's float effects that any batch has).

Drafts come from two sources, in this order:

- the request's prediction (`EngineRequest.speculation`: what the caller
  expects the output to be), followed as long as the output agrees with it and
  realigned by n-gram matching when the output leaves it and comes back (an
  edited word in a copied passage);
- with `--speculate auto`, prompt lookup: the last few tokens found earlier in
  the prompt or the output, and what followed them there. Only while few
  samples run: a large batch keeps the cores busy without drafts.

A source whose drafts are mostly rejected stops drafting for that sample, and
each source's draft length adapts to what was accepted (grows while drafts
are accepted whole, falls back after a rejection), so a wrong guess costs
little more than a token of batch.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from enum import Enum

from fireside.engine.types import SpeculationCounts

MAX_DRAFT = 16  # most draft tokens one sample checks in a step
NGRAM_SIZES = (3, 2)  # the n-grams matched, longest first
_LOOKUP_START = 4  # first prompt-lookup draft length: a guess is cheap to try, costly to overdo
# A source is judged once it has drafted this many tokens; below the rate it stops.
_MIN_JUDGED = 24
_MIN_ACCEPTANCE = 0.3


@dataclass(frozen=True)
class SpeculationConfig:
    """No defaults: `server.py` fills it from `config.ServeConfig` (through `EngineConfig`)."""

    auto: bool  # prompt lookup for every sample; `--speculate auto`
    auto_max_running: int  # prompt lookup only while at most this many samples run
    max_draft: int  # MAX_DRAFT


class Source(Enum):
    PREDICTION = "prediction"
    LOOKUP = "lookup"


@dataclass
class _SourceState:
    length: int  # the next draft's length (before the step's own limits)
    drafted: int = 0
    accepted: int = 0
    enabled: bool = True

    def judge(self, drafted: int, accepted: int, max_draft: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        if accepted == drafted:
            self.length = min(max_draft, 2 * self.length)
        else:
            self.length = max(1, accepted + 1)
        if self.drafted >= _MIN_JUDGED and self.accepted < _MIN_ACCEPTANCE * self.drafted:
            self.enabled = False


class _NgramIndex:
    """Where each n-gram of a token list ends (the index after it), appended to as
    the list grows."""

    def __init__(self) -> None:
        self.ends: dict[int, dict[tuple[int, ...], list[int]]] = {n: {} for n in NGRAM_SIZES}
        self.num_indexed = 0  # tokens of the list indexed so far

    def extend(self, tokens: list[int] | tuple[int, ...]) -> None:
        for end in range(self.num_indexed + 1, len(tokens) + 1):
            for n, ends in self.ends.items():
                if end >= n:
                    ends.setdefault(tuple(tokens[end - n : end]), []).append(end)
        self.num_indexed = len(tokens)

    def find(self, key: tuple[int, ...]) -> list[int]:
        return self.ends[len(key)].get(key, [])


@dataclass
class Drafter:
    """One sample's drafts. The engine thread calls `propose` when the sample decodes
    and `verified` once the step has checked what was proposed."""

    prediction: tuple[int, ...]  # the output the caller expects; () for none
    num_prompt: int
    max_tokens: int
    context_length: int
    config: SpeculationConfig
    _at: int | None = 0  # the prediction's next token, while the output follows it
    _hint: int = 0  # where the output left the prediction: realign near it
    _num_followed: int = 0  # output tokens the prediction pointer has seen
    _prediction_index: _NgramIndex | None = None
    _lookup_index: _NgramIndex | None = None
    _sources: dict[Source, _SourceState] = field(default_factory=dict)
    _proposed: Source | None = None  # the source of the draft being checked

    def __post_init__(self) -> None:
        if not self.prediction:
            self._at = None
        self._sources = {
            Source.PREDICTION: _SourceState(self.config.max_draft, enabled=bool(self.prediction)),
            Source.LOOKUP: _SourceState(
                min(_LOOKUP_START, self.config.max_draft), enabled=self.config.auto
            ),
        }

    # -- the engine's calls ------------------------------------------------

    def propose(self, tokens: list[int], limit: int, num_running: int) -> tuple[int, ...]:
        """A draft of at most `limit` tokens to follow `tokens` (the sample's prompt and
        output), or () for none. Never more than the sample may still generate."""
        num_output = len(tokens) - self.num_prompt
        # The token sampled after the draft comes too: leave room for it.
        limit = min(
            limit,
            self.config.max_draft,
            self.max_tokens - num_output - 1,
            self.context_length - len(tokens) - 1,
        )
        self._proposed = None
        if limit <= 0 or num_output <= 0:
            return ()
        prediction = self._sources[Source.PREDICTION]
        if prediction.enabled:
            draft = self._from_prediction(tokens, min(limit, prediction.length))
            if draft:
                self._proposed = Source.PREDICTION
                return draft
        lookup = self._sources[Source.LOOKUP]
        if lookup.enabled and num_running <= self.config.auto_max_running:
            draft = self._from_lookup(tokens, min(limit, lookup.length))
            if draft:
                self._proposed = Source.LOOKUP
                return draft
        return ()

    def verified(self, drafted: int, accepted: int) -> None:
        """The step checked the last proposal: `accepted` of its `drafted` tokens are
        in the output now."""
        if self._proposed is not None:
            self._sources[self._proposed].judge(drafted, accepted, self.config.max_draft)
            self._proposed = None

    @property
    def counts(self) -> SpeculationCounts:
        prediction, lookup = self._sources[Source.PREDICTION], self._sources[Source.LOOKUP]
        return SpeculationCounts(
            prediction_tokens=len(self.prediction),
            # A realigned prediction may offer a token twice: never report more than it has.
            prediction_matched=min(prediction.accepted, len(self.prediction)),
            draft_tokens=prediction.drafted + lookup.drafted,
            accepted_tokens=prediction.accepted + lookup.accepted,
        )

    # -- the sources -------------------------------------------------------

    def _from_prediction(self, tokens: list[int], limit: int) -> tuple[int, ...]:
        """The prediction's tokens after the output's place in it."""
        prediction = self.prediction
        output_start = self.num_prompt
        for token in tokens[output_start + self._num_followed :]:
            if (
                self._at is not None
                and self._at < len(prediction)
                and prediction[self._at] == token
            ):
                self._at += 1
            elif self._at is not None:
                self._hint = self._at + 1  # most edits replace a word: expect the rest after it
                self._at = None
        self._num_followed = len(tokens) - output_start
        if self._at is None:
            self._at = self._realign(tokens[output_start:])
        if self._at is None:
            return ()
        return prediction[self._at : self._at + limit]

    def _realign(self, output: list[int]) -> int | None:
        """Where the prediction goes on after the output's last tokens, if they occur in it
        (the place nearest after where the output left it, else the nearest before)."""
        if self._prediction_index is None:
            self._prediction_index = _NgramIndex()
            self._prediction_index.extend(self.prediction)
        for n in NGRAM_SIZES:
            if len(output) < n:
                continue
            ends = self._prediction_index.find(tuple(output[-n:]))  # ascending
            # An n-gram at the prediction's very end has nothing after it to draft.
            usable = bisect.bisect_left(ends, len(self.prediction))
            if usable:
                after = bisect.bisect_left(ends, self._hint, hi=usable)
                return ends[after] if after < usable else ends[usable - 1]
        return None

    def _from_lookup(self, tokens: list[int], limit: int) -> tuple[int, ...]:
        """What followed the latest earlier occurrence of the last tokens."""
        if self._lookup_index is None:
            self._lookup_index = _NgramIndex()
        index = self._lookup_index
        index.extend(tokens)
        for n in NGRAM_SIZES:
            if len(tokens) <= n:
                continue
            # Ascending; the last one is the occurrence at the very end, the one to continue.
            ends = index.find(tuple(tokens[-n:]))
            if len(ends) > 1:
                end = ends[-2]
                draft = tokens[end : end + limit]
                # Image positions (negative placeholders) are not tokens to guess.
                if any(t < 0 for t in draft):
                    draft = draft[: next(i for i, t in enumerate(draft) if t < 0)]
                return tuple(draft)
        return ()
