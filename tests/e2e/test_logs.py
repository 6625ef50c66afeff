"""The real server's log (its stderr): one format for every line; start-up lines that
say the model, the weights file, the address and whether auth is on; one `refused`
line per refused request; a `done` line for a stream whose client left."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from tests.e2e.conftest import MODEL, Server

KEY = "sk-e2e-log-test-key"
LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: \S"
)


@pytest.fixture(scope="module")
def keyed(start_module_server) -> Server:
    return start_module_server("--api-key", KEY)


def wait_for(server: Server, pattern: str, timeout: float = 15) -> list[str]:
    """The log lines matching `pattern`, once there is at least one."""
    deadline = time.time() + timeout
    while True:
        found = [x for x in list(server.log_lines) if re.search(pattern, x)]
        if found or time.time() > deadline:
            return found
        time.sleep(0.05)


def assert_one_format(server: Server) -> None:
    lines = list(server.log_lines)
    assert lines
    for line in lines:
        assert LINE.match(line), line


def test_start_up_says_model_weights_address_and_that_auth_is_on(keyed):
    text = keyed.log_text
    assert re.search(rf"model {MODEL}: loaded \S+\.gguf", text), text
    assert f"listening on {keyed.url}" in text
    assert "auth on: 1 API key" in text
    assert "no API key" not in text and "auth off" not in text
    assert KEY not in text
    assert_one_format(keyed)


def test_a_401_and_a_400_are_each_logged_once(keyed):
    with httpx.Client(base_url=keyed.url, timeout=60) as c:
        assert c.post("/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code == 401
        r = c.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": "x", "max_tokens": -3},
            headers={"Authorization": f"Bearer {KEY}"},
        )
        assert r.status_code == 400
        code = r.json()["error"]["code"]
    unauthorized = r"refused POST /v1/completions status=401 code=invalid_api_key"
    assert len(wait_for(keyed, unauthorized)) == 1
    assert len(wait_for(keyed, rf"refused POST /v1/completions status=400 code={code}\b")) == 1
    assert not wait_for(keyed, r"\bstart id=", timeout=0)  # neither request started
    assert_one_format(keyed)


def test_a_stream_whose_client_left_gets_a_done_aborted_line(keyed):
    body = {"model": MODEL, "prompt": "Tell me a story:", "max_tokens": 2000, "stream": True}
    body["ignore_eos"] = True
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=keyed.url, timeout=60, headers=headers) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            first = next(x for x in lines if x.startswith("data: {"))
    cmpl_id = re.search(r'"id": ?"([^"]+)"', first).group(1)
    assert len(wait_for(keyed, rf"\bstart id={cmpl_id} ")) == 1
    done = wait_for(keyed, rf"\bdone id={cmpl_id} ")
    assert len(done) == 1 and "status=aborted" in done[0], done
    assert_one_format(keyed)


def test_an_open_server_warns_once_that_anyone_may_use_it(start_server):
    server = start_server()
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.get("/health").status_code == 200
    server.stop()
    text = server.log_text
    assert text.count("no API key") == 1, text
    assert "auth on" not in text
    assert_one_format(server)
