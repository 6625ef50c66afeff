"""Which batch properties change a sequence's logits (issue 17), with the runner alone.

    python benchmarks/batch_invariance.py [--threads 1] [--flash-attn on|off|both]
                                          [--kv unified|split|both]

One target sequence (a ~100-token prompt, then greedy decode steps) is computed
in a fresh llama.cpp context alone: the reference. Then the same target is
computed again under one changed property at a time, and its logits (at the
prompt's last position and after 8 decode steps) are compared with the
reference's, bitwise and as the largest difference of a log-probability:

- rows: each decode step of the target shares its micro-batch with N other
  sequences' decode rows (N = 1, 3, 7, 15, 31, 63);
- prefill neighbours: the target's prompt shares its micro-batch with another
  sequence's prompt tokens (before it, and after it);
- own chunks: the target's prompt computed in chunks of 16, 37 and 64 tokens;
- KV placement: another sequence's cells computed (and removed, leaving a hole)
  before the target's, so the target's cells sit elsewhere in the unified cache;
- prefix fork: the target's first 64 prompt tokens computed by another sequence
  and shared with `seq_cp`, as the prefix cache and `n` > 1 do;
- KV offset: the target's cells start after S cells of another sequence
  (S = 8, 32, 64, 256), with no hole;
- flash attention on against off;
- `--kv split`: all of it again with llama.cpp's non-unified KV cache, where each
  sequence id has its own stream of cells, starting at cell 0 (`kv_unified`
  false; forks across streams copy the whole stream).

Prints a table. Each case runs in a fresh context, so nothing but the property
differs. Not run by the tests (tests/e2e/test_batch_invariance.py checks the
mode that this table motivates, where there is one).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fireside.models import default_model_path
from fireside.runner.base import Batch
from fireside.runner.llamacpp import LlamaCppConfig, LlamaCppRunner

TEXT = (
    "The lighthouse stood at the edge of the cliff, its lamp turning slowly through the fog. "
    "Every night the keeper climbed the stairs, trimmed the wick and polished the great lens. "
    "Ships passed far out at sea, and none of their crews ever knew his name, but each of them "
    "steered by the light he kept. In winter the storms came in from the west."
)
OTHER = "A recipe for bread: flour, water, salt and yeast, mixed, kneaded and left to rise. " * 3
DECODE_STEPS = 8
TARGET = 0  # the target's sequence id


@dataclass
class Trace:
    """The target's logits at the prompt's end and after each decode step."""

    rows: list[np.ndarray]


def logprobs(row: np.ndarray) -> np.ndarray:
    x = row.astype(np.float64)
    return x - (np.log(np.exp(x - x.max()).sum()) + x.max())


N_SEQ = 80
SPLIT_CELLS = 512  # cells per sequence id with --kv split


class Case:
    def __init__(self, threads: int, flash_attn: bool, unified: bool = True) -> None:
        n_ctx = 4096 if unified else N_SEQ * SPLIT_CELLS
        config = LlamaCppConfig(
            str(default_model_path()),
            n_ctx,
            512,
            N_SEQ,
            threads,
            flash_attn,
            None,
            0,
            kv_unified=unified,
        )
        self.unified = unified
        self.runner = LlamaCppRunner(config)
        self.prompt = self.runner.tokenize(TEXT)
        self.other = self.runner.tokenize(OTHER)

    def close(self) -> None:
        self.runner.close()

    def prefill(self, chunks: list[list[tuple[int, int, int, bool]]]) -> np.ndarray | None:
        """Run batches of (token, position, seq, want_logits); the target's last row
        (None when the batches hold no target row)."""
        last = None
        for chunk in chunks:
            batch = Batch()
            for token, pos, seq, want in chunk:
                batch.add(token, pos, seq, want)
            out = self.runner.forward(batch)
            rows = [i for i, (_, _, seq, want) in enumerate(chunk) if want]
            for r, i in enumerate(rows):
                if chunk[i][2] == TARGET:
                    last = out[r].copy()
        return last

    def decode(self, first: np.ndarray, neighbours: int = 0) -> list[np.ndarray]:
        """Greedy decode steps of the target, each with `neighbours` other sequences'
        decode rows in the same micro-batch (their own short prompts computed first)."""
        for n in range(neighbours):
            seq = 1 + n
            self.prefill([[(t, p, seq, False) for p, t in enumerate(self.other[:8])]])
        rows, row = [], first
        position = len(self.prompt)
        for step in range(DECODE_STEPS):
            token = int(np.argmax(row))
            batch = Batch()
            batch.add(token, position + step, TARGET, True)
            for n in range(neighbours):
                batch.add(self.other[(step + n) % len(self.other)], 8 + step, 1 + n, True)
            row = self.runner.forward(batch)[0].copy()
            rows.append(row)
        return rows

    def whole_prompt(self, seq: int = TARGET) -> list[tuple[int, int, int, bool]]:
        last = len(self.prompt) - 1
        return [(t, p, seq, p == last) for p, t in enumerate(self.prompt)]


def reference(c: Case) -> Trace:
    first = c.prefill([c.whole_prompt()])
    return Trace([first, *c.decode(first)])


def with_rows(n: int) -> Callable[[Case], Trace]:
    def run(c: Case) -> Trace:
        first = c.prefill([c.whole_prompt()])
        return Trace([first, *c.decode(first, neighbours=n)])

    return run


def prefill_neighbour(before: bool) -> Callable[[Case], Trace]:
    def run(c: Case) -> Trace:
        other = [(t, p, 1, False) for p, t in enumerate(c.other)]
        mine = c.whole_prompt()
        first = c.prefill([other + mine if before else mine + other])
        return Trace([first, *c.decode(first)])

    return run


def own_chunks(size: int) -> Callable[[Case], Trace]:
    def run(c: Case) -> Trace:
        mine = c.whole_prompt()
        first = c.prefill([mine[i : i + size] for i in range(0, len(mine), size)])
        return Trace([first, *c.decode(first)])

    return run


def kv_hole(c: Case) -> Trace:
    c.prefill([[(t, p, 1, p == len(c.other) - 1) for p, t in enumerate(c.other)]])
    c.runner.seq_remove(1)  # a hole at the start of the cache: the target's cells go there
    c.prefill([[(t, p, 2, p == 7) for p, t in enumerate(c.other[:8])]])
    first = c.prefill([c.whole_prompt()])
    return Trace([first, *c.decode(first)])


def kv_offset(cells: int) -> Callable[[Case], Trace]:
    def run(c: Case) -> Trace:
        filler = (c.other * (cells // len(c.other) + 1))[:cells]
        c.prefill([[(t, p, 1, p == cells - 1) for p, t in enumerate(filler)]])
        first = c.prefill([c.whole_prompt()])
        return Trace([first, *c.decode(first)])

    return run


def prefix_fork(c: Case) -> Trace:
    shared = 64
    c.prefill([[(t, p, 1, p == shared - 1) for p, t in enumerate(c.prompt[:shared])]])
    if c.unified:
        c.runner.seq_copy(1, TARGET, 0, shared)
    else:  # across streams llama.cpp copies whole sequences only
        c.runner.seq_copy(1, TARGET, -1, -1)
    rest = c.whole_prompt()[shared:]
    first = c.prefill([rest])
    return Trace([first, *c.decode(first)])


def compare(a: Trace, b: Trace) -> tuple[bool, float, int | None]:
    """(bitwise equal, largest |logprob difference|, first step whose argmax differs)."""
    equal = all(np.array_equal(x, y) for x, y in zip(a.rows, b.rows, strict=True))
    worst = max(
        float(np.max(np.abs(logprobs(x) - logprobs(y))))
        for x, y in zip(a.rows, b.rows, strict=True)
    )
    flips = [
        i
        for i, (x, y) in enumerate(zip(a.rows, b.rows, strict=True))
        if int(np.argmax(x)) != int(np.argmax(y))
    ]
    return equal, worst, (flips[0] if flips else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--flash-attn", choices=["on", "off", "both"], default="both")
    ap.add_argument("--kv", choices=["unified", "split", "both"], default="unified")
    a = ap.parse_args()
    modes = {"on": [True], "off": [False], "both": [True, False]}[a.flash_attn]
    kvs = {"unified": [True], "split": [False], "both": [True, False]}[a.kv]
    cases: list[tuple[str, Callable[[Case], Trace]]] = [
        ("same again (control)", reference),
        *[(f"decode rows: +{n} other sequences", with_rows(n)) for n in (1, 3, 7, 15, 31, 63)],
        ("prefill: another prompt before it in the batch", prefill_neighbour(True)),
        ("prefill: another prompt after it in the batch", prefill_neighbour(False)),
        *[(f"own prompt in chunks of {n}", own_chunks(n)) for n in (16, 37, 64)],
        ("KV placement: cells after a hole", kv_hole),
        *[(f"KV offset: cells start after {n} others", kv_offset(n)) for n in (8, 32, 64, 256)],
        ("prefix fork: first 64 tokens via seq_cp", prefix_fork),
    ]
    print(
        "| KV | flash attn | property | bitwise equal | max dlogprob (top 20) | first argmax flip |"
    )
    print("|---|---|---|---|---|---|")
    refs = {}
    for unified in kvs:
        kv = "unified" if unified else "split"
        for fa in modes:
            c = Case(a.threads, fa, unified)
            refs[fa] = reference(c)
            c.close()
            for name, run in cases:
                c = Case(a.threads, fa, unified)
                got = run(c)
                c.close()
                equal, worst, flip = compare(refs[fa], got)
                print(
                    f"| {kv} | {'on' if fa else 'off'} | {name} | {'yes' if equal else 'no'} | "
                    f"{worst:.2e} | {'-' if flip is None else flip} |",
                    flush=True,
                )
        if len(refs) == 2:
            equal, worst, flip = compare(refs[True], refs[False])
            print(
                f"| {kv} | on vs off | flash attention itself | {'yes' if equal else 'no'} | "
                f"{worst:.2e} | {'-' if flip is None else flip} |"
            )


if __name__ == "__main__":
    main()
