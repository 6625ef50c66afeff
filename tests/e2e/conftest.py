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


def served_weights() -> str:
    """The GGUF file the test servers compute with: the embedded model as shipped
    (`--weights original`, the default). References must run on the same file."""
    from fireside.models import default_model_path

    return str(default_model_path())


def _start(*flags: str, env_extra: dict[str, str] | None = None):
    cmd = [sys.executable, "-m", "fireside", "serve", "--port", "0", "--threads", "1", *flags]
    env = dict(os.environ, FIRESIDE_API_KEYS="", **(env_extra or {}))
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    url = None
    deadline = time.time() + 120
    assert proc.stderr is not None
    proc.log_lines = []  # its stderr, line by line, for tests of the log
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        proc.log_lines.append(line)
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            url = m.group(1)
            break
    if url is None:
        proc.kill()
        pytest.fail("the server did not start:\n" + "".join(proc.log_lines[-20:]))
    # Keep reading its log, or a full pipe would block the server mid-request.
    threading.Thread(target=_keep_reading, args=(proc,), daemon=True).start()
    return proc, url


def _keep_reading(proc: subprocess.Popen) -> None:
    for line in proc.stderr:
        proc.log_lines.append(line)


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
