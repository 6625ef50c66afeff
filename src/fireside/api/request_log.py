"""The request log: a `start` line when a request is planned and exactly one `done`
line however it ends; never its text.

`done` says `status=`: the HTTP status, `aborted` (the client left) or `timeout`.
The code that runs a plan wraps the run in `RequestLog.finishing`, so every way
out of it writes the line; the one request that never runs (a plan dropped
because its client left before the stream began) gets its line from the
planner's finalizer (planning.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from fireside.api.errors import APIError

if TYPE_CHECKING:
    from fireside.api.choices import Choices

logger = logging.getLogger("fireside.api.serving")  # the name operators filter on

Status = int | str  # an HTTP status, "aborted" or "timeout"


class ClientDisconnected(Exception):
    """The client left before a non-streamed answer was ready; nothing to send."""


def end_status(exc: BaseException) -> Status:
    """What a `done` line says of a request that ended with this exception."""
    if isinstance(exc, APIError):
        return "timeout" if exc.code == "request_timeout" else exc.status
    if isinstance(exc, ClientDisconnected | asyncio.CancelledError | GeneratorExit):
        return "aborted"
    return 500


class RequestLog:
    """The log lines of one request. Holds what they need rather than the plan, so
    that a finalizer of the plan may write the `done` line."""

    def __init__(
        self, cmpl_id: str, model: str, stream: bool, num_prompt_tokens: int, started_at: float
    ) -> None:
        self.cmpl_id = cmpl_id
        self.model = model
        self.stream = stream
        self.num_prompt_tokens = num_prompt_tokens
        self.started_at = started_at  # time.monotonic()
        self.is_finished = False

    def start(self, num_prompts: int, n: int, user: str | None) -> None:
        logger.info(
            "start id=%s model=%s prompts=%d prompt_tokens=%d n=%d stream=%s user=%r",
            self.cmpl_id,
            self.model,
            num_prompts,
            self.num_prompt_tokens,
            n,
            self.stream,
            user,
        )

    @contextmanager
    def finishing(self, choices: Choices) -> Iterator[None]:
        """Around a run: an exception out of it ends the request with its status; a
        run that returns without `finish` (a stream closed by its client) is aborted."""
        try:
            yield
        except BaseException as exc:
            self.finish(end_status(exc), choices)
            raise
        finally:
            self.finish("aborted", choices)  # unless finished above, or by the run

    def finish(self, status: Status, choices: Choices | None = None) -> None:
        """Write the `done` line; only the first call writes."""
        if self.is_finished:
            return
        self.is_finished = True
        total = time.monotonic() - self.started_at
        prompt_tokens, cached_tokens, completion_tokens = self.num_prompt_tokens, 0, 0
        ttft, finish = "-", "-"
        if choices is not None:
            usage = choices.usage()
            prompt_tokens = usage["prompt_tokens"]
            cached_tokens = usage["prompt_tokens_details"]["cached_tokens"]
            completion_tokens = usage["completion_tokens"]
            if choices.first_token_at is not None:
                ttft = f"{choices.first_token_at - self.started_at:.3f}"
            finish = ",".join(sorted(set(choices.finish_reasons))) or "-"
        is_error = status == "timeout" or isinstance(status, int) and status >= 500
        logger.log(
            logging.WARNING if is_error else logging.INFO,
            "done id=%s model=%s status=%s stream=%s prompt_tokens=%d cached_tokens=%d "
            "completion_tokens=%d ttft_s=%s total_s=%.3f finish=%s",
            self.cmpl_id,
            self.model,
            status,
            self.stream,
            prompt_tokens,
            cached_tokens,
            completion_tokens,
            ttft,
            total,
            finish,
        )
