"""What `--deterministic` costs (issue 17).

    python benchmarks/deterministic.py [--threads 2] [--out F]

One fresh server at a time on the embedded model: the default (prompt lookup
on), the default with `--speculate off` (the mode has no drafts, so this is the
cost of batch invariance alone), and `--deterministic`; all with `--prefix-cache
4`. `fireside bench`'s workload (200-word prompts, 128 tokens out) at
concurrency 1 (8 requests) and 16 (32 requests). Prints output tok/s and TTFT
p50 of each, and the mode against both. Not run by the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from compare_llama_server import start, stop  # same folder

from fireside.bench import Workload, run
from fireside.models import default_model_path

SETUPS = {
    "default": ("--prefix-cache", "4"),
    "default, --speculate off": ("--prefix-cache", "4", "--speculate", "off"),
    "--deterministic": ("--prefix-cache", "4", "--deterministic"),
}
LOADS = {"c=1": Workload(concurrency=1, requests=8), "c=16": Workload(concurrency=16, requests=32)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results: dict[str, dict] = {}
    for name, extra in SETUPS.items():
        # The mode gives each of 132 sequence ids its own cells: 1,024 each.
        ctx = 132 * 1024 if "--deterministic" in extra else 16384
        proc, url = start(
            "fireside-same-file", str(default_model_path()), args.threads, 16, ctx, extra
        )
        try:
            results[name] = {
                k: asyncio.run(run(url, "bench", w)).summary() for k, w in LOADS.items()
            }
        finally:
            stop(proc)
    print(json.dumps(results, indent=1))
    print("| setup | c=1 tok/s | c=1 TTFT p50 | c=16 tok/s | c=16 TTFT p50 |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['c=1']['output_tok_s']} | {r['c=1']['ttft_s']['p50']:.3f} s | "
            f"{r['c=16']['output_tok_s']} | {r['c=16']['ttft_s']['p50']:.2f} s |"
        )
    mode = results["--deterministic"]
    for base in ("default", "default, --speculate off"):
        b = results[base]
        one = mode["c=1"]["output_tok_s"] / b["c=1"]["output_tok_s"]
        many = mode["c=16"]["output_tok_s"] / b["c=16"]["output_tok_s"]
        print(f"--deterministic / {base}: c=1 {one:.3f}, c=16 {many:.3f} (output tok/s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
