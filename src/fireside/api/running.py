"""Running a plan: its engine requests submitted, their outputs turned into one whole
response (`complete`) or SSE events (`stream`).

Every check ran when the plan was made (planning.py), so what can still go wrong
here is the engine failing, the time limit, or the client leaving. Each run is
wrapped in `RequestLog.finishing`, which writes the request's `done` line
however it ends, and submits inside `with plan.queue_hold`, which gives the
plan's queue places back once the engine has its requests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from fireside.api.choices import Choices
from fireside.api.errors import APIError
from fireside.api.metrics import ServingCounters
from fireside.api.outputs import OutputEvent, cancel_and_wait, prompt_outputs, send_outputs
from fireside.api.plan import CompletionPlan, PromptPlan
from fireside.api.protocol import StreamUsage
from fireside.api.request_log import ClientDisconnected, end_status
from fireside.api.responses import SSE_DONE, Completion, PerfMetrics, completion_dict, sse_event
from fireside.api.stream_chunks import StreamChunks

# How often a non-streaming request checks whether its client has gone.
_DISCONNECT_POLL_S = 0.25

IsDisconnected = Callable[[], Awaitable[bool]]
# What makes a stream's chunks: StreamChunks, or the chat endpoint's (chat.py).
ChunkFormat = Callable[[CompletionPlan, Choices, ServingCounters], StreamChunks]


@dataclass(frozen=True)
class CompletionResult:
    """A non-streamed answer: the body, and the perf metrics its headers carry."""

    body: Completion
    perf_metrics: PerfMetrics


class PlanRunner:
    """Runs plans against their engines, within the server's time limit per request."""

    def __init__(self, counters: ServingCounters, request_timeout_s: float) -> None:
        self.counters = counters
        self.request_timeout_s = request_timeout_s

    async def complete(
        self, plan: CompletionPlan, is_disconnected: IsDisconnected | None = None
    ) -> CompletionResult:
        """The whole answer. Aborts the engine requests if the client leaves
        (`ClientDisconnected`) or the time limit passes (408)."""
        self.counters.add_prompt_tokens(plan.model, plan.num_prompt_tokens)
        choices = Choices(plan)
        with plan.log.finishing(choices):
            for prompt in plan.prompts:
                choices.start(prompt)
            with plan.queue_hold:
                tasks = [
                    asyncio.create_task(_collect(plan, prompt, choices))
                    for prompt in plan.prompts
                    if prompt.needs_engine
                ]
                await asyncio.sleep(0)  # each task submits its engine request now
            try:
                async with asyncio.timeout(self.request_timeout_s):
                    await _wait_all(tasks, is_disconnected)
            except TimeoutError:
                raise _timed_out(self.request_timeout_s) from None
            finally:
                await cancel_and_wait(tasks)
            for reason in choices.finish_reasons:
                self.counters.add_success(plan.model, reason)
            self._finish(plan, choices)
        perf_metrics = choices.perf_metrics()
        body = completion_dict(
            plan.cmpl_id,
            plan.created,
            plan.model,
            choices.to_list(),
            choices.usage(),
            perf_metrics if plan.options.perf_metrics else None,
        )
        return CompletionResult(body, perf_metrics)

    async def stream(
        self, plan: CompletionPlan, chunk_format: ChunkFormat = StreamChunks
    ) -> AsyncIterator[bytes]:
        """SSE events: text as it comes, then `[DONE]`; usage where `StreamChunks` puts it.

        An error after the stream began is an error event, then `[DONE]`. The caller
        stopping the iteration (Starlette cancels it when the client disconnects)
        cancels every prompt's task, which aborts its engine request.
        """
        self.counters.add_prompt_tokens(plan.model, plan.num_prompt_tokens)
        choices = Choices(plan)
        chunks = chunk_format(plan, choices, self.counters)
        events: asyncio.Queue[OutputEvent] = asyncio.Queue()
        tasks: list[asyncio.Task[None]] = []
        with plan.log.finishing(choices):
            try:
                with plan.queue_hold:
                    tasks += [
                        asyncio.create_task(send_outputs(plan, prompt, events))
                        for prompt in plan.prompts
                        if prompt.needs_engine
                    ]
                    await asyncio.sleep(0)  # each task submits its engine request now
                for prompt in plan.prompts:
                    for choice in choices.start(prompt):
                        if sse := chunks.of(choice):  # b"": nothing to send
                            yield sse
                num_running = len(tasks)
                deadline = plan.started_at + self.request_timeout_s
                while num_running:
                    try:
                        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                            event = await events.get()
                    except TimeoutError:
                        event = _timed_out(self.request_timeout_s)
                    if event is None:
                        num_running -= 1
                        continue
                    if isinstance(event, APIError):
                        plan.log.finish(end_status(event), choices)
                        yield sse_event(event.to_dict())
                        yield SSE_DONE
                        return
                    prompt, output = event
                    for choice in choices.add(prompt, output):
                        if sse := chunks.of(choice):
                            yield sse
                if plan.options.stream_usage is StreamUsage.SEPARATE:
                    yield chunks.usage()
                yield SSE_DONE
                self._finish(plan, choices)
            finally:
                await cancel_and_wait(tasks)

    def _finish(self, plan: CompletionPlan, choices: Choices) -> None:
        """A request answered in full: its `done` line and latency histograms."""
        total = time.monotonic() - plan.started_at
        plan.log.finish(200, choices)
        if choices.first_token_at is not None:
            ttft = choices.first_token_at - plan.started_at
            self.counters.observe_latencies(plan.model, ttft, total, choices.token_gaps)


async def _collect(plan: CompletionPlan, prompt: PromptPlan, choices: Choices) -> None:
    async for output in prompt_outputs(plan, prompt):
        choices.add(prompt, output)


async def _wait_all(
    tasks: list[asyncio.Task[None]], is_disconnected: IsDisconnected | None
) -> None:
    """Wait for every task; raise the first failure, or `ClientDisconnected`."""
    pending = set(tasks)
    while pending:
        done, pending = await asyncio.wait(
            pending, timeout=_DISCONNECT_POLL_S, return_when=asyncio.FIRST_EXCEPTION
        )
        for task in done:
            task.result()
        if pending and is_disconnected is not None and await is_disconnected():
            raise ClientDisconnected


def _timed_out(limit_s: float) -> APIError:
    return APIError(
        408,
        f"The request took longer than the server's limit of {limit_s:.0f}s and was stopped.",
        "timeout_error",
        None,
        "request_timeout",
    )
