"""Start the real server on the embedded model, once per test session."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

import httpx
import pytest

MODEL = "SmolLM2-135M-Instruct"


def _start(*flags: str):
    cmd = [sys.executable, "-m", "fireside", "serve", "--port", "0", "--threads", "1", *flags]
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
    # Keep reading its log, or a full pipe would block the server mid-request.
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    return proc, url


@pytest.fixture(scope="session")
def server_url():
    proc, url = _start()
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def cold_server_url():
    """A server with no prefix cache, for comparisons with a reference computation.

    llama.cpp's float sums depend on where a sequence's KV cells sit; with nothing
    cached and requests sent one at a time, every request sees an empty cache,
    as the reference does.
    """
    proc, url = _start("--prefix-cache", "0")
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture()
def client(server_url):
    with httpx.Client(base_url=server_url, timeout=120) as c:
        yield c
