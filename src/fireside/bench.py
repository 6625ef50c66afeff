"""`fireside bench`: a load generator for any OpenAI-compatible completions endpoint.

    fireside bench --url http://127.0.0.1:8000 --concurrency 16 --requests 32 \\
        --prompt-tokens 200 --output-tokens 128
    fireside bench --url ... --shared-prefix-tokens 1000 --prompt-tokens 30 --concurrency 8

Every request streams (one event per token on the servers measured here) and
sets ignore_eos, so each produces exactly --output-tokens. `--logprobs N`,
`--echo` (prompt scoring) and `--constrained` (a JSON schema) measure what
those features cost. Prompts are built
from common English words, about one token each; the tokens really sent are
reported from the servers' usage when they give it. Reports output tok/s,
requests/s, time to first token and inter-token latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from fireside.config import ServeConfig
from fireside.models import DEFAULT_MODEL_NAME

_WORDS = (
    "the of and to in is was for on that with as by at from his her they this "
    "have had one all were we when there can an your which their said if do will "
    "each about how up out them then she many some so these would other into has "
    "more two like him see time could no make than first been its who now people "
    "my made over did down only way find use may water long little very after "
    "words called just where most know get through back much before go good new "
    "write our used me man too any day same right look think also around another "
    "came come work three word must because does part even place well such here"
).split()


# At least eight paragraphs: a constrained generation stays open for 128 tokens.
STORY_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "paragraphs": {"type": "array", "items": {"type": "string"}, "minItems": 8},
    },
    "required": ["title", "paragraphs"],
}


@dataclass
class Workload:
    concurrency: int = 16
    requests: int = 32
    prompt_tokens: int = 200  # per request (after the shared prefix, if any)
    shared_prefix_tokens: int = 0
    prefixes: int = 1  # distinct shared prefixes, one per request in a shuffled order
    output_tokens: int = 128
    n: int = 1
    ignore_eos: bool = True
    temperature: float = 0.0
    seed: int = 0  # of the prompt text
    extra: dict[str, Any] = field(default_factory=dict)  # more request fields (logprobs...)
    chat: bool = False  # each prompt as one user message to /v1/chat/completions
    texts: tuple[str, ...] = ()  # the prompts themselves, instead of generated ones

    def prompts(self) -> list[str]:
        if self.texts:
            return list(self.texts)
        rng = random.Random(self.seed)
        prefixes = [
            " ".join(rng.choice(_WORDS) for _ in range(self.shared_prefix_tokens))
            for _ in range(max(1, self.prefixes))
        ]
        # Each prefix as often as the others, in an order no router can predict.
        which = [i % len(prefixes) for i in range(self.requests)]
        if len(prefixes) > 1:
            rng.shuffle(which)
        out = []
        for i in range(self.requests):
            words = [rng.choice(_WORDS) for _ in range(self.prompt_tokens)]
            tail = f"Request {i}: " + " ".join(words)
            prefix = prefixes[which[i]]
            out.append(f"{prefix} {tail}" if prefix else tail)
        return out


@dataclass
class _Result:
    ttft: float = 0.0
    gaps: list[float] = field(default_factory=list)  # seconds between token events
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None


@dataclass
class Report:
    workload: Workload
    wall: float
    results: list[_Result]

    @property
    def ok(self) -> list[_Result]:
        return [r for r in self.results if r.error is None]

    @property
    def output_tokens_per_s(self) -> float:
        return sum(r.completion_tokens for r in self.ok) / self.wall

    def summary(self) -> dict[str, Any]:
        ok = self.ok
        ttfts = [r.ttft for r in ok]
        gaps = [g for r in ok for g in r.gaps]
        return {
            "requests": len(self.results),
            "errors": len(self.results) - len(ok),
            "wall_s": round(self.wall, 2),
            "output_tok_s": round(self.output_tokens_per_s, 1),
            "requests_s": round(len(ok) / self.wall, 3),
            "prompt_tokens": sum(r.prompt_tokens for r in ok),
            "cached_tokens": sum(r.cached_tokens for r in ok),
            "completion_tokens": sum(r.completion_tokens for r in ok),
            "ttft_s": _percentiles(ttfts),
            "itl_ms": {k: round(v * 1000, 1) for k, v in _percentiles(gaps).items()},
            "first_error": next((r.error for r in self.results if r.error), None),
        }


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "p50": round(statistics.median(ordered), 3),
        "p90": round(at(0.9), 3),
        "p99": round(at(0.99), 3),
    }


async def _one(client: httpx.AsyncClient, model: str, prompt: str, w: Workload) -> _Result:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": w.output_tokens,
        "temperature": w.temperature,
        "ignore_eos": w.ignore_eos,
        "n": w.n,
        "stream": True,
        "stream_options": {"include_usage": True},
        **w.extra,
    }
    if w.chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    path = "/v1/chat/completions" if w.chat else "/v1/completions"
    result = _Result()
    started = time.perf_counter()
    last = None
    events = 0
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                usage = event.get("usage")
                if usage:
                    result.completion_tokens = usage.get("completion_tokens", 0)
                    result.prompt_tokens = usage.get("prompt_tokens", 0)
                    details = usage.get("prompt_tokens_details") or {}
                    result.cached_tokens = details.get("cached_tokens") or 0
                if any(_text_of(c) for c in event.get("choices") or ()):
                    now = time.perf_counter()
                    events += 1
                    if last is None:
                        result.ttft = now - started
                    else:
                        result.gaps.append(now - last)
                    last = now
    except httpx.HTTPError as exc:
        result.error = repr(exc)
        return result
    if not result.completion_tokens:  # no usage in the stream: one event per token
        result.completion_tokens = events
    return result


def _text_of(choice: dict[str, Any]) -> str:
    """A streamed choice's new text: a completion's `text`, a chat delta's `content`."""
    if "delta" in choice:
        return str(choice["delta"].get("content") or "")
    return str(choice.get("text") or "")


async def run(url: str, model: str, w: Workload, api_key: str | None = None) -> Report:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # A fresh connection per request: a server closing an idle keep-alive connection
    # just as a request goes out would otherwise show up as a failed request.
    limits = httpx.Limits(max_connections=w.concurrency + 4, max_keepalive_connections=0)
    prompts = w.prompts()
    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: list[_Result] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            results.append(await _one(client, model, queue.get_nowait(), w))

    async with httpx.AsyncClient(
        base_url=url, timeout=httpx.Timeout(3600), headers=headers, limits=limits
    ) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(w.concurrency)))
        wall = time.perf_counter() - started
    return Report(w, wall, results)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d, served = Workload(), ServeConfig()  # by default, `fireside serve` with no flags
    parser.add_argument(
        "--url",
        default=f"http://{served.host}:{served.port}",
        help="the server's base URL (before /v1)",
    )
    parser.add_argument(
        "--model", default=DEFAULT_MODEL_NAME, help="the `model` each request names"
    )
    parser.add_argument("--api-key", default=None, help="a Bearer key, if the server wants one")
    parser.add_argument(
        "--concurrency", type=int, default=d.concurrency, help="requests in flight at once"
    )
    parser.add_argument("--requests", type=int, default=d.requests, help="requests in all")
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=d.prompt_tokens,
        help="words per prompt after the shared prefix (common words: about a token each)",
    )
    parser.add_argument(
        "--shared-prefix-tokens",
        type=int,
        default=d.shared_prefix_tokens,
        help="words every prompt starts with (exercises a prefix cache)",
    )
    parser.add_argument(
        "--prefixes",
        type=int,
        default=d.prefixes,
        help="distinct shared prefixes (of --shared-prefix-tokens words), each on an "
        "equal share of the requests in a shuffled order",
    )
    parser.add_argument(
        "--output-tokens",
        type=int,
        default=d.output_tokens,
        help="max_tokens of each request (exactly this many with --ignore-eos)",
    )
    parser.add_argument("--n", type=int, default=d.n, help="samples per request (`n`)")
    parser.add_argument(
        "--temperature", type=float, default=d.temperature, help="sampling temperature"
    )
    parser.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=d.ignore_eos,
        help="generate past the end of text (--no-ignore-eos: stop there)",
    )
    parser.add_argument(
        "--logprobs", type=int, default=None, help="ask for logprobs, with N alternatives per token"
    )
    parser.add_argument(
        "--echo", action="store_true", help="echo the prompt (scored too, with --logprobs)"
    )
    parser.add_argument(
        "--constrained",
        action="store_true",
        help="constrain the output to a JSON schema (response_format, STORY_SCHEMA)",
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="send each prompt as a user message to /v1/chat/completions",
    )
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")


def main(args: argparse.Namespace) -> int:
    extra: dict[str, Any] = {}
    if args.logprobs is not None:
        extra["logprobs"] = args.logprobs
    if args.echo:
        extra["echo"] = True
    if args.constrained:
        extra["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "story", "schema": STORY_SCHEMA},
        }
    w = Workload(
        concurrency=args.concurrency,
        requests=args.requests,
        prompt_tokens=args.prompt_tokens,
        shared_prefix_tokens=args.shared_prefix_tokens,
        prefixes=args.prefixes,
        output_tokens=args.output_tokens,
        n=args.n,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        extra=extra,
        chat=args.chat,
    )
    report = asyncio.run(run(args.url, args.model, w, args.api_key))
    summary = report.summary()
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:>18}: {value}")
    if summary["errors"]:
        first = next(r.error for r in report.results if r.error)
        print(f"first error: {first}", file=sys.stderr)
        return 1
    return 0
