"""The prefix cache on the real model: hits are reported and change nothing."""

from __future__ import annotations

import asyncio
import re

import httpx

from tests.e2e.conftest import MODEL

SYSTEM = (
    "You are a careful assistant for a small library. You answer questions about "
    "opening hours, membership, borrowing rules and events. Opening hours are nine "
    "to five on weekdays and ten to two on Saturdays. Members may borrow six books "
    "for three weeks and renew them twice. "
)


def complete(client, prompt, **extra):
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 0, **extra}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_hit_is_reported_and_gives_the_same_greedy_text(client):
    cold = complete(
        client, SYSTEM + "Question: when do you open on Saturday?", prompt_cache_max_len=0
    )
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    warm = complete(client, SYSTEM + "Question: when do you open on Saturday?")
    warm2 = complete(client, SYSTEM + "Question: when do you open on Saturday?")
    cached = max(w["usage"]["prompt_tokens_details"]["cached_tokens"] for w in (warm, warm2))
    assert 0 < cached < warm["usage"]["prompt_tokens"]
    assert warm2["choices"][0]["text"] == cold["choices"][0]["text"]


def test_a_shared_prefix_with_another_tail_hits_and_matches_a_cold_run(client):
    complete(client, SYSTEM + "Question: how many books can I borrow?")
    other = SYSTEM + "Question: can I renew a book?"
    warm = complete(client, other)
    cold = complete(client, other, prompt_cache_max_len=0)
    system_tokens = complete(client, SYSTEM, max_tokens=0, echo=True)["usage"]["prompt_tokens"]
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] >= system_tokens - 1
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert warm["choices"][0]["text"] == cold["choices"][0]["text"]


def test_concurrent_requests_with_a_shared_prefix_see_only_their_own_tails(server_url):
    questions = [f"Question: what is {a} plus {b}? Answer:" for a, b in [(1, 2), (5, 5), (7, 1)]]

    async def main():
        async with httpx.AsyncClient(base_url=server_url, timeout=300) as c:

            async def one(q, max_len):
                r = await c.post(
                    "/v1/completions",
                    json={
                        "model": MODEL,
                        "prompt": SYSTEM * 2 + q,
                        "max_tokens": 8,
                        "temperature": 0,
                        "prompt_cache_max_len": max_len,
                    },
                )
                return r.json()

            together = await asyncio.gather(*(one(q, None) for q in questions))
            alone = [await one(q, 0) for q in questions]
            return together, alone

    together, alone = asyncio.run(main())
    assert sum(t["usage"]["prompt_tokens_details"]["cached_tokens"] for t in together) > 0
    for t, a in zip(together, alone, strict=True):
        # Same first tokens as computed alone with no cache: nobody saw another's tail.
        assert t["choices"][0]["text"][:4] == a["choices"][0]["text"][:4]


def kv_usage(client) -> float:
    text = client.get("/metrics").text
    return float(re.search(r"^fireside:kv_cache_usage_perc\S* (\S+)$", text, re.M).group(1))


def test_a_request_that_fills_the_context_does_not_wedge_the_server(start_server):
    """Issue 11: after one request filled a 256- or 1024-cell context, its cached KV
    held every cell and the next multi-token prompt never got an answer."""
    url = start_server("--ctx-size", "256").url
    with httpx.Client(base_url=url, timeout=120) as c:
        fill = {"model": MODEL, "prompt": "Hi how are you", "max_tokens": 100000}
        r = c.post("/v1/completions", json={**fill, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] == "length"
        assert kv_usage(c) <= 0.25  # what stays cached is bounded
        for prompt in ("Tell me a story", "Hi how are you doing today"):
            r = c.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 4})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] >= 1
