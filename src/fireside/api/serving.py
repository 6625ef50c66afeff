"""Turns a validated request into engine requests, and engine outputs into responses.

Two phases, so that every client error is an HTTP status and never a broken
stream: `prepare` checks everything (model, features, prompts, context) and
submits nothing; `complete` or `stream` then runs the plan. One engine request
per prompt; the engine forks it `n` ways, and choice `index = prompt_index * n + j`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from fireside.api.errors import APIError
from fireside.api.metrics import ServingCounters
from fireside.api.prompts import check_token_ids, fit_to_context, tokenize_prompts
from fireside.api.protocol import CompletionRequest
from fireside.api.responses import SSE_DONE, choice_dict, completion_dict, sse_event, usage_dict
from fireside.engine.client import EngineClient
from fireside.engine.types import EngineRequest, FinishReason, RequestOutput, SamplingParams

logger = logging.getLogger(__name__)

# How often a non-streaming request checks whether its client has gone.
_DISCONNECT_POLL_S = 0.25

IsDisconnected = Callable[[], Awaitable[bool]]


class ClientDisconnected(Exception):
    """The client left before a non-streamed answer was ready; nothing to send."""


@dataclass(frozen=True)
class PromptPlan:
    index: int
    token_ids: tuple[int, ...]
    echo_text: str  # "" unless the request asked for echo
    params: SamplingParams  # max_tokens already fitted to the context


@dataclass(frozen=True)
class CompletionPlan:
    """A request that passed every check, ready to run."""

    cmpl_id: str
    created: int
    model: str
    engine: EngineClient
    prompts: tuple[PromptPlan, ...]
    n: int
    stream: bool

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p.token_ids) for p in self.prompts)

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n


class CompletionService:
    """The completions endpoint, minus HTTP."""

    def __init__(
        self,
        engines: Mapping[str, EngineClient],
        default_max_tokens: int = 16,
        counters: ServingCounters | None = None,
    ) -> None:
        self.engines = dict(engines)
        self.default_max_tokens = default_max_tokens
        self.counters = counters or ServingCounters()

    async def prepare(self, request: CompletionRequest) -> CompletionPlan:
        """Check everything a client could get wrong; raises `APIError`, submits nothing."""
        engine = self.engines.get(request.model)
        if engine is None:
            raise APIError.model_not_found(request.model)
        field = request.unsupported_field()
        if field is not None:
            raise APIError.unsupported(field)
        if request.images:
            raise APIError.invalid("model does not accept images", "images")
        if not engine.is_healthy:
            raise APIError.unavailable()

        prompts = await tokenize_prompts(engine, request.prompt)
        requested = request.requested_max_tokens
        max_tokens = self.default_max_tokens if requested is None else requested
        truncate = request.context_length_exceeded_behavior != "error"
        plans = []
        for index, (token_ids, text) in enumerate(prompts):
            check_token_ids(token_ids, engine.vocab_size, index)
            fitted = fit_to_context(len(token_ids), max_tokens, engine.context_length, truncate)
            echo_text = ""
            if request.echo:
                echo_text = text if text is not None else engine.detokenize(token_ids)
            params = request.to_sampling_params(fitted)
            plans.append(PromptPlan(index, tuple(token_ids), echo_text, params))
        plan = CompletionPlan(
            cmpl_id=f"cmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=request.model,
            engine=engine,
            prompts=tuple(plans),
            n=plans[0].params.n,
            stream=bool(request.stream),
        )
        logger.info(
            "completion %s: model=%s prompts=%d prompt_tokens=%d n=%d stream=%s user=%r",
            plan.cmpl_id,
            plan.model,
            len(plan.prompts),
            plan.num_prompt_tokens,
            plan.n,
            plan.stream,
            request.user,
        )
        return plan

    async def complete(
        self, plan: CompletionPlan, is_disconnected: IsDisconnected | None = None
    ) -> dict[str, Any]:
        """The whole response body. Aborts the engine requests if the client leaves."""
        self.counters.add_prompt_tokens(plan.model, plan.num_prompt_tokens)
        choices = _Choices(plan)
        for prompt in plan.prompts:
            if prompt.params.max_tokens == 0:
                # Nothing to generate (scoring with echo): the engine is not involved.
                for j in range(plan.n):
                    choices.finish(prompt.index * plan.n + j, FinishReason.LENGTH)
        tasks = [
            asyncio.create_task(self._collect(plan, prompt, choices))
            for prompt in plan.prompts
            if prompt.params.max_tokens > 0
        ]
        try:
            await _wait_all(tasks, is_disconnected)
        finally:
            await _cancel(tasks)
        for reason in choices.finish_reasons:
            self.counters.add_success(plan.model, reason)
        return completion_dict(
            plan.cmpl_id, plan.created, plan.model, choices.to_list(), choices.usage()
        )

    async def _collect(self, plan: CompletionPlan, prompt: PromptPlan, choices: _Choices) -> None:
        async for output in _generate(plan, prompt):
            choices.add(prompt, output)

    async def stream(self, plan: CompletionPlan) -> AsyncIterator[bytes]:
        """SSE events: text as it comes, usage last, then `[DONE]`.

        The caller stopping the iteration (Starlette cancels it when the client
        disconnects) cancels every prompt's task, which aborts its engine request.
        """
        self.counters.add_prompt_tokens(plan.model, plan.num_prompt_tokens)
        choices = _Choices(plan)
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        tasks = [
            asyncio.create_task(_pump(plan, prompt, queue))
            for prompt in plan.prompts
            if prompt.params.max_tokens > 0
        ]
        try:
            for prompt in plan.prompts:
                for j in range(plan.n):
                    index = prompt.index * plan.n + j
                    reason = FinishReason.LENGTH if prompt.params.max_tokens == 0 else None
                    if reason is not None:
                        choices.finish(index, reason)
                        self.counters.add_success(plan.model, reason.value)
                    if prompt.echo_text or reason is not None:
                        yield self._chunk(plan, index, prompt.echo_text, reason)
            num_running = len(tasks)
            while num_running:
                item = await queue.get()
                if item is None:
                    num_running -= 1
                    continue
                if isinstance(item, APIError):
                    yield sse_event(item.to_dict())
                    yield SSE_DONE
                    return
                prompt, output = item
                choices.add(prompt, output)
                for delta in output.deltas:
                    if delta.text or delta.finish_reason is not None:
                        index = prompt.index * plan.n + delta.index
                        reason = delta.finish_reason
                        if reason is not None:
                            self.counters.add_success(plan.model, reason.value)
                        yield self._chunk(plan, index, delta.text, reason)
            yield sse_event(
                completion_dict(plan.cmpl_id, plan.created, plan.model, [], choices.usage())
            )
            yield SSE_DONE
        finally:
            await _cancel(tasks)

    @staticmethod
    def _chunk(plan: CompletionPlan, index: int, text: str, reason: FinishReason | None) -> bytes:
        # One choice per chunk (as vLLM does): clients that read only choices[0]
        # still see every choice's text.
        choice = choice_dict(index, text, None if reason is None else reason.value)
        return sse_event(completion_dict(plan.cmpl_id, plan.created, plan.model, [choice]))


# --- Running


async def _generate(plan: CompletionPlan, prompt: PromptPlan) -> AsyncIterator[RequestOutput]:
    """One prompt's engine outputs; failures become `APIError`.

    Closing the engine's iterator explicitly (not at garbage collection) is what
    aborts the engine request promptly when we stop early.
    """
    request = EngineRequest(f"{plan.cmpl_id}-{prompt.index}", prompt.token_ids, prompt.params)
    outputs = plan.engine.generate(request)
    is_finished = False
    try:
        async for output in outputs:
            if output.error is not None:
                raise _engine_failure(plan, output.error)
            if any(d.finish_reason is FinishReason.ABORT for d in output.deltas):
                # We did not abort it, so the server is shutting down.
                raise APIError.unavailable("The server is shutting down; retry later.")
            is_finished = output.finished
            yield output
        if not is_finished:
            raise _engine_failure(plan, "outputs ended before the request finished")
    finally:
        aclose = getattr(outputs, "aclose", None)
        if aclose is not None:
            await aclose()


# A queue item: one output of one prompt, a failure, or None when a prompt is done.
_Item = tuple[PromptPlan, RequestOutput] | APIError | None


async def _pump(plan: CompletionPlan, prompt: PromptPlan, queue: asyncio.Queue[_Item]) -> None:
    try:
        async for output in _generate(plan, prompt):
            queue.put_nowait((prompt, output))
    except APIError as exc:
        queue.put_nowait(exc)
    except Exception:
        logger.exception("completion %s: streaming prompt %d failed", plan.cmpl_id, prompt.index)
        queue.put_nowait(APIError.internal())
    else:
        queue.put_nowait(None)


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


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    # Waiting lets each task close its engine iterator (the abort) before we return.
    # If we are cancelled again meanwhile (anyio re-delivers cancellation), the
    # tasks are already cancelled and finish on their own.
    with suppress(asyncio.CancelledError):
        await asyncio.gather(*tasks, return_exceptions=True)


def _engine_failure(plan: CompletionPlan, detail: str) -> APIError:
    logger.error("completion %s: engine failure: %s", plan.cmpl_id, detail)
    return APIError.internal("The engine failed while generating this completion.")


class _Choices:
    """Accumulated text, finish reasons and token counts of every choice."""

    def __init__(self, plan: CompletionPlan) -> None:
        self._n = plan.n
        self._texts = [p.echo_text for p in plan.prompts for _ in range(plan.n)]
        self._reasons: list[FinishReason | None] = [None] * plan.num_choices
        self._cached = [0] * len(plan.prompts)
        self._num_prompt_tokens = plan.num_prompt_tokens
        self._num_generated = 0

    def add(self, prompt: PromptPlan, output: RequestOutput) -> None:
        self._cached[prompt.index] = max(self._cached[prompt.index], output.num_cached_tokens)
        for delta in output.deltas:
            index = prompt.index * self._n + delta.index
            self._texts[index] += delta.text
            self._num_generated += len(delta.token_ids)
            if delta.finish_reason is not None:
                self._reasons[index] = delta.finish_reason

    def finish(self, index: int, reason: FinishReason) -> None:
        self._reasons[index] = reason

    @property
    def finish_reasons(self) -> list[str]:
        return [r.value for r in self._reasons if r is not None]

    def to_list(self) -> list[dict[str, Any]]:
        return [
            choice_dict(i, text, None if reason is None else reason.value)
            for i, (text, reason) in enumerate(zip(self._texts, self._reasons, strict=True))
        ]

    def usage(self) -> dict[str, Any]:
        return usage_dict(self._num_prompt_tokens, self._num_generated, sum(self._cached))
