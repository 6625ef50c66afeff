"""`--deterministic`: a request's output does not depend on what else runs (issue 17).

The real server on the embedded model; every comparison is bitwise (text, token
ids, logprob floats), not within a tolerance.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.e2e.conftest import MODEL, served_weights

# The default KV: 16 + 16 sequence ids, a stream of 2,048 cells each.
FLAGS = ("--deterministic",)
STORY = "Once upon a time, in a village between two rivers, there lived a"
PASSAGE = (
    "The lighthouse stood at the edge of the cliff, its lamp turning slowly through "
    "the fog. Every night the keeper climbed the stairs, trimmed the wick and wrote "
    "the weather in a small leather book."
)


@pytest.fixture(scope="module")
def url(start_module_server) -> str:
    return start_module_server(*FLAGS).url


def _post(url: str, body: dict) -> dict:
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, **body}, timeout=600)
    assert r.status_code == 200, r.text
    return r.json()


async def _with_noise(url: str, body: dict, noise: list[dict]) -> dict:
    """`body` sent while the noise requests run (started first, so they share steps)."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:

        async def post(b: dict) -> dict:
            r = await c.post("/v1/completions", json={"model": MODEL, **b})
            assert r.status_code == 200, r.text
            return r.json()

        tasks = [asyncio.create_task(post(b)) for b in noise]
        await asyncio.sleep(0.5)  # the noise is prefilling and decoding
        target = await post(body)
        await asyncio.gather(*tasks)
        return target


def _noise(k: int) -> list[dict]:
    return [
        {
            "prompt": f"Item {i}: " + "a list of things " * (3 + 7 * i),
            "max_tokens": 40 + 17 * i,
            "temperature": 1.0,
            "seed": i,
            "ignore_eos": True,
        }
        for i in range(k)
    ]


def test_a_seeded_sample_is_the_same_alone_and_beside_15_streams(url):
    body = {
        "prompt": STORY,
        "max_tokens": 256,
        "temperature": 1.0,
        "seed": 20261202,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    alone = _post(url, body)["choices"][0]
    busy = asyncio.run(_with_noise(url, body, _noise(15)))["choices"][0]
    assert len(alone["token_ids"]) == 256
    assert busy["token_ids"] == alone["token_ids"]
    assert busy["text"] == alone["text"]


def test_n_2_samples_are_the_same_alone_and_beside_others(url):
    body = {"prompt": STORY, "max_tokens": 48, "temperature": 1.0, "seed": 5, "n": 2}
    alone = [c["text"] for c in _post(url, body)["choices"]]
    busy = [c["text"] for c in asyncio.run(_with_noise(url, body, _noise(6)))["choices"]]
    assert busy == alone
    assert alone[0] != alone[1]  # two samples, not one twice


def test_n_above_the_sequence_ids_runs_in_turns_with_the_same_samples(url, start_server):
    # 2 + 1 sequence ids for 6 samples: in turns, each later sample starting from the
    # prompt's cached cells (cut to a chunk boundary) instead of a fork, computing the
    # rest and its first token again, and still bitwise the same.
    body = {
        "prompt": " ".join([PASSAGE] * 8),  # past one 256-token chunk
        "max_tokens": 24,
        "temperature": 1.0,
        "seed": 9,
        "n": 6,
        "return_token_ids": True,
    }
    small = start_server("--deterministic", "--parallel", "2", "--prefix-cache", "1").url
    in_turns = _post(small, body)["choices"]
    at_once = _post(url, body)["choices"]
    assert [c["token_ids"] for c in in_turns] == [c["token_ids"] for c in at_once]
    assert len({c["text"] for c in at_once}) > 1


def _scores(choice: dict) -> list:
    lp = choice["logprobs"]
    return [lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]]


def test_echo_scores_are_bitwise_the_same_alone_with_other_prompts_and_under_load(url):
    body = {"prompt": PASSAGE, "max_tokens": 0, "echo": True, "logprobs": 3}
    alone = _scores(_post(url, body)["choices"][0])
    others = ["A recipe for bread:", "Dear Sir, I write to", PASSAGE[:60]]
    together = _post(url, {**body, "prompt": [PASSAGE, *others]})["choices"]
    assert _scores(together[0]) == alone
    busy = asyncio.run(_with_noise(url, body, _noise(8)))["choices"][0]
    assert _scores(busy) == alone


def test_loglikelihood_requests_score_the_same_one_at_a_time_and_8_at_once(url):
    # What lm-evaluation-harness's local-completions model sends for loglikelihood:
    # context + continuation, echo, logprobs, max_tokens 0.
    contexts = [f"Question {i}: what colour is the sky on a clear day? Answer:" for i in range(16)]
    bodies = [
        {"prompt": ctx + cont, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
        for ctx in contexts
        for cont in (" blue", " green")
    ]
    sequential = [_scores(_post(url, b)["choices"][0]) for b in bodies]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(lambda b: _scores(_post(url, b)["choices"][0]), bodies))
    assert concurrent == sequential


def test_a_prefix_cache_hit_gives_what_a_full_computation_gives(url):
    # A long shared prefix: the second request reuses the first's cells up to a chunk
    # boundary and must continue exactly as a request that computes everything.
    head = "Background. " + " ".join(f"Fact {i} is about the number {i * 7}." for i in range(60))
    first = {"prompt": head + " Summary:", "max_tokens": 8, "temperature": 0}
    _post(url, first)
    second = {"prompt": head + " The tenth fact says", "max_tokens": 32, "temperature": 0}
    hit = _post(url, second)
    assert hit["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    full = _post(url, {**second, "prompt_cache_max_len": 0})
    assert full["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert hit["choices"][0]["text"] == full["choices"][0]["text"]


def test_greedy_output_equals_llama_cpp_pythons_single_sequence_llama(url):
    from llama_cpp import Llama

    ref = Llama(model_path=served_weights(), n_ctx=512, n_threads=1, verbose=False, flash_attn=True)
    expected = ref.create_completion(STORY, max_tokens=128, temperature=0)["choices"][0]["text"]
    body = {"prompt": STORY, "max_tokens": 128, "temperature": 0}
    assert _post(url, body)["choices"][0]["text"] == expected
    assert asyncio.run(_with_noise(url, body, _noise(8)))["choices"][0]["text"] == expected
