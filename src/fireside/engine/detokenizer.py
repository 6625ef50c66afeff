"""Incremental detokenization with stop strings.

Token bytes go through an incremental UTF-8 decoder, so a character split
across tokens is released only once whole. Stop strings are searched in the
text, not the tokens, so a stop that spans token boundaries is found. While
streaming, text that might be the start of a stop string is held back until
the next tokens decide it.
"""

from __future__ import annotations

import codecs


class Detokenizer:
    def __init__(self, stop: tuple[str, ...] = (), include_stop: bool = True) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._stop = stop
        self._include_stop = include_stop
        self._max_stop = max((len(s) for s in stop), default=0)
        self.text = ""
        self._released = 0
        self.stopped = False

    def add(self, piece: bytes) -> bool:
        """Append one token's bytes; True when a stop string has been found."""
        new = self._decoder.decode(piece)
        if not new:
            return False
        search_from = max(0, len(self.text) - self._max_stop + 1)
        self.text += new
        if self._stop:
            return self._find_stop(search_from)
        return False

    def _find_stop(self, search_from: int) -> bool:
        best: tuple[int, int] | None = None
        for s in self._stop:
            at = self.text.find(s, search_from)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, len(s))
        if best is None:
            return False
        at, length = best
        self.text = self.text[: at + length if self._include_stop else at]
        self.stopped = True
        return True

    def finish(self) -> None:
        """No more tokens: release any incomplete character as a replacement."""
        if not self.stopped:
            self.text += self._decoder.decode(b"", final=True)

    def pop_text(self, final: bool) -> str:
        """Text not yet released, now released; a possible stop-string prefix is held
        back unless final."""
        end = len(self.text) if final or self.stopped else len(self.text) - self._held()
        if end <= self._released:
            return ""
        out = self.text[self._released : end]
        self._released = end
        return out

    def _held(self) -> int:
        if not self._max_stop:
            return 0
        text = self.text
        for k in range(min(self._max_stop - 1, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0
