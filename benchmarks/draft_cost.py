"""What a draft costs: raw `llama_decode` time of one sequence's step with k tokens.

    python benchmarks/draft_cost.py --threads 2

Speculative decoding (issue 14) checks a draft of k tokens in one step of k + 1
tokens. With every draft token kept, a step makes k + 1 tokens in t(k + 1), so
the best speedup over plain decoding is (k + 1) * t(1) / t(k + 1). This prints
t(k) for the embedded model on this machine, through Fireside's own runner and
nothing else (no engine, no HTTP), at a context of ~250 tokens (the grounded
benchmark's). Not run by the tests.
"""

from __future__ import annotations

import argparse
import statistics
import time

from fireside.models import default_model_path
from fireside.runner.base import Batch
from fireside.runner.llamacpp import LlamaCppConfig, LlamaCppRunner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=250)
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    config = LlamaCppConfig(
        str(default_model_path()), 4096, 512, 4, a.threads, False, None, -1, False
    )
    runner = LlamaCppRunner(config)
    prompt = runner.tokenize("The lighthouse stood at the edge of the cliff. " * 40)[: a.context]
    batch = Batch()
    for i, t in enumerate(prompt):
        batch.add(t, i, 0, i == len(prompt) - 1)
    runner.forward(batch)
    base = None
    print(f"{'k':>3} {'t(k) ms':>8} {'per token':>9} {'best speedup (k-1 drafted)':>27}")
    for k in (1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 17, 24, 32):
        times = []
        for _ in range(a.repeats):
            step = Batch()
            for j in range(k):
                step.add(prompt[j % len(prompt)], len(prompt) + j, 0, True)
            started = time.perf_counter()
            runner.forward(step)
            times.append(time.perf_counter() - started)
            runner.seq_remove(0, len(prompt), -1)
        t = statistics.median(times)
        base = base or t
        print(f"{k:>3} {t * 1000:8.2f} {t * 1000 / k:9.2f} {k * base / t:27.2f}")
    runner.close()


if __name__ == "__main__":
    main()
