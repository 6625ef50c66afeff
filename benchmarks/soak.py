"""Soak test: minutes of mixed load against a fresh server; no unexpected errors,
and resident memory that stops growing.

    python benchmarks/soak.py --minutes 10 --clients 24

Each client loops over a mix: streamed and plain completions, logprobs with echo,
JSON mode, n > 1, clients that hang up mid-stream, and bad requests (which must
be 4xx). The server's RSS is sampled every 5 s from /proc. Prints a summary;
exits non-zero on any unexpected status or if memory still grows in the last
third of the run by more than 5%.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import subprocess
import sys
import time
from collections import Counter

import httpx

MODEL = "SmolLM2-135M-Instruct"


def start_server(threads: int) -> tuple[subprocess.Popen, str]:
    cmd = [
        sys.executable,
        "-m",
        "fireside",
        "serve",
        "--port",
        "0",
        "--threads",
        str(threads),
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            import threading

            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, m.group(1)
    raise RuntimeError("server did not start")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Stats:
    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.unexpected: list[str] = []
        self.open = 0
        self.peak_open = 0

    def opened(self) -> None:
        self.open += 1
        self.peak_open = max(self.peak_open, self.open)

    def closed(self) -> None:
        self.open -= 1


async def one(c: httpx.AsyncClient, rng: random.Random, st: Stats) -> None:
    kind = rng.choice(["stream", "plain", "logprobs", "json", "n", "leave", "bad", "bad"])
    body: dict = {
        "model": MODEL,
        "prompt": f"Note {rng.randint(0, 10**6)}: the",
        "max_tokens": rng.randint(4, 48),
        "temperature": rng.choice([0, 0.7, 1.0]),
    }
    expect = {200}
    if kind == "logprobs":
        body.update(logprobs=rng.randint(0, 5), echo=True)
    elif kind == "json":
        body.update(response_format={"type": "json_object"}, max_tokens=48)
    elif kind == "n":
        body.update(n=rng.randint(2, 4))
    elif kind == "bad":
        body = rng.choice(
            [
                {"model": MODEL, "prompt": "x", "temperature": 9},
                {"model": MODEL, "prompt": [], "max_tokens": 1},
                {"model": MODEL, "prompt": "x", "logprobs": 6},
                {"model": "nope", "prompt": "x"},
                {
                    "model": MODEL,
                    "prompt": "x",
                    "response_format": {"type": "grammar", "grammar": "root ::= ("},
                },
            ]
        )
        expect = {400, 404}
    st.opened()
    try:
        if kind in ("stream", "leave"):
            body["stream"] = True
            async with c.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code not in expect:
                    st.unexpected.append(f"{kind}: {r.status_code}")
                    return
                n = 0
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and "error" in json.loads(line[6:]):
                        st.unexpected.append(f"{kind}: error event {line[:200]}")
                    n += 1
                    if kind == "leave" and n >= rng.randint(1, 6):
                        break
        else:
            r = await c.post("/v1/completions", json=body)
            if r.status_code not in expect and r.status_code != 429:
                st.unexpected.append(f"{kind}: {r.status_code} {r.text[:200]}")
        st.outcomes[kind] += 1
    except httpx.HTTPError as exc:
        st.unexpected.append(f"{kind}: {exc!r}")
    finally:
        st.closed()


async def soak(url: str, pid: int, minutes: float, clients: int) -> tuple[Stats, list]:
    st = Stats()
    samples: list[tuple[float, float]] = []
    deadline = time.monotonic() + minutes * 60

    async def client(i: int) -> None:
        rng = random.Random(i)
        async with httpx.AsyncClient(base_url=url, timeout=300) as c:
            while time.monotonic() < deadline:
                await one(c, rng, st)

    async def sampler() -> None:
        start = time.monotonic()
        while time.monotonic() < deadline:
            samples.append((time.monotonic() - start, rss_mb(pid)))
            await asyncio.sleep(5)

    await asyncio.gather(sampler(), *(client(i) for i in range(clients)))
    return st, samples


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--clients", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    proc, url = start_server(a.threads)
    try:
        st, samples = asyncio.run(soak(url, proc.pid, a.minutes, a.clients))
        healthy = httpx.get(f"{url}/health").status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
    finally:
        proc.terminate()
        code = proc.wait(timeout=60)
    third = max(1, len(samples) // 3)
    late = [m for _, m in samples[-third:]]
    growth = (max(late) - min(late)) / max(min(late), 1)
    print(f"requests by kind: {dict(st.outcomes)} (total {sum(st.outcomes.values())})")
    print(f"unexpected: {len(st.unexpected)} {st.unexpected[:5]}")
    print(f"peak concurrent connections: {st.peak_open}")
    print(
        f"RSS MB: start {samples[0][1]:.0f}, peak {max(m for _, m in samples):.0f}, "
        f"end {samples[-1][1]:.0f}; last-third spread {growth * 100:.1f}%"
    )
    running = re.search(r"^fireside:num_requests_running\{[^}]*\} (\S+)", metrics, re.M)
    print(
        f"healthy after: {healthy}; running after: {running and running.group(1)}; exit code {code}"
    )
    return 0 if not st.unexpected and healthy and growth < 0.05 and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
