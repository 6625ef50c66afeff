"""Flag values llama.cpp would abort on, or change, at start-up (issue 11).

`--ctx-size 150` (and `--batch-size 128`) made llama.cpp abort the process with
`GGML_ASSERT(n_outputs_max <= cparams.n_outputs_max)`: its batch must hold one
output per sequence id. Now such values start a working server, and every value
llama.cpp changes is reported; values it cannot take at all are a one-line
start-up error naming the flag, never a backtrace.
"""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from fireside.runner.llamacpp import LlamaCppConfig, context_shape
from tests.e2e.conftest import MODEL, StartServer


def serve_and_complete(start_server: StartServer, *flags: str) -> list[str]:
    server = start_server(*flags)
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": MODEL, "prompt": "Tell me a story", "max_tokens": 4},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
    return list(server.log_lines)


def test_a_small_ctx_size_starts_and_the_rounding_is_reported(start_server):
    # 32 sequence ids (16 + 16): each gets 150 / 32 cells, rounded up to 256.
    lines = serve_and_complete(start_server, "--ctx-size", "150")
    text = "".join(lines)
    assert "--ctx-size 150: llama.cpp allocated 8192 KV cells" in text
    assert "32 sequence ids x 256" in text
    assert "GGML_ASSERT" not in text


def test_a_small_unified_ctx_size_starts_and_the_rounding_is_reported(start_server):
    lines = serve_and_complete(start_server, "--kv-unified", "--ctx-size", "150")
    text = "".join(lines)
    assert "--ctx-size 150: llama.cpp allocated 256 KV cells" in text
    assert "GGML_ASSERT" not in text


def test_a_batch_smaller_than_the_sequence_ids_starts(start_server):
    text = "".join(serve_and_complete(start_server, "--batch-size", "128"))
    assert "GGML_ASSERT" not in text


def run_cli(*flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fireside", "serve", "--port", "0", "--threads", "1", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_a_context_llama_cpp_cannot_allocate_is_a_clear_error():
    done = run_cli("--ctx-size", "100000000")
    assert done.returncode == 1
    assert "--ctx-size" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("value", ["63", "4294967552"])
def test_ctx_sizes_out_of_range_are_refused_by_name(value):
    done = run_cli("--ctx-size", value)
    assert done.returncode == 2
    assert "--ctx-size must be in" in done.stderr and "Traceback" not in done.stderr


def test_context_shape_gives_llama_cpp_a_batch_that_holds_every_sequence():
    def shape(n_ctx: int, n_batch: int, n_seq_max: int, unified: bool = True) -> tuple[int, int]:
        config = LlamaCppConfig("m.gguf", n_ctx, n_batch, n_seq_max, 1, True, None, 0, unified)
        return context_shape(config)

    # A stream per sequence id: each gets n_ctx / ids, rounded up to 256, as llama.cpp does.
    assert shape(150, 512, 32, unified=False) == (8192, 512)
    assert shape(1000, 512, 3, unified=False) == (1536, 512)
    assert shape(65536, 512, 32, unified=False) == (65536, 512)

    assert shape(150, 512, 160) == (256, 256)
    assert shape(256, 128, 160) == (256, 160)
    assert shape(8192, 512, 160) == (8192, 512)
    assert shape(1000, 512, 256) == (1024, 512)
    for n_ctx in (64, 150, 160, 300):
        for n_batch in (1, 64, 512):
            ctx, batch = shape(n_ctx, n_batch, 160)
            assert batch >= 160 and ctx >= batch and ctx % 256 == 0
