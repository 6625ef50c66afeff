"""A replica killed mid-request: its requests fail fast, later ones succeed, Serve
replaces it. (Runs after test_cluster.py: it changes the cluster.)"""

from __future__ import annotations

import os
import signal
import time

from tests.e2e.conftest import MODEL

REPLICA = "x-fireside-replica"
PID = "x-fireside-replica-pid"


def _replica_of_a_request(client, prompt: str) -> str:
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1})
    assert r.status_code == 200, r.text
    return r.headers[REPLICA]


def _replicas_seen(client, until, timeout_s: float) -> set[str]:
    """Replica ids of sequential requests, until `until(ids)` or the time is up."""
    seen: set[str] = set()
    deadline = time.time() + timeout_s
    i = 0
    while not until(seen) and time.time() < deadline:
        seen.add(_replica_of_a_request(client, f"Item {i}:"))
        i += 1
        time.sleep(0.1)
    return seen


def test_a_killed_replica_fails_its_streams_and_is_replaced(client):
    before = _replicas_seen(client, lambda ids: len(ids) == 2, 30)
    assert len(before) == 2
    body = {"model": MODEL, "prompt": "Tell a long story.", "max_tokens": 2000, "stream": True}
    with client.stream("POST", "/v1/completions", json={**body, "ignore_eos": True}) as r:
        assert r.status_code == 200
        pid = int(r.headers[PID])
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        os.kill(pid, signal.SIGKILL)
        killed = time.time()
        rest = [line for line in lines if line.startswith("data: ")]
    took = time.time() - killed
    print(f"the stream ended {took:.1f}s after its replica was killed")
    assert took < 30, "the stream hung after its replica died"
    assert any('"error"' in line for line in rest), rest[-3:]

    # Requests after it are served (by the other replica, then by both) ...
    for i in range(4):
        _replica_of_a_request(client, f"After {i}:")
    # ... and Serve brings up a replica in place of the dead one.
    after = _replicas_seen(client, lambda ids: ids - before, 120) - before
    assert after, "Serve did not replace the killed replica"
    assert client.get("/health").json()["status"] == "ok"
