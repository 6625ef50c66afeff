"""Logprobs in the two response formats, and the text offsets they carry.

The engine scores tokens (`TokenLogprob`); here a choice's scored tokens become
OpenAI's legacy object (`logprobs: N`) or the `{"content": [...]}` one
(`logprobs: true`). Token strings are the token's bytes decoded with
replacement, so a token that ends inside a multi-byte character still shows.
Prompt tokens render control tokens as their text (`<|im_start|>`), as the
echoed prompt does; generated ones render them empty, as the generated text does.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from typing_extensions import TypedDict

from fireside.api.protocol import LogprobsFormat
from fireside.api.scalars import Byte, Count, Logprob, TokenId
from fireside.engine.types import TokenLogprob

# JSON has no -inf (a fully masked token in the raw logits); vLLM reports -9999 too.
_MIN_LOGPROB = -9999.0


class LegacyLogprobs(TypedDict):
    """`logprobs: N`. Per position: the token, its logprob (null for the first prompt
    token), the sampled token with up to N alternatives, and its offset in `text`."""

    tokens: list[str]
    token_logprobs: list[Logprob | None]
    top_logprobs: list[dict[str, Logprob] | None]
    text_offset: list[Count]
    token_ids: list[TokenId]


class TopLogprob(TypedDict):
    token: str
    logprob: Logprob
    token_id: TokenId
    bytes: list[Byte]


class ContentLogprob(TypedDict):
    token: str
    bytes: list[Byte]
    logprob: Logprob | None
    sampling_logprob: Logprob | None
    token_id: TokenId
    text_offset: Count
    top_logprobs: list[TopLogprob]


class ContentLogprobs(TypedDict):
    """`logprobs: true`."""

    content: list[ContentLogprob]


@dataclass(frozen=True)
class Position:
    """One token of a choice, as its logprobs report it."""

    token_id: int
    scores: TokenLogprob | None  # None: a prompt token nothing predicts (the first)
    text_offset: int  # characters of the choice's text before this token
    special: bool = False  # a prompt token: control tokens render as their text


class TokenTexts:
    """Bytes and strings of token ids, cached per request: alternatives repeat a lot."""

    def __init__(self, token_bytes: Callable[..., bytes]) -> None:
        self._token_bytes = token_bytes  # (token_id, special=False) -> bytes
        self._cache: dict[tuple[int, bool], tuple[bytes, str]] = {}

    def _get(self, token_id: int, special: bool) -> tuple[bytes, str]:
        entry = self._cache.get((token_id, special))
        if entry is None:
            data = self._token_bytes(token_id, special) if special else self._token_bytes(token_id)
            entry = (data, data.decode("utf-8", errors="replace"))
            self._cache[(token_id, special)] = entry
        return entry

    def bytes_of(self, token_id: int, special: bool = False) -> bytes:
        return self._get(token_id, special)[0]

    def text_of(self, token_id: int, special: bool = False) -> str:
        return self._get(token_id, special)[1]


class OffsetCounter:
    """Characters before each token of a text, counted from the tokens' bytes.

    The count is what decoding all previous bytes with errors="ignore" gives: a
    token that ends inside a multi-byte character adds nothing until a later
    token completes it. Incremental, so a long output costs one pass.
    """

    def __init__(self, start: int = 0) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self.num_chars = start

    def add(self, data: bytes) -> int:
        """The offset of a token with these bytes; then counts them."""
        offset = self.num_chars
        self.num_chars += len(self._decoder.decode(data))
        return offset


def scored_positions(
    token_ids: Sequence[int],
    scores: Sequence[TokenLogprob | None],
    offsets: OffsetCounter,
    texts: TokenTexts,
    limit: int | None = None,
    special: bool = False,
) -> list[Position]:
    """Positions of consecutive tokens; offsets past `limit` are clamped to it.

    `special`: prompt tokens, whose control tokens render as their text.
    """
    positions = []
    for token_id, score in zip(token_ids, scores, strict=True):
        offset = offsets.add(texts.bytes_of(token_id, special))
        if limit is not None:
            offset = min(offset, limit)
        positions.append(Position(token_id, score, offset, special))
    return positions


def logprobs_dict(
    fmt: LogprobsFormat,
    positions: Sequence[Position],
    texts: TokenTexts,
    num_top: int,
    limit: int,
    shift: int = 0,
) -> LegacyLogprobs | ContentLogprobs:
    """The logprobs object of some positions of a choice.

    Offsets are moved back by `shift` (the echo, for a text without it) and
    clamped to `limit`, the length of the text they index, so that they always
    point into it: a stop string left out of the text can end past it.
    """
    offsets = [min(max(p.text_offset - shift, 0), limit) for p in positions]
    if fmt is LogprobsFormat.LEGACY:
        return _legacy(positions, offsets, texts, num_top)
    return _content(positions, offsets, texts, num_top)


def _legacy(
    positions: Sequence[Position], offsets: list[int], texts: TokenTexts, num_top: int
) -> LegacyLogprobs:
    top_logprobs: list[dict[str, float] | None] = []
    for p in positions:
        if p.scores is None:
            top_logprobs.append(None)
            continue
        top = {texts.text_of(i, p.special): _finite(lp) for i, lp in p.scores.top[:num_top]}
        # The sampled token is always there, so a dict has up to num_top + 1 entries. It
        # wins a key two ids share (partial characters render alike): clients read top[token].
        top[texts.text_of(p.token_id, p.special)] = _finite(p.scores.logprob)
        top_logprobs.append(top)
    return {
        "tokens": [texts.text_of(p.token_id, p.special) for p in positions],
        "token_logprobs": [
            None if p.scores is None else _finite(p.scores.logprob) for p in positions
        ],
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
        "token_ids": [p.token_id for p in positions],
    }


def _content(
    positions: Sequence[Position], offsets: list[int], texts: TokenTexts, num_top: int
) -> ContentLogprobs:
    content: list[ContentLogprob] = []
    for p, offset in zip(positions, offsets, strict=True):
        scores = p.scores
        sampling = None if scores is None else scores.sampling_logprob
        content.append(
            {
                "token": texts.text_of(p.token_id, p.special),
                "bytes": list(texts.bytes_of(p.token_id, p.special)),
                "logprob": None if scores is None else _finite(scores.logprob),
                "sampling_logprob": None if sampling is None else _finite(sampling),
                "token_id": p.token_id,
                "text_offset": offset,
                "top_logprobs": [
                    {
                        "token": texts.text_of(i, p.special),
                        "logprob": _finite(lp),
                        "token_id": i,
                        "bytes": list(texts.bytes_of(i, p.special)),
                    }
                    for i, lp in (scores.top[:num_top] if scores is not None else ())
                ],
            }
        )
    return {"content": content}


def _finite(logprob: float) -> float:
    if logprob != logprob:  # NaN is not JSON either; never expected, never sent
        return _MIN_LOGPROB
    return max(logprob, _MIN_LOGPROB)
