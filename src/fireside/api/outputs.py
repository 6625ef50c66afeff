"""Engine outputs of a plan's prompts, checked, for the code that runs a plan.

One engine request per prompt, each read by a task of its own. Every failure
becomes an `APIError`, and closing a prompt's output iterator (cancelling its
task) aborts its engine request within one engine step.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import suppress

from fireside.api.errors import APIError
from fireside.api.plan import CompletionPlan, PromptPlan
from fireside.engine.types import EngineRequest, FinishReason, RequestOutput

logger = logging.getLogger(__name__)

# What a stream's prompt tasks send it: one output of one prompt, a failure, or None
# when a prompt is done.
OutputEvent = tuple[PromptPlan, RequestOutput] | APIError | None


async def prompt_outputs(plan: CompletionPlan, prompt: PromptPlan) -> AsyncIterator[RequestOutput]:
    """Submit one prompt's engine request and yield its outputs; failures as `APIError`.

    Closing the engine's iterator explicitly (not at garbage collection) is what
    aborts the engine request promptly when we stop early.
    """
    request = EngineRequest(
        f"{plan.cmpl_id}-{prompt.index}",
        prompt.token_ids,
        prompt.params,
        prompt.media,
        speculation=prompt.speculation,
        cache_isolation_key=plan.cache_isolation_key,
        cache_key=plan.cache_key,
        priority=plan.priority,
    )
    outputs = plan.engine.generate(request)
    is_finished = False
    is_first = True
    try:
        async for output in outputs:
            if output.error is not None:
                raise engine_failure(plan, output.error)
            problem = _problem_with(prompt, output, is_first)
            if problem is not None:
                raise engine_failure(plan, problem)
            is_first = False
            if any(d.finish_reason is FinishReason.ABORT for d in output.deltas):
                # We did not abort it, so the server is shutting down.
                raise APIError.unavailable("The server is shutting down; retry later.")
            is_finished = output.finished
            yield output
        if not is_finished:
            raise engine_failure(plan, "outputs ended before the request finished")
    finally:
        aclose = getattr(outputs, "aclose", None)
        if aclose is not None:
            await aclose()


def _problem_with(prompt: PromptPlan, output: RequestOutput, is_first: bool) -> str | None:
    """What is wrong with an engine output, as far as the response needs it."""
    params = prompt.params
    if is_first and prompt.is_scored:
        num_scored = len(prompt.token_ids) - params.prompt_logprobs_start
        if output.prompt_logprobs is None or len(output.prompt_logprobs) != num_scored:
            return "the first output lacks the prompt's logprobs"
    if params.logprobs is not None:
        for delta in output.deltas:
            if delta.logprobs is None or len(delta.logprobs) != len(delta.token_ids):
                return "a delta's logprobs do not match its tokens"
    return None


async def send_outputs(
    plan: CompletionPlan, prompt: PromptPlan, events: asyncio.Queue[OutputEvent]
) -> None:
    """One prompt's outputs into a stream's queue, then None, or the failure instead."""
    try:
        async for output in prompt_outputs(plan, prompt):
            events.put_nowait((prompt, output))
    except APIError as exc:
        events.put_nowait(exc)
    except Exception:
        logger.exception("completion %s: streaming prompt %d failed", plan.cmpl_id, prompt.index)
        events.put_nowait(APIError.internal())
    else:
        events.put_nowait(None)


async def cancel_and_wait(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel the prompt tasks and wait until each has closed its engine iterator."""
    for task in tasks:
        task.cancel()
    # Waiting lets each task close its engine iterator (the abort) before we return.
    # If we are cancelled again meanwhile (anyio re-delivers cancellation), the
    # tasks are already cancelled and finish on their own.
    with suppress(asyncio.CancelledError):
        await asyncio.gather(*tasks, return_exceptions=True)


def engine_failure(plan: CompletionPlan, detail: str) -> APIError:
    logger.error("completion %s: engine failure: %s", plan.cmpl_id, detail)
    return APIError.internal("The engine failed while generating this completion.")
