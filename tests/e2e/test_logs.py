"""The real server's log (its stderr): one format for every line; start-up lines that
say the model, the weights file, the address and whether auth is on; one `refused`
line per refused request; a `done` line for a stream whose client left."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from tests.e2e.conftest import MODEL, _start

KEY = "sk-e2e-log-test-key"
LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: \S"
)


@pytest.fixture(scope="module")
def keyed():
    proc, url = _start("--api-key", KEY)
    try:
        yield proc, url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def wait_for(proc, pattern: str, timeout: float = 15) -> list[str]:
    """The log lines matching `pattern`, once there is at least one."""
    deadline = time.time() + timeout
    while True:
        found = [x for x in list(proc.log_lines) if re.search(pattern, x)]
        if found or time.time() > deadline:
            return found
        time.sleep(0.05)


def assert_one_format(proc) -> None:
    lines = list(proc.log_lines)
    assert lines
    for line in lines:
        assert LINE.match(line), line


def test_start_up_says_model_weights_address_and_that_auth_is_on(keyed):
    proc, url = keyed
    text = "".join(proc.log_lines)
    assert re.search(rf"model {MODEL}: loaded \S+\.gguf", text), text
    assert f"listening on {url}" in text
    assert "auth on: 1 API key" in text
    assert "no API key" not in text and "auth off" not in text
    assert KEY not in text
    assert_one_format(proc)


def test_a_401_and_a_400_are_each_logged_once(keyed):
    proc, url = keyed
    with httpx.Client(base_url=url, timeout=60) as c:
        assert c.post("/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code == 401
        r = c.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": "x", "max_tokens": -3},
            headers={"Authorization": f"Bearer {KEY}"},
        )
        assert r.status_code == 400
        code = r.json()["error"]["code"]
    assert len(wait_for(proc, r"refused POST /v1/completions status=401 code=invalid_api_key")) == 1
    assert len(wait_for(proc, rf"refused POST /v1/completions status=400 code={code}\b")) == 1
    assert not wait_for(proc, r"\bstart id=", timeout=0)  # neither request started
    assert_one_format(proc)


def test_a_stream_whose_client_left_gets_a_done_aborted_line(keyed):
    proc, url = keyed
    body = {"model": MODEL, "prompt": "Tell me a story:", "max_tokens": 2000, "stream": True}
    body["ignore_eos"] = True
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=url, timeout=60, headers=headers) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            first = next(x for x in lines if x.startswith("data: {"))
    cmpl_id = re.search(r'"id": ?"([^"]+)"', first).group(1)
    assert len(wait_for(proc, rf"\bstart id={cmpl_id} ")) == 1
    done = wait_for(proc, rf"\bdone id={cmpl_id} ")
    assert len(done) == 1 and "status=aborted" in done[0], done
    assert_one_format(proc)


def test_an_open_server_warns_once_that_anyone_may_use_it():
    proc, url = _start()
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            assert c.get("/health").status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = "".join(proc.log_lines)
    assert text.count("no API key") == 1, text
    assert "auth on" not in text
    assert_one_format(proc)
