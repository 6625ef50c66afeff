"""The cluster's pure parts: prefix block hashes and the Serve builder's arguments."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fireside.cluster import app_builder, config_argv
from fireside.cluster.prefix import BLOCK_TOKENS, block_hashes, matched_blocks, report


def test_block_hashes_chain_so_shared_prefixes_share_leading_hashes():
    a = list(range(100))
    b = a[:40] + [7] * 60
    ha, hb = block_hashes(a), block_hashes(b)
    assert len(ha) == 100 // BLOCK_TOKENS
    shared = 40 // BLOCK_TOKENS
    assert ha[:shared] == hb[:shared]
    assert all(x != y for x, y in zip(ha[shared:], hb[shared:], strict=False))
    assert matched_blocks(hb, set(ha)) == shared
    assert block_hashes(a[: BLOCK_TOKENS - 1]) == []  # no whole block: nothing to match


def test_a_block_hash_covers_everything_before_it():
    a = list(range(64))
    b = [999] + a[1:]  # differs only in the first token
    assert not set(block_hashes(a)) & set(block_hashes(b))


def test_isolation_keys_never_match_each_other():
    tokens = list(range(64))
    assert not set(block_hashes(tokens, "tenant-a")) & set(block_hashes(tokens, "tenant-b"))
    assert block_hashes(tokens, "tenant-a") == block_hashes(tokens, "tenant-a")


def test_hashes_are_the_same_in_another_process():
    # The router (ingress) and the replicas compute them in different processes.
    code = (
        "from fireside.cluster.prefix import block_hashes;"
        "print(block_hashes(list(range(64)), 'key'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(block_hashes(list(range(64)), "key"))


def test_a_report_is_bounded_and_keeps_the_first_prompts_first():
    prompts = [(list(range(i, i + 32 * BLOCK_TOKENS)), None) for i in range(200)]
    hashes = report(prompts)
    assert len(hashes) == 2048
    assert hashes[:32] == block_hashes(prompts[0][0])


def test_builder_args_become_fireside_serve_flags():
    argv = config_argv(
        {"threads": 1, "model": ["a.gguf", "b.gguf"], "prefix_cache": 0, "flash_attn": False}
    )
    assert argv == [
        "--threads", "1", "--model", "a.gguf", "--model", "b.gguf",
        "--prefix-cache", "0", "--no-flash-attn",
    ]  # fmt: skip
    assert config_argv({"flash_attn": "true"}) == ["--flash-attn"]


def test_the_builder_refuses_bad_settings_before_anything_starts():
    with pytest.raises(ValueError, match="--mmproj"):
        app_builder({"mmproj": "x.gguf"})
    with pytest.raises(SystemExit):  # argparse: an unknown option
        app_builder({"no_such_option": 1})
