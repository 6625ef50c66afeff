"""Decode step time with llama.cpp's unified KV cache against one stream per sequence
(issue 13's lead for the sweep's bend past 8 streams).

    python benchmarks/kv_layout.py [--threads 2] [--streams 16 64] [--steps 32]

With the runner alone on the embedded model: N sequences each prefill a
200-token prompt (one at a time), then decode together, one row each per step;
prints the mean time of a decode step in the unified cache (Fireside's default:
every row's attention walks the masked range of all sequences' cells) and
without it (`kv_unified=false`, llama-server's layout: each row sees only its
own stream). Not run by the tests.
"""

from __future__ import annotations

import argparse
import time

from fireside.models import default_model_path
from fireside.runner.base import Batch
from fireside.runner.llamacpp import LlamaCppConfig, LlamaCppRunner

PROMPT = 200
CELLS_PER_SEQ = 512


def step_ms(threads: int, streams: int, steps: int, unified: bool) -> float:
    config = LlamaCppConfig(
        str(default_model_path()),
        streams * CELLS_PER_SEQ,
        512,
        streams,
        threads,
        True,
        None,
        0,
        kv_unified=unified,
    )
    runner = LlamaCppRunner(config)
    try:
        for seq in range(streams):
            batch = Batch()
            for pos in range(PROMPT):
                batch.add(100 + (seq * 7 + pos) % 5000, pos, seq, pos == PROMPT - 1)
            runner.forward(batch)
        times = []
        for step in range(steps):
            batch = Batch()
            for seq in range(streams):
                batch.add(200 + (seq + step) % 5000, PROMPT + step, seq, True)
            started = time.perf_counter()
            runner.forward(batch)
            times.append(time.perf_counter() - started)
        return 1000 * sum(times[2:]) / len(times[2:])
    finally:
        runner.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--streams", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--steps", type=int, default=32)
    a = ap.parse_args()
    print("| streams | unified ms/step | per-sequence streams ms/step | unified / split |")
    print("|---|---|---|---|")
    for n in a.streams:
        u = step_ms(a.threads, n, a.steps, True)
        s = step_ms(a.threads, n, a.steps, False)
        print(f"| {n} | {u:.1f} | {s:.1f} | {u / s:.2f} |", flush=True)


if __name__ == "__main__":
    main()
