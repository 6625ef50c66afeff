"""Start the real server on the embedded model: shared servers for the session, and
fixture factories for tests that need their own flags.

Every test in this folder is marked `slow` (it talks to a real server).

- `server_url` / `client`: one default server for the whole session.
- `cold_server_url`: one server with no prefix cache, for comparisons with a
  reference computation.
- `start_server(*flags, env_extra=None)`: a server of the test's own, stopped when
  the test ends.
- `start_module_server(...)`: the same for a module-scoped fixture, stopped when
  the module ends.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

MODEL = "SmolLM2-135M-Instruct"
_HERE = Path(__file__).parent
_START_TIMEOUT_S = 120  # loading a small model takes seconds; compiling nothing happens here
_STOP_TIMEOUT_S = 30


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A conftest's collection hook sees every item of the session: mark only ours.
    for item in items:
        if _HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.slow)


def served_weights() -> str:
    """The GGUF file the test servers compute with: the embedded model as shipped
    (`--weights original`, the default). References must run on the same file."""
    from fireside.models import default_model_path

    return str(default_model_path())


class Server:
    """One `fireside serve` process: its URL, and its stderr line by line (read all
    along, or a full pipe would block the server mid-request)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.url = ""
        self.log_lines: list[str] = []
        self._reader: threading.Thread | None = None

    def wait_until_listening(self) -> None:
        assert self.proc.stderr is not None
        deadline = time.time() + _START_TIMEOUT_S
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break  # the process exited
            self.log_lines.append(line)
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                self.url = m.group(1)
                self._reader = threading.Thread(target=self._keep_reading, daemon=True)
                self._reader.start()
                return
        self.proc.kill()
        self.proc.wait()
        pytest.fail("the server did not start:\n" + "".join(self.log_lines[-20:]))

    def _keep_reading(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log_lines.append(line)

    @property
    def log_text(self) -> str:
        return "".join(self.log_lines)

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = _STOP_TIMEOUT_S) -> int:
        """The exit status, once the process has exited and its log is read to the end."""
        code = self.proc.wait(timeout=timeout)
        if self._reader is not None:
            self._reader.join(timeout=5)
        return code

    def stop(self) -> int:
        """SIGTERM (a drained, clean shutdown), then the exit status; SIGKILL if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.wait()
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.wait()
            raise


class ServerFactory:
    """Starts servers with the given flags; `close` stops every one still running."""

    def __init__(self) -> None:
        self.servers: list[Server] = []

    def start(self, *flags: str, env_extra: dict[str, str] | None = None) -> Server:
        cmd = [sys.executable, "-m", "fireside", "serve", "--port", "0", "--threads", "1"]
        env = dict(os.environ, FIRESIDE_API_KEYS="", **(env_extra or {}))
        proc = subprocess.Popen([*cmd, *flags], stderr=subprocess.PIPE, text=True, env=env)
        server = Server(proc)
        self.servers.append(server)
        server.wait_until_listening()
        return server

    def close(self) -> None:
        for server in self.servers:
            if server.proc.poll() is None:
                try:
                    server.stop()
                except subprocess.TimeoutExpired:
                    pass  # killed; the test that owned it reports its own failures
        self.servers.clear()


StartServer = Callable[..., Server]


@pytest.fixture
def start_server() -> Iterator[StartServer]:
    """`start_server(*flags, env_extra=None) -> Server`, stopped when the test ends."""
    factory = ServerFactory()
    try:
        yield factory.start
    finally:
        factory.close()


@pytest.fixture(scope="module")
def start_module_server() -> Iterator[StartServer]:
    """Like `start_server`, for module-scoped fixtures: stopped when the module ends."""
    factory = ServerFactory()
    try:
        yield factory.start
    finally:
        factory.close()


@pytest.fixture(scope="session")
def _session_servers() -> Iterator[ServerFactory]:
    factory = ServerFactory()
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="session")
def server_url(_session_servers: ServerFactory) -> str:
    return _session_servers.start().url


@pytest.fixture(scope="session")
def cold_server_url(_session_servers: ServerFactory) -> str:
    """A server with no prefix cache, for comparisons with a reference computation.

    llama.cpp's float sums depend on where a sequence's KV cells sit; with nothing
    cached and requests sent one at a time, every request sees an empty cache,
    as the reference does.
    """
    # No prompt lookup either: drafts change batch shapes, and this server is the one
    # whose batches must be those of a plain one-sequence decode.
    return _session_servers.start("--prefix-cache", "0", "--speculate", "off").url


@pytest.fixture()
def api_key() -> str:
    """The key the SDK tests send: the test servers have none, so any will do."""
    return "unused"


@pytest.fixture()
def client(server_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server_url, timeout=120) as c:
        yield c
