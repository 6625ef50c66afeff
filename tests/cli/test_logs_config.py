"""`fireside.logs.configure`: one format for every line, uvicorn's included."""

from __future__ import annotations

import io
import logging
import re
import warnings

import pytest

from fireside import logs

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) [\w.]+: \S")


@pytest.fixture
def restore_logging():
    names = ["", *logs.UVICORN_LOGGERS]
    saved = {
        n: (
            logging.getLogger(n).handlers[:],
            logging.getLogger(n).level,
            logging.getLogger(n).propagate,
        )
        for n in names
    }
    yield
    logging.captureWarnings(False)
    for n, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(n)
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


def test_fireside_uvicorn_and_warnings_share_one_format(restore_logging):
    # uvicorn's own configuration gives its loggers handlers of their own; configure
    # takes them over.
    logging.getLogger("uvicorn.error").addHandler(logging.StreamHandler(io.StringIO()))
    logging.getLogger("uvicorn.error").propagate = False
    out = io.StringIO()
    logs.configure("info", out)
    logging.getLogger("fireside").info("listening on http://127.0.0.1:1")
    logging.getLogger("fireside.api.serving").debug("not shown at info")
    logging.getLogger("uvicorn.error").warning("Invalid HTTP request received.")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("something deprecated", DeprecationWarning, stacklevel=1)
    lines = out.getvalue().splitlines()
    assert len([x for x in lines if LINE.match(x)]) == 3, lines
    assert "not shown" not in out.getvalue()
    assert any("uvicorn.error: Invalid HTTP request" in x for x in lines)


def test_uvicorns_chatter_stays_below_fireside_info():
    assert logs.uvicorn_level("info") == "warning"
    assert logs.uvicorn_level("warning") == "warning"
    assert logs.uvicorn_level("debug") == "debug"
    assert logs.uvicorn_level("error") == "error"
