"""A stream's SSE chunks, and where its usage goes."""

from __future__ import annotations

from typing import Any

from fireside.api.choices import Choices
from fireside.api.metrics import ServingCounters
from fireside.api.plan import CompletionPlan
from fireside.api.protocol import StreamUsage
from fireside.api.responses import CompletionChunkChoice, chunk_dict, sse_event


class StreamChunks:
    """A stream's chunks, one choice each (as vLLM does): clients that read only
    `choices[0]` still see every choice's text, and never meet an empty list
    unless they asked for OpenAI's usage chunk.

    Usage (with the perf metrics, when asked) goes where `stream_options` says:
    not given, on the chunk that finishes the last choice; `include_usage: true`,
    on a final chunk of its own with no choices (every other chunk has `usage:
    null`, or with `continuous_usage_stats` its choice's usage so far, as in
    vLLM); `include_usage: false`, nowhere.
    """

    def __init__(self, plan: CompletionPlan, choices: Choices, counters: ServingCounters):
        self._plan = plan  # the chat endpoint's subclass (chat.py) reads it too
        self._choices = choices
        self._counters = counters
        self._num_finished = 0

    def of(self, choice: CompletionChunkChoice) -> bytes:
        """The event of one choice's chunk (b"" when it has nothing to say: a subclass's
        choice); counts the choice when it finishes it."""
        plan, options = self._plan, self._plan.options
        body = self.body([choice])
        if choice["finish_reason"] is not None:
            self._counters.add_success(plan.model, choice["finish_reason"])
            self._num_finished += 1
        is_last = self._num_finished == plan.num_choices
        if options.stream_usage is StreamUsage.LAST_CHOICE:
            body["usage"] = self._choices.usage() if is_last else None
        elif options.stream_usage is StreamUsage.SEPARATE:
            continuous = options.continuous_usage
            body["usage"] = self._choices.choice_usage(choice["index"]) if continuous else None
        if is_last and options.perf_metrics and options.stream_usage is not StreamUsage.SEPARATE:
            body["perf_metrics"] = self._choices.perf_metrics()
        return sse_event(body)

    def body(self, choices: list[CompletionChunkChoice]) -> dict[str, Any]:
        """A chunk with these choices, before usage: the completions shape here, the
        chat shape in chat.py's subclass."""
        plan = self._plan
        return dict(chunk_dict(plan.cmpl_id, plan.created, plan.model, choices))

    def usage(self) -> bytes:
        """OpenAI's final chunk: no choices, the request's usage."""
        plan = self._plan
        body = self.body([])
        body["usage"] = self._choices.usage()
        if plan.options.perf_metrics:
            body["perf_metrics"] = self._choices.perf_metrics()
        return sse_event(body)
