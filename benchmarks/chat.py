"""What chat costs over completions on the same rendered prompts (issue 15).

    python benchmarks/chat.py --threads 2 [--rounds 2] [--out chat.json]

One fresh Fireside server on the embedded model. Each prompt (the `fireside
bench` workload: ~200 words, 128 tokens out, ignore_eos) is sent as a user
message to /v1/chat/completions, and its rendered prompt (read back through
`raw_output`) to /v1/completions: the same tokens through both endpoints, so
the difference is the template, the message checks and the chat-shaped SSE.
Each task is sent once with max_tokens 1 before timing, so both endpoints find
every prompt in the prefix cache alike. Concurrency 1 (8 requests) and 16 (32
requests); the endpoints alternate, `--rounds` times. Prints output tok/s and
TTFT p50 of each, and chat / completions. Not run by the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys

import httpx
from compare_llama_server import start, stop  # same folder

from fireside.bench import Workload, run
from fireside.models import default_model_path

MODEL = "bench"


def rendered(url: str, texts: list[str]) -> list[str]:
    out = []
    for text in texts:
        r = httpx.post(
            f"{url}/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": text}],
                "max_tokens": 1,
                "raw_output": True,
            },
            timeout=600,
        )
        r.raise_for_status()
        out.append(r.json()["choices"][0]["raw_output"]["prompt_fragments"][0])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    proc, url = start("fireside-same-file", str(default_model_path()), args.threads, 16)
    results: dict[str, list[dict]] = {}
    try:
        for concurrency, requests in ((1, 8), (16, 32)):
            base = Workload(concurrency=concurrency, requests=requests)
            texts = base.prompts()
            prompts = rendered(url, texts)  # also warms the cache with every prompt
            cases = {
                "completions": Workload(concurrency=concurrency, texts=tuple(prompts)),
                "chat": Workload(concurrency=concurrency, texts=tuple(texts), chat=True),
            }
            for _ in range(args.rounds):
                for name, w in cases.items():
                    summary = asyncio.run(run(url, MODEL, w)).summary()
                    if summary["errors"]:
                        raise RuntimeError(f"{name}: {summary['first_error']}")
                    results.setdefault(f"{name} c={concurrency}", []).append(summary)
                    print(
                        f"c={concurrency:>2} {name:>11}: {summary['output_tok_s']:7.1f} tok/s  "
                        f"TTFT p50 {summary['ttft_s']['p50']:.3f}s",
                        flush=True,
                    )
    finally:
        stop(proc)
    print()
    for concurrency in (1, 16):
        chat_runs = results[f"chat c={concurrency}"]
        comp_runs = results[f"completions c={concurrency}"]
        tok = statistics.mean(r["output_tok_s"] for r in chat_runs) / statistics.mean(
            r["output_tok_s"] for r in comp_runs
        )
        ttft = statistics.mean(r["ttft_s"]["p50"] for r in chat_runs) / statistics.mean(
            r["ttft_s"]["p50"] for r in comp_runs
        )
        print(f"c={concurrency:>2}: chat / completions: tok/s {tok:.3f}, TTFT p50 {ttft:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
