"""Weight conversion: the embedded Q4_1 model becomes Q8_0 once, then comes from the cache."""

from __future__ import annotations

import os

import llama_cpp

from fireside.models import default_model_path
from fireside.runner import weights

EMBEDDED = str(default_model_path())


def test_auto_converts_q4_1_and_original_does_not():
    assert weights.file_type(EMBEDDED) == llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1
    assert weights.choose(EMBEDDED, "auto") == "q8_0"
    assert weights.choose(EMBEDDED, "original") is None
    assert weights.choose(EMBEDDED, "q4_0") == "q4_0"


def test_conversion_happens_once_and_is_cached(tmp_path):
    said: list[str] = []
    first = weights.convert(EMBEDDED, "q8_0", tmp_path, threads=1, say=said.append)
    assert weights.file_type(first) == llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    assert len(said) == 2  # converting..., converted
    mtime = os.stat(first).st_mtime_ns
    again = weights.convert(EMBEDDED, "q8_0", tmp_path, threads=1, say=said.append)
    assert again == first and os.stat(again).st_mtime_ns == mtime and len(said) == 2
    assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(first)]  # no leftovers


def test_the_default_serves_the_file_as_given():
    """Issue 11: converting by default changed the model's numbers."""
    from fireside.config import ServeConfig
    from fireside.server import weights_path

    assert ServeConfig().weights == "original"
    assert weights_path(ServeConfig(), EMBEDDED) == EMBEDDED
