"""One log format for the whole process: Fireside's lines, uvicorn's and Python's warnings.

`configure` is called once, by `fireside serve`, before anything logs.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# uvicorn's loggers: they keep no handlers of their own and reach ours through the root.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    """Every record goes to `stream` (stderr) as `FORMAT`; `level` is Fireside's level."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.captureWarnings(True)


def uvicorn_level(level: str) -> str:
    """uvicorn's own level: its start-up chatter (info) says nothing Fireside does not."""
    return level if level in ("debug", "error") else "warning"
