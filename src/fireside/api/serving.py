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
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from fireside.api import images
from fireside.api.choices import Choices
from fireside.api.errors import APIError
from fireside.api.metrics import ServingCounters
from fireside.api.plan import CompletionPlan, OutputOptions, PromptPlan
from fireside.api.prompts import (
    check_logit_bias,
    check_token_ids,
    fit_to_context,
    tokenize_prompts,
)
from fireside.api.protocol import CompletionRequest, StreamUsage
from fireside.api.responses import SSE_DONE, completion_dict, perf_metrics_dict, sse_event
from fireside.api.structured import grammar_spec
from fireside.engine.client import EngineClient
from fireside.engine.types import EngineRequest, FinishReason, GrammarError, RequestOutput

logger = logging.getLogger(__name__)

# How often a non-streaming request checks whether its client has gone.
_DISCONNECT_POLL_S = 0.25

IsDisconnected = Callable[[], Awaitable[bool]]


class ClientDisconnected(Exception):
    """The client left before a non-streamed answer was ready; nothing to send."""


@dataclass(frozen=True)
class Completion:
    """A non-streamed answer: the body, and the perf metrics its headers carry."""

    body: dict[str, Any]
    perf_metrics: dict[str, Any]


class CompletionService:
    """The completions endpoint, minus HTTP."""

    def __init__(
        self,
        engines: Mapping[str, EngineClient],
        default_max_tokens: int = 16,
        counters: ServingCounters | None = None,
        max_image_bytes: int = 10 * 2**20,
        max_waiting: int = 256,
        request_timeout_s: float = 600.0,
        max_prompts: int = 128,
        max_total_tokens: int = 2**20,
        include_stop_str_in_output: bool = True,
    ) -> None:
        self.engines = dict(engines)
        self.default_max_tokens = default_max_tokens
        self.counters = counters or ServingCounters()
        self.max_image_bytes = max_image_bytes
        self.max_waiting = max_waiting  # engine requests queued beyond this: 429
        self.request_timeout_s = request_timeout_s
        self.max_prompts = max_prompts
        self.max_total_tokens = max_total_tokens  # generated tokens one request may ask for
        # For requests that do not say: true is the source document's, false OpenAI's.
        self.include_stop_str_in_output = include_stop_str_in_output
        self._reserved: Counter[str] = Counter()  # engine requests planned, not yet submitted

    async def prepare(self, request: CompletionRequest) -> CompletionPlan:
        """Check everything a client could get wrong; raises `APIError`, submits nothing."""
        started_at = time.monotonic()
        engine = self.engines.get(request.model)
        if engine is None:
            raise APIError.model_not_found(request.model)
        self._check_limits(request, engine)
        if request.images and not engine.supports_images:
            raise APIError.invalid("model does not accept images", "images")
        if not engine.is_healthy:
            raise APIError.unavailable()
        check_logit_bias(request.logit_bias_pairs, engine.vocab_size)
        grammar = await _compile_grammar(engine, request)
        if request.include_stop_str_in_output is None:
            request = request.model_copy(
                update={"include_stop_str_in_output": self.include_stop_str_in_output}
            )

        prompts = await tokenize_prompts(engine, request.prompt)
        media: list[Any] = [None] * len(prompts)
        if engine.supports_images:
            prompts, media = await self._with_images(engine, request, prompts)
        requested = request.requested_max_tokens
        max_tokens = self.default_max_tokens if requested is None else requested
        truncate = request.context_length_exceeded_behavior != "error"
        plans = []
        for index, (token_ids, text) in enumerate(prompts):
            if media[index] is None:  # image positions hold negative placeholder ids
                check_token_ids(token_ids, engine.vocab_size, index)
            num_tokens = len(token_ids)
            fitted = fit_to_context(num_tokens, max_tokens, engine.context_length, truncate)
            echo_text = _echo_text(engine, token_ids, text, request.num_echo_tokens(num_tokens))
            params = request.to_sampling_params(fitted, num_tokens, grammar)
            plans.append(PromptPlan(index, tuple(token_ids), text, echo_text, params, media[index]))
        options = OutputOptions(
            logprobs=request.logprobs_format,
            num_top_logprobs=request.num_top_logprobs or 0,
            return_token_ids=bool(request.return_token_ids),
            raw_output=bool(request.raw_output),
            perf_metrics=bool(request.perf_metrics_in_response),
            stream_usage=request.stream_usage,
            continuous_usage=request.continuous_usage_stats,
        )
        plan = CompletionPlan(
            cmpl_id=f"cmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=request.model,
            engine=engine,
            prompts=tuple(plans),
            n=plans[0].params.n,
            stream=bool(request.stream),
            options=options,
            started_at=started_at,
        )
        # Held until the engine has the requests; if the plan is dropped unrun (the
        # client left first), its finalizer gives the places back.
        count = sum(1 for p in plans if p.needs_engine)
        self._reserved[request.model] += count
        object.__setattr__(
            plan, "reservation", weakref.finalize(plan, self._release, request.model, count)
        )
        # Every `start` line gets one `done` line: a plan dropped unrun (the client left
        # before its stream began) logs it when it goes.
        done = _DoneLine(plan)
        object.__setattr__(plan, "done", done)
        weakref.finalize(plan, done, "aborted").atexit = False
        logger.info(
            "start id=%s model=%s prompts=%d prompt_tokens=%d n=%d stream=%s user=%r",
            plan.cmpl_id,
            plan.model,
            len(plan.prompts),
            plan.num_prompt_tokens,
            plan.n,
            plan.stream,
            request.user,
        )
        return plan

    def _release(self, model: str, count: int) -> None:
        self._reserved[model] -= count

    def _check_limits(self, request: CompletionRequest, engine: EngineClient) -> None:
        """Bounds on what one request may ask for, and on the queue (429 when full)."""
        prompt = request.prompt
        num_prompts = 1 if isinstance(prompt, str) or isinstance(prompt[0], int) else len(prompt)
        if num_prompts > self.max_prompts:
            raise APIError.invalid(
                f"at most {self.max_prompts} prompts per request, got {num_prompts}", "prompt"
            )
        n = request.n or 1
        if num_prompts * n > self.max_prompts:
            raise APIError.invalid(
                f"prompts x n is at most {self.max_prompts}, got {num_prompts} x {n}", "n"
            )
        # Requests checked but not yet handed to the engine count as waiting too:
        # without them, a burst would pass this check all at once.
        requested = request.requested_max_tokens
        max_tokens = self.default_max_tokens if requested is None else requested
        total = num_prompts * n * min(max_tokens, engine.context_length)
        if total > self.max_total_tokens:
            raise APIError.invalid(
                f"prompts x n x max_tokens may ask for at most {self.max_total_tokens} tokens, "
                f"this asks for {total}",
                "max_tokens",
            )
        waiting = engine.stats().num_waiting_requests + self._reserved[request.model]
        if waiting + num_prompts > self.max_waiting:
            # A rough wait: the queue drains at a few requests per second on a CPU.
            raise APIError.overloaded(retry_after_s=min(60, 1 + waiting // 8))

    async def _with_images(
        self,
        engine: EngineClient,
        request: CompletionRequest,
        prompts: list[tuple[list[int], str | None]],
    ) -> tuple[list[tuple[list[int], str | None]], list[Any]]:
        """Prompts with images tokenized through the model's projector (decoding,
        preprocessing and tokenizing in a worker thread)."""
        uris = images.assign(request.images, [text for _, text in prompts])
        if not any(uris):
            return prompts, [None] * len(prompts)
        limit = self.max_image_bytes

        def decode_and_tokenize() -> tuple[list[tuple[list[int], str | None]], list[Any]]:
            decoded, counter = [], 0
            for prompt_uris in uris:
                decoded.append(
                    [images.decode(u, counter + i, limit) for i, u in enumerate(prompt_uris)]
                )
                counter += len(prompt_uris)
            out: list[tuple[list[int], str | None]] = []
            media: list[Any] = []
            for (token_ids, text), pictures in zip(prompts, decoded, strict=True):
                if not pictures or text is None:
                    out.append((token_ids, text))
                    media.append(None)
                    continue
                try:
                    ids, handle = engine.tokenize_media(text, pictures)
                except ValueError as exc:
                    raise APIError.invalid(str(exc), "images") from None
                out.append((ids, text))
                media.append(handle)
            return out, media

        return await asyncio.to_thread(decode_and_tokenize)

    async def complete(
        self, plan: CompletionPlan, is_disconnected: IsDisconnected | None = None
    ) -> Completion:
        """The whole answer. Aborts the engine requests if the client leaves."""
        self.counters.add_prompt_tokens(plan.model, plan.num_prompt_tokens)
        choices = Choices(plan)
        for prompt in plan.prompts:
            choices.start(prompt)
        tasks = [
            asyncio.create_task(self._collect(plan, prompt, choices))
            for prompt in plan.prompts
            if prompt.needs_engine
        ]
        await asyncio.sleep(0)  # each task submits its engine request before its first wait
        plan.reservation()
        try:
            async with asyncio.timeout(self.request_timeout_s):
                await _wait_all(tasks, is_disconnected)
        except TimeoutError:
            error = _timed_out(plan, self.request_timeout_s)
            plan.done(_end_status(error), choices)
            raise error from None
        except BaseException as exc:
            plan.done(_end_status(exc), choices)
            raise
        finally:
            await _cancel(tasks)
        for reason in choices.finish_reasons:
            self.counters.add_success(plan.model, reason)
        _observe(self.counters, plan, choices)
        perf_metrics = _perf_metrics(plan, choices)
        body = completion_dict(
            plan.cmpl_id,
            plan.created,
            plan.model,
            choices.to_list(),
            choices.usage(),
            perf_metrics if plan.options.perf_metrics else None,
        )
        return Completion(body, perf_metrics)

    async def _collect(self, plan: CompletionPlan, prompt: PromptPlan, choices: Choices) -> None:
        async for output in _generate(plan, prompt):
            choices.add(prompt, output)

    async def stream(self, plan: CompletionPlan) -> AsyncIterator[bytes]:
        """SSE events: text as it comes, then `[DONE]`; usage where `_Chunks` puts it.

        The caller stopping the iteration (Starlette cancels it when the client
        disconnects) cancels every prompt's task, which aborts its engine request.
        """
        self.counters.add_prompt_tokens(plan.model, plan.num_prompt_tokens)
        choices = Choices(plan)
        chunks = _Chunks(plan, choices, self.counters)
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        tasks = [
            asyncio.create_task(_pump(plan, prompt, queue))
            for prompt in plan.prompts
            if prompt.needs_engine
        ]
        await asyncio.sleep(0)  # each task submits its engine request before its first wait
        plan.reservation()
        try:
            for prompt in plan.prompts:
                for choice in choices.start(prompt):
                    yield chunks.of(choice)
            num_running = len(tasks)
            deadline = plan.started_at + self.request_timeout_s
            while num_running:
                try:
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                        item = await queue.get()
                except TimeoutError:
                    item = _timed_out(plan, self.request_timeout_s)
                if item is None:
                    num_running -= 1
                    continue
                if isinstance(item, APIError):
                    plan.done(_end_status(item), choices)
                    yield sse_event(item.to_dict())
                    yield SSE_DONE
                    return
                prompt, output = item
                for choice in choices.add(prompt, output):
                    yield chunks.of(choice)
            if plan.options.stream_usage is StreamUsage.SEPARATE:
                yield chunks.usage()
            yield SSE_DONE
            _observe(self.counters, plan, choices)
        finally:
            plan.done("aborted", choices)  # unless logged above: the client left
            await _cancel(tasks)


class _Chunks:
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
        self._plan = plan
        self._choices = choices
        self._counters = counters
        self._num_finished = 0

    def of(self, choice: dict[str, Any]) -> bytes:
        plan, options = self._plan, self._plan.options
        body = completion_dict(plan.cmpl_id, plan.created, plan.model, [choice])
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
            body["perf_metrics"] = _perf_metrics(plan, self._choices)
        return sse_event(body)

    def usage(self) -> bytes:
        """OpenAI's final chunk: no choices, the request's usage."""
        plan = self._plan
        perf_metrics = _perf_metrics(plan, self._choices) if plan.options.perf_metrics else None
        return sse_event(
            completion_dict(
                plan.cmpl_id, plan.created, plan.model, [], self._choices.usage(), perf_metrics
            )
        )


async def _compile_grammar(engine: EngineClient, request: CompletionRequest) -> str | None:
    spec = grammar_spec(request.response_format)
    if spec is None:
        return None
    try:
        # Off the event loop: a large schema can take a while to compile.
        return await asyncio.to_thread(engine.compile_grammar, spec)
    except GrammarError as exc:
        raise APIError.invalid(
            f"response_format could not be compiled: {exc}", "response_format", "invalid_grammar"
        ) from None


def _echo_text(
    engine: EngineClient, token_ids: list[int], text: str | None, num_echo_tokens: int
) -> str:
    if num_echo_tokens == 0:
        return ""
    # Control tokens (`<|im_start|>`) render as their text, as in a text prompt.
    if num_echo_tokens < len(token_ids):
        return engine.detokenize(token_ids[-num_echo_tokens:], special=True)
    # The whole prompt: as sent, since detokenizing need not give the same string back.
    return text if text is not None else engine.detokenize(token_ids, special=True)


def _perf_metrics(plan: CompletionPlan, choices: Choices) -> dict[str, Any]:
    now = time.monotonic()
    # Nothing generated (scoring only): the first token is as late as the end.
    first_token_at = now if choices.first_token_at is None else choices.first_token_at
    return perf_metrics_dict(
        plan.num_prompt_tokens,
        choices.num_cached_tokens,
        first_token_at - plan.started_at,
        now - plan.started_at,
    )


# --- Running


async def _generate(plan: CompletionPlan, prompt: PromptPlan) -> AsyncIterator[RequestOutput]:
    """One prompt's engine outputs; failures become `APIError`.

    Closing the engine's iterator explicitly (not at garbage collection) is what
    aborts the engine request promptly when we stop early.
    """
    request = EngineRequest(
        f"{plan.cmpl_id}-{prompt.index}", prompt.token_ids, prompt.params, prompt.media
    )
    outputs = plan.engine.generate(request)
    is_finished = False
    is_first = True
    try:
        async for output in outputs:
            if output.error is not None:
                raise _engine_failure(plan, output.error)
            problem = _check_output(prompt, output, is_first)
            if problem is not None:
                raise _engine_failure(plan, problem)
            is_first = False
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


def _check_output(prompt: PromptPlan, output: RequestOutput, is_first: bool) -> str | None:
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


def _observe(counters: ServingCounters, plan: CompletionPlan, choices: Choices) -> None:
    """Latency histograms and the log line of one finished request (never its text)."""
    total = time.monotonic() - plan.started_at
    ttft = None if choices.first_token_at is None else choices.first_token_at - plan.started_at
    plan.done(200, choices)
    if ttft is None:
        return
    model = plan.model
    counters.ttft.labels(model).observe(ttft)
    counters.e2e.labels(model).observe(total)
    itl = counters.itl.labels(model)
    for gap in choices.token_gaps:
        itl.observe(gap)


class _DoneLine:
    """The `done` log line of one started request, written once however it ends:
    `status` is the HTTP status, `aborted` (the client left) or `timeout`. Holds
    what it needs rather than the plan, so that a plan's finalizer may call it."""

    def __init__(self, plan: CompletionPlan) -> None:
        self.cmpl_id = plan.cmpl_id
        self.model = plan.model
        self.stream = plan.stream
        self.num_prompt_tokens = plan.num_prompt_tokens
        self.started_at = plan.started_at
        self.is_logged = False

    def __call__(self, status: int | str, choices: Choices | None = None) -> None:
        if self.is_logged:
            return
        self.is_logged = True
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


def _end_status(exc: BaseException) -> int | str:
    """What a `done` line says of a request that ended with this exception."""
    if isinstance(exc, APIError):
        return "timeout" if exc.code == "request_timeout" else exc.status
    if isinstance(exc, ClientDisconnected | asyncio.CancelledError | GeneratorExit):
        return "aborted"
    return 500


def _timed_out(plan: CompletionPlan, limit: float) -> APIError:
    return APIError(
        408,
        f"The request took longer than the server's limit of {limit:.0f}s and was stopped.",
        "timeout_error",
        None,
        "request_timeout",
    )


def _engine_failure(plan: CompletionPlan, detail: str) -> APIError:
    logger.error("completion %s: engine failure: %s", plan.cmpl_id, detail)
    return APIError.internal("The engine failed while generating this completion.")
