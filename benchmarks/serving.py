"""Output tok/s and time to first token of a running server, against raw batched llama_decode.

    python benchmarks/serving.py --url http://127.0.0.1:8000 --concurrency 1 4 16
    python benchmarks/serving.py --raw --concurrency 1 4 16 --threads 2

Prompts are ~200 tokens, 128 output tokens, ignore_eos, streaming.
`--logprobs N` asks for N alternatives per token; `--echo` (with --logprobs)
also scores every prompt token, as evaluation harnesses do; `--json` constrains
the output to STORY_SCHEMA, long enough that generations run to max_tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx

# At least eight paragraphs: the grammar stays open for all 128 tokens.
STORY_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "paragraphs": {"type": "array", "items": {"type": "string"}, "minItems": 8},
    },
    "required": ["title", "paragraphs"],
}
PROMPT = "Write a long story about a lighthouse keeper named {i}. " * 18  # ~200 tokens


async def _one(c, model, i, max_tokens, extra):
    t0 = time.perf_counter()
    first = None
    n = p = 0
    body = {
        "model": model,
        "prompt": PROMPT.format(i=i),
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0,
        **extra,
    }
    async with c.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                ev = json.loads(line[6:])
                if ev.get("choices") and first is None:
                    first = time.perf_counter() - t0
                if "usage" in ev:
                    n = ev["usage"]["completion_tokens"]
                    p = ev["usage"]["prompt_tokens"]
    return first, n, p


async def serve_bench(url, model, conc, max_tokens, extra):
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(_one(c, model, i, max_tokens, extra) for i in range(conc)))
        wall = time.perf_counter() - t0
    toks = sum(n for _, n, _ in res)
    prompt_toks = sum(p for _, _, p in res)
    return toks / wall, statistics.median(f for f, _, _ in res), prompt_toks / wall


def raw_bench(conc, max_tokens, threads):
    import numpy as np

    from fireside.models import default_model_path
    from fireside.runner.base import Batch
    from fireside.runner.llamacpp import LlamaCppConfig, LlamaCppRunner

    r = LlamaCppRunner(LlamaCppConfig(str(default_model_path()), n_threads=threads))
    prompts = [r.tokenize(PROMPT.format(i=i)) for i in range(conc)]
    t0 = time.perf_counter()
    last = []
    for s, p in enumerate(prompts):  # prefill each prompt in one call
        b = Batch()
        for pos, t in enumerate(p):
            b.add(t, pos, s, pos == len(p) - 1)
        last.append(int(np.argmax(r.forward(b)[0])))
    ttft = time.perf_counter() - t0
    for step in range(max_tokens - 1):
        b = Batch()
        for s, p in enumerate(prompts):
            b.add(last[s], len(p) + step, s, True)
        last = [int(x) for x in np.argmax(r.forward(b), axis=1)]
    wall = time.perf_counter() - t0
    r.close()
    return conc * max_tokens / wall, ttft


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--raw", action="store_true", help="raw batched llama_decode, no server")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--logprobs", type=int, default=None, help="alternatives per token")
    ap.add_argument("--echo", action="store_true", help="echo the prompt (scored with --logprobs)")
    ap.add_argument("--json", action="store_true", help="constrain output to STORY_SCHEMA")
    a = ap.parse_args()
    extra = {}
    if a.logprobs is not None:
        extra["logprobs"] = a.logprobs
    if a.echo:
        extra["echo"] = True
    if a.json:
        extra["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "story", "schema": STORY_SCHEMA},
        }
    for conc in a.concurrency:
        if a.raw:
            tps, ttft = raw_bench(conc, a.max_tokens, a.threads)
            print(f"raw    concurrency {conc:3d}: {tps:7.1f} tok/s, prefill {ttft:.2f}s")
        else:
            tps, ttft, pps = asyncio.run(serve_bench(a.url, a.model, conc, a.max_tokens, extra))
            print(
                f"served concurrency {conc:3d}: {tps:7.1f} output tok/s, TTFT p50 {ttft:.2f}s, "
                f"{pps:7.1f} prompt tok/s"
            )


if __name__ == "__main__":
    main()
