"""Issue 14 on the real model: every field of the fireworks-ai SDK's
`CompletionCreateParams` through the SDK itself, and the documented effect of each
field that has one: Mirostat's target, prompt-cache isolation (per isolation key
and per API key), and the priority service tier."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import typing

import httpx
import pytest
from fireworks import BadRequestError, Fireworks
from fireworks.types import completion_create_params

from tests.e2e.conftest import MODEL

# A prefix no other e2e module sends, so no other test's cache entry can answer it.
SYSTEM = (
    "You are the front desk of a harbour ferry company. You answer questions about "
    "sailing times, tickets, bicycles and luggage. Ferries leave every forty minutes "
    "from seven in the morning; bicycles travel free and dogs ride on the upper deck. "
)
KEY_A, KEY_B = "sk-e2e-tenant-a", "sk-e2e-tenant-b"
ISOLATION_HEADER = "x-prompt-cache-isolation-key"


def sdk_fields() -> set[str]:
    """Every field the SDK's CompletionCreateParams documents, `stream` included."""
    return set(typing.get_type_hints(completion_create_params.CompletionCreateParamsBase)) | {
        "stream"
    }


def token_ids(client: httpx.Client, text: str) -> list[int]:
    r = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


# --- every field through the SDK


@pytest.fixture
def cold_client(cold_server_url):
    with httpx.Client(base_url=cold_server_url, timeout=120) as c:
        yield c


def test_every_sdk_field_through_the_sdk_is_served(cold_server_url, cold_client):
    # The cold server (no prefix cache, one request at a time): the seeded repeat below
    # must see the same KV placement as the first call (tests/e2e/conftest.py).
    sdk = Fireworks(base_url=cold_server_url, api_key="unused")
    client = cold_client
    prompt = "The capital of France is"
    banned = token_ids(client, " Paris")[0]  # logit_bias -100: never generated
    sent: set[str] = set()

    def create(**fields):
        raw = sdk.completions.with_raw_response.create(model=MODEL, **fields)
        assert raw.status_code == 200, raw.http_response.text
        sent.update(json.loads(raw.http_request.content))  # what the SDK really sent
        return raw

    sampled = {
        "prompt": prompt,
        "context_length_exceeded_behavior": "truncate",
        "echo": True,
        "echo_last": 2,
        "frequency_penalty": 0.2,
        "presence_penalty": 0.1,
        "repetition_penalty": 1.1,
        "ignore_eos": True,
        "images": [],
        "logit_bias": {str(banned): -100},
        "logprobs": True,
        "top_logprobs": 2,
        "max_tokens": 12,
        "metadata": {"suite": "e2e", "case": "every-field"},
        "min_p": 0.01,
        "mirostat_target": 4.0,
        "mirostat_lr": 0.2,
        "n": 2,
        "perf_metrics_in_response": True,
        "prediction": {"type": "content", "content": [{"type": "text", "text": " a city"}]},
        "prompt_cache_isolation_key": "every-field",
        "prompt_cache_key": "session-every-field",
        "raw_output": True,
        "reasoning_effort": "low",
        "reasoning_history": "preserved",
        "response_format": {"type": "text"},
        "return_token_ids": True,
        "seed": 5,
        "service_tier": "priority",
        "stop": ["@@never generated@@"],  # must not cut the 12 tokens checked below
        "temperature": 0.8,
        "top_k": 40,
        "top_p": 0.95,
        "typical_p": 0.99,
        "user": "e2e-user",
    }
    first = create(**sampled).http_response.json()
    again = create(**sampled).http_response.json()
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in again["choices"]]  # seed
    prompt_tail = client.post(
        "/detokenize", json={"tokens": token_ids(client, prompt)[-2:]}
    ).json()["prompt"]
    assert len(first["choices"]) == 2  # n
    for choice in first["choices"]:
        assert choice["text"].startswith(prompt_tail)  # echo_last wins over echo
        assert len(choice["token_ids"]) == 12  # ignore_eos, max_tokens
        assert banned not in choice["token_ids"]  # logit_bias
        content = choice["logprobs"]["content"]
        assert all(len(entry["top_logprobs"]) == 2 for entry in content[-12:])
        assert choice["raw_output"]["completion_token_ids"] == choice["token_ids"]
    assert first["perf_metrics"]["prompt-tokens"] == first["usage"]["prompt_tokens"]

    # The fields the first call could not send beside their alternatives.
    greedy = create(prompt=prompt, max_tokens=12, temperature=0).http_response.json()
    drafted = create(
        prompt=prompt,
        max_completion_tokens=12,
        temperature=0,
        speculation=greedy["choices"][0]["text"],  # the right guess: the same text, faster
        thinking={"type": "enabled", "budget_tokens": 2048},
        perf_metrics_in_response=True,
    ).http_response.json()
    assert drafted["choices"][0]["text"] == greedy["choices"][0]["text"]
    assert drafted["perf_metrics"]["speculation-prompt-tokens"] > 0
    wrong = create(
        prompt=prompt, max_tokens=12, temperature=0, speculation=token_ids(client, " 1 2 3 4")
    ).http_response.json()
    assert wrong["choices"][0]["text"] == greedy["choices"][0]["text"]  # never the output

    answer = create(
        prompt="Is Paris in France? Answer yes or no:",
        max_tokens=8,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": {"type": "string", "enum": ["yes", "no"]}},
        },
        reasoning_effort=False,
    ).http_response.json()
    assert json.loads(answer["choices"][0]["text"]) in ("yes", "no")

    stream = sdk.completions.create(
        model=MODEL, prompt=prompt, max_tokens=6, temperature=0, stream=True, service_tier="auto"
    )
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    sent.add("stream")
    assert text == greedy["choices"][0]["text"][: len(text)] and text

    assert sdk_fields() - sent == set(), "fields this test never sent through the SDK"


def test_fields_with_wrong_types_are_400_through_the_sdk(server_url):
    sdk = Fireworks(base_url=server_url, api_key="unused", max_retries=0)
    for fields in (
        {"service_tier": "premium"},
        {"thinking": {"type": "enabled", "budget_tokens": 10}},
        {"speculation": "a", "prediction": "b"},
        {"metadata": {"a": 1}},
    ):
        with pytest.raises(BadRequestError) as info:
            sdk.completions.create(model=MODEL, prompt="Hi", max_tokens=1, **fields)
        assert info.value.status_code == 400, fields


# --- Mirostat


def mean_surprise_bits(client: httpx.Client, target: float) -> tuple[float, float]:
    """(mean surprise under the distribution sampled from, mean surprise under the
    model's own), in bits per generated token, over several prompts and seeds."""
    sampled, raw, count = 0.0, 0.0, 0
    for seed, prompt in enumerate(["Once upon a time", "The best way to learn", "In 1850,"]):
        r = client.post(
            "/v1/completions",
            json={
                "model": MODEL,
                "prompt": prompt,
                "max_tokens": 64,
                "ignore_eos": True,
                "temperature": 1.0,
                "seed": seed,
                "n": 2,
                "logprobs": True,
                "mirostat_target": target,
            },
        )
        assert r.status_code == 200, r.text
        for choice in r.json()["choices"]:
            for entry in choice["logprobs"]["content"]:
                sampled += -entry["sampling_logprob"] / math.log(2)
                raw += -entry["logprob"] / math.log(2)
                count += 1
    return sampled / count, raw / count


def test_a_lower_mirostat_target_gives_a_lower_mean_surprise(client):
    low_sampled, low_raw = mean_surprise_bits(client, 1.0)
    high_sampled, high_raw = mean_surprise_bits(client, 6.0)
    # Mirostat steers the surprise of the chosen tokens (sampling_logprob) to the target;
    # 64 tokens from mu = 2 tau leave it within about a bit of it.
    assert low_sampled < high_sampled - 1.0, (low_sampled, high_sampled)
    assert low_raw < high_raw, (low_raw, high_raw)  # and the text is more predictable


# --- prompt cache isolation


def cached(client: httpx.Client, key: str | None = None, **extra) -> int:
    headers = extra.pop("headers", {})
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    body = {"model": MODEL, "prompt": SYSTEM + extra.pop("tail", "Q: hours?"), "max_tokens": 2}
    r = client.post("/v1/completions", json={**body, **extra}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_isolation_keys_share_cached_kv_only_within_a_key(client):
    assert cached(client, tail="Q: iso-1?", prompt_cache_isolation_key="iso-a") == 0
    assert cached(client, tail="Q: iso-1?", prompt_cache_isolation_key="iso-b") == 0
    assert cached(client, tail="Q: iso-1?") == 0  # no key sees neither
    assert cached(client, tail="Q: iso-1?", prompt_cache_isolation_key="iso-a") > 0
    # The header stands for the field.
    assert cached(client, tail="Q: iso-1?", headers={ISOLATION_HEADER: "iso-b"}) > 0
    assert cached(client, tail="Q: iso-1?", headers={ISOLATION_HEADER: "iso-c"}) == 0


def test_per_key_isolation_by_default_hides_one_api_keys_prefixes_from_another(start_server):
    server = start_server("--api-key", KEY_A, "--api-key", KEY_B)
    with httpx.Client(base_url=server.url, timeout=120) as c:
        assert cached(c, KEY_A) == 0
        assert cached(c, KEY_A) > 0  # the same key hits
        assert cached(c, KEY_B) == 0  # another key does not see it
        assert cached(c, KEY_B) > 0
        assert cached(c, KEY_B, prompt_cache_isolation_key="x") == 0
        assert cached(c, KEY_A, prompt_cache_isolation_key="x") == 0  # same key name, other key
    assert KEY_A not in server.log_text and KEY_B not in server.log_text


def test_shared_isolation_lets_api_keys_share(start_server):
    server = start_server(
        "--api-key", KEY_A, "--api-key", KEY_B, "--prompt-cache-isolation", "shared"
    )
    with httpx.Client(base_url=server.url, timeout=120) as c:
        assert cached(c, KEY_A) == 0
        assert cached(c, KEY_B) > 0
        assert cached(c, KEY_B, prompt_cache_isolation_key="x") == 0


# --- service tiers


async def _num_waiting(client: httpx.AsyncClient) -> float:
    text = (await client.get("/metrics")).text
    return float(re.search(r"^fireside:num_requests_waiting\S* (\S+)$", text, re.M).group(1))


def test_with_one_slot_a_priority_request_submitted_last_starts_first(start_server):
    url = start_server("--parallel", "1").url

    async def main() -> dict[str, float]:
        first_token_at: dict[str, float] = {}
        async with httpx.AsyncClient(base_url=url, timeout=300) as c:

            async def stream(
                name: str, max_tokens: int, started: asyncio.Event | None = None, **extra
            ):
                body = {
                    "model": MODEL,
                    "prompt": f"Story {name}:",
                    "max_tokens": max_tokens,
                    "ignore_eos": True,
                    "temperature": 0,
                    "stream": True,
                    **extra,
                }
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: {") and name not in first_token_at:
                            first_token_at[name] = time.monotonic()
                            if started is not None:
                                started.set()

            running = asyncio.Event()
            tasks = [asyncio.create_task(stream("running", 256, running))]
            await running.wait()  # it holds the one slot
            tasks += [asyncio.create_task(stream(f"d{i}", 8)) for i in range(3)]
            deadline = time.monotonic() + 30
            while await _num_waiting(c) < 3:  # the default requests queue behind it
                assert time.monotonic() < deadline, "the default requests never queued"
                await asyncio.sleep(0.05)
            tasks.append(asyncio.create_task(stream("vip", 8, service_tier="priority")))
            await asyncio.gather(*tasks)
        return first_token_at

    first_token_at = asyncio.run(main())
    order = sorted(first_token_at, key=first_token_at.__getitem__)
    assert order[:2] == ["running", "vip"], order
