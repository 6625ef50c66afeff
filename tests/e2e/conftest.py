"""Start the real server on the embedded model, once per test session."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import httpx
import pytest

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def server_url():
    cmd = [sys.executable, "-m", "fireside", "serve", "--port", "0", "--threads", "1"]
    env = dict(os.environ, FIRESIDE_API_KEYS="")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    url = None
    deadline = time.time() + 120
    assert proc.stderr is not None
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            url = m.group(1)
            break
    if url is None:
        proc.kill()
        pytest.fail("the server did not start")
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture()
def client(server_url):
    with httpx.Client(base_url=server_url, timeout=120) as c:
        yield c
