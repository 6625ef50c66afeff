"""Cluster mode against one server on the same cores (issue 16).

    python benchmarks/cluster.py [--cores 2] [--only SETUP ...] [--no-hop] [--out F]
                                 [--workloads prefixes unique "8 prefixes"] [--prefix-cache N]

Three setups, one at a time, fresh, on the embedded model, the cores split the
same way: one `fireside serve --threads C`; `--replicas C --threads 1` with the
prefix-aware router; the same with Ray Serve's power-of-two router. Workloads
(`fireside bench`, streamed):

- prefixes: 4 shared 300-word prefixes, 64 requests in a shuffled order, each
  with its own 20-word tail, 32 tokens out, 8 at once;
- unique: the `fireside bench` default prompts (200 words), 32 tokens out, 32
  requests, 8 at once;
- 8 prefixes: as prefixes with 8 of them, for `--prefix-cache 4`: more than
  one replica's cache holds, where routing by prefix should pay.

Then what the Ray hop costs: one server with --threads 1 against one replica
with --threads 1 (`--replicas 1`), one request at a time: TTFT of a 1-token
answer to a 4-word prompt (the per-request cost), and the inter-token gap of a
64-token answer (the per-token cost). Needs `pip install 'fireside[ray]'`.
Not run by the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys

from compare_llama_server import start, stop  # same folder

from fireside.bench import Workload, run
from fireside.models import default_model_path

PREFIXES = Workload(
    concurrency=8, requests=64, prompt_tokens=20, shared_prefix_tokens=300, prefixes=4,
    output_tokens=32,
)  # fmt: skip
WORKLOADS = {
    "prefixes": PREFIXES,
    "unique": Workload(concurrency=8, requests=32, output_tokens=32),
    # More prefixes than one replica's cache holds (run with --prefix-cache 4).
    "8 prefixes": dataclasses.replace(PREFIXES, prefixes=8),
}


def setups(cores: int) -> dict[str, tuple[int, tuple[str, ...]]]:
    """name -> (threads, extra flags)"""
    return {
        "one server": (cores, ()),
        "cluster, prefix router": (1, ("--replicas", str(cores), "--router", "prefix")),
        "cluster, pow2 router": (1, ("--replicas", str(cores), "--router", "pow2")),
    }


def measure(threads: int, extra: tuple[str, ...], workloads: dict[str, Workload]) -> dict:
    proc, url = start("fireside-same-file", str(default_model_path()), threads, 16, extra=extra)
    try:
        # One short request first: the replicas' first steps (and Ray's first calls)
        # are not what a long-running cluster pays.
        asyncio.run(run(url, "bench", Workload(concurrency=2, requests=4, output_tokens=2)))
        return {name: asyncio.run(run(url, "bench", w)).summary() for name, w in workloads.items()}
    finally:
        stop(proc)


def hop() -> dict:
    tiny = Workload(concurrency=1, requests=20, prompt_tokens=4, output_tokens=1)
    long = Workload(concurrency=1, requests=4, prompt_tokens=20, output_tokens=64)
    out = {}
    for name, extra in (("one server", ()), ("one replica", ("--replicas", "1"))):
        out[name] = measure(1, extra, {"tiny": tiny, "long": long})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--only", nargs="+", choices=["one", "prefix", "pow2"])
    ap.add_argument("--no-hop", action="store_true", help="skip the Ray hop measurement")
    ap.add_argument(
        "--workloads", nargs="+", choices=list(WORKLOADS), default=["prefixes", "unique"]
    )
    ap.add_argument("--prefix-cache", type=int, default=None, help="every server's --prefix-cache")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    common = () if args.prefix_cache is None else ("--prefix-cache", str(args.prefix_cache))
    workloads = {name: WORKLOADS[name] for name in args.workloads}
    chosen = {
        name: setup
        for name, setup in setups(args.cores).items()
        if not args.only or any(word in name for word in args.only)
    }
    results = {
        name: measure(t, (*extra, *common), workloads) for name, (t, extra) in chosen.items()
    }
    if not args.no_hop:
        results["hop"] = hop()
    print(json.dumps(results, indent=1))
    print()
    print("| setup | workload | requests/s | TTFT p50 | TTFT p90 | output tok/s | cached tokens |")
    print("|---|---|---|---|---|---|---|")
    for name in chosen:
        for wname, s in results[name].items():
            print(
                f"| {name} | {wname} | {s['requests_s']} | {s['ttft_s']['p50']:.2f} s | "
                f"{s['ttft_s']['p90']:.2f} s | {s['output_tok_s']} | "
                f"{s['cached_tokens']} of {s['prompt_tokens']} |"
            )
    if args.no_hop:
        return 0
    h = results["hop"]
    for key in ("one server", "one replica"):
        tiny, long = h[key]["tiny"], h[key]["long"]
        print(
            f"{key}: tiny TTFT p50 {tiny['ttft_s']['p50'] * 1000:.1f} ms, "
            f"64-token ITL p50 {long['itl_ms']['p50']} ms"
        )
    extra_ms = h["one replica"]["tiny"]["ttft_s"]["p50"] - h["one server"]["tiny"]["ttft_s"]["p50"]
    itl = h["one replica"]["long"]["itl_ms"]["p50"] - h["one server"]["long"]["itl_ms"]["p50"]
    print(f"the Ray hop: +{extra_ms * 1000:.1f} ms per request, +{itl:.2f} ms per token")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
