"""The server under overload, disconnects, shutdown and engine failure (real model)."""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import time

import httpx

from tests.e2e.conftest import MODEL


def stream_body(**extra):
    return {
        "model": MODEL,
        "prompt": "Tell me a story:",
        "max_tokens": 40,
        "stream": True,
        "ignore_eos": True,
        **extra,
    }


async def read_stream(c: httpx.AsyncClient, body: dict, started: asyncio.Event | None = None):
    """(finish_reason, saw [DONE], error) of one streamed completion."""
    finish, done, error = None, False, None
    async with c.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return None, False, r.status_code
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: {"):
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"]
                for ch in event.get("choices", []):
                    finish = ch["finish_reason"] or finish
                if started is not None:
                    started.set()
    return finish, done, error


def test_sigterm_lets_running_streams_finish_then_exits_0(start_server):
    server = start_server("--shutdown-grace", "60")
    url = server.url

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            events = [asyncio.Event() for _ in range(8)]
            tasks = [
                asyncio.create_task(read_stream(c, stream_body(seed=i), events[i]))
                for i in range(8)
            ]
            await asyncio.gather(*(e.wait() for e in events))
            server.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            try:  # a new request while draining: refused (503, or no connection at all)
                late = await c.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
                refused = late.status_code == 503
            except httpx.HTTPError:
                refused = True
            return await asyncio.gather(*tasks), refused

    results, refused = asyncio.run(main())
    assert results == [("length", True, None)] * 8
    assert refused
    assert server.wait(timeout=60) == 0


def test_a_dead_engine_fails_requests_fast_and_the_process_exits_non_zero(start_server):
    server = start_server(env_extra={"FIRESIDE_TEST_HOOKS": "1"})
    url = server.url

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            started = asyncio.Event()
            stream = asyncio.create_task(read_stream(c, stream_body(max_tokens=2000), started))
            waiting = asyncio.create_task(
                c.post(
                    "/v1/completions",
                    json={
                        "model": MODEL,
                        "prompt": "Count:",
                        "max_tokens": 2000,
                        "ignore_eos": True,
                    },
                )
            )
            await started.wait()
            t0 = time.monotonic()
            await c.post("/_test/crash-engine")
            finish, done, error = await stream
            response = await waiting
            return finish, done, error, response.status_code, time.monotonic() - t0

    finish, done, error, status, elapsed = asyncio.run(main())
    assert error is not None and done and finish is None  # an error event, then [DONE]
    assert status >= 500
    assert elapsed < 10  # failed fast, not hung
    assert server.wait(timeout=30) != 0


def test_a_full_queue_answers_429_while_accepted_requests_complete(start_server):
    url = start_server("--parallel", "2", "--max-waiting", "2").url

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            return await asyncio.gather(
                *(
                    c.post(
                        "/v1/completions",
                        json={
                            "model": MODEL,
                            "prompt": f"Item {i}:",
                            "max_tokens": 24,
                            "ignore_eos": True,
                        },
                    )
                    for i in range(12)
                )
            )

    results = asyncio.run(main())
    codes = [r.status_code for r in results]
    assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 2
    for r in results:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
        else:
            assert r.json()["choices"][0]["finish_reason"] == "length"


def _gauge(c: httpx.Client, name: str) -> float:
    m = re.search(rf"^fireside:{name}\{{[^}}]*\}} (\S+)$", c.get("/metrics").text, re.M)
    assert m
    return float(m.group(1))


def test_100_clients_leaving_at_random_points_leave_nothing_running(cold_server_url):
    rng = random.Random(7)

    async def leave(c, i, after):
        async with c.stream(
            "POST", "/v1/completions", json=stream_body(max_tokens=300, seed=i)
        ) as r:
            n = 0
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    n += 1
                    if n >= after:
                        break

    async def main():
        async with httpx.AsyncClient(base_url=cold_server_url, timeout=300) as c:
            await asyncio.gather(*(leave(c, i, rng.randint(1, 12)) for i in range(100)))

    asyncio.run(main())
    with httpx.Client(base_url=cold_server_url, timeout=30) as c:
        deadline = time.time() + 30
        while time.time() < deadline and (
            _gauge(c, "num_requests_running") or _gauge(c, "kv_cache_usage_perc")
        ):
            time.sleep(0.2)
        assert _gauge(c, "num_requests_running") == 0
        assert _gauge(c, "kv_cache_usage_perc") == 0  # this server keeps no prefix cache
        assert (
            c.post(
                "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}
            ).status_code
            == 200
        )


def test_an_oversized_body_is_413(client):
    r = client.post(
        "/v1/completions",
        content=b'{"model": "x", "prompt": "' + b"a" * (33 * 2**20) + b'"}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413
    assert r.json()["error"]["type"]
