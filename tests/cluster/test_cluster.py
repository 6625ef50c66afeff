"""Fireside on a two-node Ray cluster: the e2e tests unchanged, auth, SDKs, routing.

The imported e2e tests run here as they are, against the cluster's ingress
(`conftest.py` points their `client`, `cold` and `server_url` fixtures at it).
"""

from __future__ import annotations

import collections
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.cluster.conftest import AUTH
from tests.e2e.conftest import MODEL
from tests.e2e.test_completions import (  # noqa: F401
    test_bad_inputs_are_400_with_envelope,
    test_echo_and_truncate_vs_error,
    test_fireworks_sdk,
    test_greedy_matches_the_known_answer,
    test_openai_sdk,
    test_prompts_times_n_are_prompt_major,
    test_stop_included_by_default_and_excluded_on_request,
    test_stream_equals_non_stream_and_usage_is_last,
    test_token_prompt_equals_string_prompt,
)
from tests.e2e.test_logprobs import (  # noqa: F401
    reference,
    test_echo_scores_match_llama_alone,
    test_greedy_tokens_are_the_argmax_of_their_alternatives,
    test_logit_bias_forces_and_bans,
)
from tests.e2e.test_structured import (  # noqa: F401
    test_bad_schemas_and_grammars_are_400,
    test_gbnf_grammar_is_followed,
    test_seed_logprobs_and_grammar_together,
)

REPLICA = "x-fireside-replica"


def test_auth_is_the_servers(server_url):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(f"{server_url}/v1/completions", json=body, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.post(f"{server_url}/v1/completions", json=body, headers=AUTH).status_code == 200
    health = httpx.get(f"{server_url}/health")  # open, as on one server
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_models_and_metrics_come_from_the_cluster(client):
    models = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == [MODEL]
    client.post("/v1/completions", json={"model": MODEL, "prompt": "Count:", "max_tokens": 3})
    deadline = time.time() + 10  # replicas report their counters every second
    while time.time() < deadline:
        text = client.get("/metrics").text
        lines = [ln for ln in text.splitlines() if ln.startswith("fireside:generation_tokens")]
        if lines and float(lines[0].split()[-1]) >= 3:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"/metrics never counted the generated tokens: {lines}")


def _words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    vocab = "river stone cloud maple orbit lantern copper meadow violet harbor quiet".split()
    return " ".join(rng.choice(vocab) for _ in range(n))


def _tokens(client, text: str) -> list[int]:
    r = client.post("/tokenize", json={"model": MODEL, "prompt": text})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def test_requests_sharing_a_prefix_land_on_one_replica_and_hit_its_cache(client):
    prefixes = [_words(100 + k, 300) for k in range(4)]  # 300 tokens each
    jobs = [(p, j) for p in range(4) for j in range(8)]
    random.Random(3).shuffle(jobs)
    texts = {job: f"{prefixes[job[0]]} Question {job[1]}: why?" for job in jobs}
    prompts = {job: _tokens(client, text) for job, text in texts.items()}
    assert all(len(prompts[job]) >= 300 for job in jobs)

    def run(job):
        # Half the prompts go as token ids: routing is by tokens, not text.
        prompt = prompts[job] if job[1] % 2 else texts[job]
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return job, r.headers[REPLICA], r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, jobs))

    replicas = collections.defaultdict(set)
    for (p, _), replica, _ in results:
        replicas[p].add(replica)
    assert all(len(r) == 1 for r in replicas.values()), dict(replicas)
    assert len(set().union(*replicas.values())) == 2  # the prefixes were spread, not piled

    # What one server's prefix cache would give: each request reuses its longest
    # common prefix with an earlier request of the same prefix.
    ideal, seen = 0, []
    for job, _, _ in results:
        ideal += max((_common(prompts[job], prompts[o]) for o in seen if o[0] == job[0]), default=0)
        seen.append(job)
    cached = sum(c for _, _, c in results)
    print(f"cached tokens: {cached} of a single server's {ideal}")
    assert cached >= 0.9 * ideal


def test_prompt_cache_key_keeps_a_session_on_one_replica(client):
    served = collections.defaultdict(set)
    for i in range(12):
        session = f"session-{i % 3}"
        body = {"model": MODEL, "prompt": _words(i, 20), "max_tokens": 1, "user": "u"}
        r = client.post("/v1/completions", json={**body, "prompt_cache_key": session})
        assert r.status_code == 200, r.text
        served[session].add(r.headers[REPLICA])
    assert all(len(r) == 1 for r in served.values()), dict(served)


def test_a_client_that_leaves_frees_its_sequences_on_the_replica(client):
    # ~60 s of tokens on one thread: back to 0 running within 30 s means it was aborted.
    body = {"model": MODEL, "prompt": "Tell a long story.", "max_tokens": 2000}
    with client.stream(
        "POST", "/v1/completions", json={**body, "stream": True, "ignore_eos": True}
    ) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    deadline = time.time() + 30
    while time.time() < deadline:
        text = client.get("/metrics").text
        running = [ln for ln in text.splitlines() if ln.startswith("fireside:num_requests_running")]
        aborted = [ln for ln in text.splitlines() if ln.startswith("fireside:request_aborts")]
        if float(running[0].split()[-1]) == 0 and aborted and float(aborted[0].split()[-1]) >= 1:
            return
        time.sleep(0.5)
    pytest.fail(f"the replica kept running it: {running} {aborted}")
