"""Fake runners for unit tests of the engine and scheduler (never evidence about a model)."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

import numpy as np

from fireside.config import ServeConfig
from fireside.engine.engine import EngineConfig
from fireside.engine.kv import KVLedger
from fireside.runner.base import Batch, KVCacheFull


class FakeRunner:
    """Logits that always favour token 7; cells counted per sequence id, without sharing."""

    vocab_size = 50
    n_ctx = 64
    n_ctx_seq = 64
    kv_unified = True
    n_ctx_train = 64
    n_batch = 32
    n_seq_max = 8
    add_bos = False
    n_threads = 1
    media = None  # no vision projector

    def __init__(self) -> None:
        self.cells: dict[int, set[int]] = {}

    def grammar_tokenizer(self) -> None:
        return None  # no constrained output

    def tokenize(self, text: str) -> list[int]:
        return [3 + ord(c) % 40 for c in text]

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        return b"x"

    def is_eog(self, token: int) -> bool:
        return token == 0

    def detokenize(self, token_ids, special: bool = False) -> str:
        return "x" * len(token_ids)

    def forward(self, batch: Batch) -> np.ndarray:
        assert 0 < len(batch) <= self.n_batch
        for pos, seq in zip(batch.positions, batch.seq_ids, strict=True):
            self.cells.setdefault(seq, set()).add(pos)
        used = len({(s, p) for s, ps in self.cells.items() for p in ps})
        assert used <= self.n_ctx * 2  # forks may share; the scheduler's own count is checked below
        logits = np.zeros((batch.num_logits, self.vocab_size), dtype=np.float32)
        logits[:, 7] = 1.0  # never end-of-generation
        return logits

    def seq_remove(self, seq_id: int, start: int = 0, end: int = -1) -> None:
        kept = {p for p in self.cells.get(seq_id, set()) if p < start or 0 <= end <= p}
        if kept:
            self.cells[seq_id] = kept
        else:
            self.cells.pop(seq_id, None)

    def seq_copy(self, src: int, dst: int, start: int, end: int) -> None:
        self.cells[dst] = {p for p in self.cells.get(src, set()) if start <= p < end}


class CellRunner:
    """Like llama.cpp's unified cache: cells tagged with sequence ids, shared by seq_cp,
    freed when their last id goes. The next token depends on every (position, token)
    the sequence can see, so a fork of the wrong length or from the wrong sequence
    changes the output. With `ledger` set, every batch first checks that the
    scheduler's count of used cells equals the cells really used.

    The logits put 10 on one token chosen by that hash (sampling at temperature 1
    picks it 99.7% of the time); with `spread`, every token gets a hash-seeded normal
    logit instead (a real distribution to sample from); with `copy_period` P, the
    favoured token is the one the sequence saw P positions before the next one, so
    outputs repeat their prompt and drafts that guess so are accepted.
    """

    vocab_size = 64
    n_ctx_train = 4096
    n_batch = 64
    n_seq_max = 64
    add_bos = False
    n_threads = 1
    media = None  # no vision projector

    def grammar_tokenizer(self) -> None:
        return None  # no constrained output

    def __init__(self, n_ctx: int = 512, spread: bool = False, copy_period: int = 0) -> None:
        self.n_ctx = n_ctx
        self.n_ctx_seq = n_ctx
        self.kv_unified = True
        self.spread = spread
        self.copy_period = copy_period
        self.cells: list[tuple[int, int, set[int]] | None] = [None] * n_ctx  # pos, token, seqs
        self.ledger: KVLedger | None = None  # checked against our cells before every batch

    @property
    def used(self) -> int:
        return sum(1 for c in self.cells if c is not None)

    def tokenize(self, text: str) -> list[int]:
        return [3 + ord(c) % 60 for c in text]

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        return b"x"

    def is_eog(self, token: int) -> bool:
        return False

    def detokenize(self, token_ids, special: bool = False) -> str:
        return "x" * len(token_ids)

    def forward(self, batch: Batch) -> np.ndarray:
        if self.ledger is not None:
            assert self.ledger.used == self.used, "ledger and cache disagree"
        free = [i for i, c in enumerate(self.cells) if c is None]
        if len(free) < len(batch):
            raise KVCacheFull()
        rows = []
        for i, (tok, pos, seq, want) in enumerate(
            zip(batch.tokens, batch.positions, batch.seq_ids, batch.want_logits, strict=True)
        ):
            self.cells[free[i]] = (pos, tok, {seq})
            if want:
                seen = sorted(
                    (p, t)
                    for c in self.cells
                    if c and seq in c[2] and c[0] <= pos
                    for p, t in [(c[0], c[1])]
                )
                rows.append(self._row(seen, pos))
        return np.array(rows, dtype=np.float32).reshape(len(rows), self.vocab_size)

    def _row(self, seen: list[tuple[int, int]], pos: int) -> np.ndarray:
        """The logits after position `pos`, from every (position, token) it sees."""
        assert [p for p, _ in seen] == list(range(pos + 1)), "a hole or a duplicate"
        digest = hashlib.sha256(repr(seen).encode()).digest()
        row = np.zeros(self.vocab_size, dtype=np.float32)
        copied = pos + 1 - self.copy_period
        if self.copy_period and copied >= 0 and seen[copied][1] >= 0:
            row[seen[copied][1]] = 10.0
        elif self.spread:
            rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
            row[:] = rng.normal(0.0, 1.5, self.vocab_size)
        else:
            row[3 + digest[0] % 60] = 10.0
        return row

    def seq_remove(self, seq_id: int, start: int = 0, end: int = -1) -> None:
        for i, c in enumerate(self.cells):
            if c is not None and seq_id in c[2] and start <= c[0] and (end < 0 or c[0] < end):
                c[2].discard(seq_id)
                if not c[2]:
                    self.cells[i] = None

    def positions(self, seq_id: int) -> list[int]:
        """The positions a sequence id can see, sorted (duplicates kept, to be caught)."""
        return sorted(c[0] for c in self.cells if c is not None and seq_id in c[2])

    def seq_copy(self, src: int, dst: int, start: int, end: int) -> None:
        for c in self.cells:
            if c is not None and src in c[2] and start <= c[0] < end:
                c[2].add(dst)


class StreamRunner(CellRunner):
    """Like llama.cpp without a unified cache: each sequence id has a stream of its own
    `n_ctx_seq` cells, and a copy between ids copies a whole stream (then drops what
    the destination should not have, as LlamaCppRunner.seq_copy does). Logits as in
    CellRunner. `passes` counts, per batch, the runs of consecutive sequence ids in
    the batch's order: llama.cpp computes a batch in one pass over the weights per run.
    """

    kv_unified = False

    def __init__(
        self, n_ctx_seq: int, n_seq_max: int, spread: bool = False, copy_period: int = 0
    ) -> None:
        super().__init__(n_ctx_seq * n_seq_max, spread, copy_period)
        self.n_ctx_seq = n_ctx_seq
        self.n_seq_max = n_seq_max
        self.kv_unified = False
        self.streams: list[dict[int, int]] = [{} for _ in range(n_seq_max)]  # pos -> token
        self.passes: list[int] = []

    @property
    def used(self) -> int:
        return sum(len(s) for s in self.streams)

    def forward(self, batch: Batch) -> np.ndarray:
        if self.ledger is not None:
            assert self.ledger.used == self.used, "ledger and cache disagree"
        ids = batch.seq_ids
        self.passes.append(
            1 + sum(1 for a, b in zip(ids, ids[1:], strict=False) if b not in (a, a + 1))
        )
        rows = []
        for tok, pos, seq, want in zip(
            batch.tokens, batch.positions, ids, batch.want_logits, strict=True
        ):
            stream = self.streams[seq]
            assert pos not in stream, "a position computed twice"
            if len(stream) >= self.n_ctx_seq:
                raise KVCacheFull()
            stream[pos] = tok
            if want:
                rows.append(self._row(sorted((p, t) for p, t in stream.items() if p <= pos), pos))
        return np.array(rows, dtype=np.float32).reshape(len(rows), self.vocab_size)

    def seq_remove(self, seq_id: int, start: int = 0, end: int = -1) -> None:
        stream = self.streams[seq_id]
        for p in [p for p in stream if start <= p and (end < 0 or p < end)]:
            del stream[p]

    def positions(self, seq_id: int) -> list[int]:
        return sorted(self.streams[seq_id])

    def seq_copy(self, src: int, dst: int, start: int, end: int) -> None:
        assert src != dst
        self.streams[dst] = {
            p: t for p, t in self.streams[src].items() if start <= p and (end < 0 or p < end)
        }


def engine_config(**overrides: Any) -> EngineConfig:
    """The engine settings `fireside serve` uses with no flags (from `ServeConfig`,
    through the server's own mapping), with `overrides`."""
    from fireside.server import engine_config as served

    return replace(served(ServeConfig()), **overrides)


def service_settings(**overrides: Any) -> dict[str, Any]:
    """`CompletionService` keyword arguments as `fireside serve` passes them with no
    flags (from `ServeConfig`), with `overrides`."""
    served = ServeConfig()
    settings: dict[str, Any] = {
        "default_max_tokens": served.default_max_tokens,
        "max_image_bytes": served.max_image_bytes,
        "max_waiting": served.max_waiting,
        "request_timeout_s": served.request_timeout,
        "include_stop_str_in_output": served.include_stop_str_in_output,
        "isolate_cache_per_key": served.prompt_cache_isolation == "per-key",
    }
    return settings | overrides
