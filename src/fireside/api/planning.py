"""Planning a completion: every check a client could fail, before anything runs.

`CompletionPlanner.prepare` resolves the model, bounds what the request asks
for, holds its places in the waiting queue (429 when full), compiles its
grammar, tokenizes its prompts (images too) and its draft (`speculation`,
`prediction`), fits each prompt to the context, and decides which cached
prefixes it may share (`cache_isolation_key`). It
raises `APIError` and submits nothing, so a client error is always an HTTP
status and never a broken stream. One engine request per prompt; the engine
forks it `n` ways. Running the plan is `running.py`'s job.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Mapping

from fireside.api import images
from fireside.api.admission import Admission
from fireside.api.errors import APIError
from fireside.api.plan import Caller, CompletionPlan, OutputOptions, PromptPlan
from fireside.api.prompts import (
    check_logit_bias,
    check_token_ids,
    draft_token_ids,
    fit_to_context,
    tokenize_prompts,
)
from fireside.api.protocol import CompletionRequest
from fireside.api.request_log import RequestLog
from fireside.api.responses import new_completion_id
from fireside.api.structured import grammar_spec as grammar_spec_of
from fireside.engine.client import EngineClient
from fireside.engine.types import GrammarError, GrammarSpec
from fireside.runner.base import MediaPrompt

# (token ids, the prompt's text or None for token ids), one per prompt.
TokenizedPrompts = list[tuple[list[int], str | None]]


class CompletionPlanner:
    """Checked requests into plans. The settings are the server's (config.ServeConfig)."""

    def __init__(
        self,
        engines: Mapping[str, EngineClient],
        admission: Admission,
        *,
        default_max_tokens: int,
        include_stop_str_in_output: bool,
        max_image_bytes: int,
        max_prompts: int,
        max_total_tokens: int,
        isolate_cache_per_key: bool,
    ) -> None:
        self.engines = dict(engines)
        self.admission = admission
        self.default_max_tokens = default_max_tokens
        # For requests that do not say: true is the source document's, false OpenAI's.
        self.include_stop_str_in_output = include_stop_str_in_output
        self.max_image_bytes = max_image_bytes
        self.max_prompts = max_prompts
        self.max_total_tokens = max_total_tokens  # generated tokens one request may ask for
        # `--prompt-cache-isolation per-key`: each API key's requests share cached KV only
        # among themselves, so `cached_tokens` tells no tenant what another one sent.
        self.isolate_cache_per_key = isolate_cache_per_key

    async def prepare(
        self,
        request: CompletionRequest,
        caller: Caller | None = None,
        *,
        tokenized: tuple[list[int], str] | None = None,
        grammar_spec: GrammarSpec | None = None,
        id_prefix: str = "cmpl-",
    ) -> CompletionPlan:
        """Check everything a client could get wrong; raises `APIError`, submits nothing.

        Chat completions (chat.py) plan their rendered prompt here too: `tokenized` is
        its token ids and text (instead of tokenizing `request.prompt`), and
        `grammar_spec` a tool-call grammar (instead of `response_format`'s)."""
        started_at = time.monotonic()
        caller = caller or Caller()
        engine = self.engines.get(request.model)
        if engine is None:
            raise APIError.model_not_found(request.model)
        num_prompts = self._check_size(request, engine)
        self.admission.check_room(request.model, engine, num_prompts)
        if request.images and not engine.supports_images:
            raise APIError.invalid("model does not accept images", "images")
        if not engine.is_healthy:
            raise APIError.unavailable()
        check_logit_bias(request.logit_bias_pairs, engine.vocab_size)
        grammar = await _compile_grammar(
            engine, grammar_spec or grammar_spec_of(request.response_format)
        )
        if request.include_stop_str_in_output is None:
            request = request.model_copy(
                update={"include_stop_str_in_output": self.include_stop_str_in_output}
            )

        draft_param = "speculation" if request.speculation is not None else "prediction"
        draft = await draft_token_ids(engine, request.draft, draft_param)
        if tokenized is not None:
            prompts: TokenizedPrompts = [tokenized]
        else:
            prompts = await tokenize_prompts(engine, request.prompt)
        media: list[MediaPrompt | None] = [None] * len(prompts)
        if engine.supports_images:
            prompts, media = await self._tokenize_images(engine, request, prompts)
        max_tokens = self._max_tokens(request)
        truncate = request.context_length_exceeded_behavior != "error"
        plans = []
        for index, (token_ids, text) in enumerate(prompts):
            if media[index] is None:  # image positions hold negative placeholder ids
                check_token_ids(token_ids, engine.vocab_size, index)
            num_tokens = len(token_ids)
            fitted = fit_to_context(num_tokens, max_tokens, engine.context_length, truncate)
            echo_text = _echo_text(engine, token_ids, text, request.num_echo_tokens(num_tokens))
            params = request.to_sampling_params(fitted, num_tokens, grammar)
            plans.append(
                PromptPlan(
                    index,
                    tuple(token_ids),
                    text,
                    echo_text,
                    params,
                    media[index],
                    speculation=draft[:fitted],  # no output token lies beyond max_tokens
                )
            )
        return self._plan(request, engine, tuple(plans), started_at, caller, id_prefix)

    def _isolation_key(self, request: CompletionRequest, caller: Caller) -> str | None:
        """The engine's key for which cached prefixes the request may share: the body's
        `prompt_cache_isolation_key`, else the header's; per API key, under the key's
        digest (a fixed-length prefix, so no tenant can name another's space)."""
        key = request.prompt_cache_isolation_key
        if key is None:
            key = caller.isolation_header
        if self.isolate_cache_per_key and caller.tenant is not None:
            return caller.tenant if key is None else f"{caller.tenant}/{key}"
        return key

    def _plan(
        self,
        request: CompletionRequest,
        engine: EngineClient,
        prompts: tuple[PromptPlan, ...],
        started_at: float,
        caller: Caller,
        id_prefix: str,
    ) -> CompletionPlan:
        cmpl_id = new_completion_id(id_prefix)
        stream = bool(request.stream)
        log = RequestLog(
            cmpl_id, request.model, stream, sum(len(p.token_ids) for p in prompts), started_at
        )
        num_engine_requests = sum(1 for p in prompts if p.needs_engine)
        plan = CompletionPlan(
            cmpl_id=cmpl_id,
            created=int(time.time()),
            model=request.model,
            engine=engine,
            prompts=prompts,
            n=prompts[0].params.n,
            stream=stream,
            options=_output_options(request),
            started_at=started_at,
            queue_hold=self.admission.hold(request.model, num_engine_requests),
            log=log,
            cache_isolation_key=self._isolation_key(request, caller),
            cache_key=affinity_key(request.prompt_cache_key, request.user),
            priority=request.is_priority,
        )
        log.start(len(prompts), plan.n, request.user)
        # Every `start` line gets one `done` line: a plan dropped unrun (the client left
        # before its stream began) never reaches `RequestLog.finishing`, so it writes
        # the line when it goes. Its queue places go with it (admission.py).
        weakref.finalize(plan, log.finish, "aborted").atexit = False
        return plan

    def _max_tokens(self, request: CompletionRequest) -> int:
        requested = request.requested_max_tokens
        return self.default_max_tokens if requested is None else requested

    def _check_size(self, request: CompletionRequest, engine: EngineClient) -> int:
        """Bounds on what one request may ask for; returns its number of prompts."""
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
        total = num_prompts * n * min(self._max_tokens(request), engine.context_length)
        if total > self.max_total_tokens:
            raise APIError.invalid(
                f"prompts x n x max_tokens may ask for at most {self.max_total_tokens} tokens, "
                f"this asks for {total}",
                "max_tokens",
            )
        return num_prompts

    async def _tokenize_images(
        self, engine: EngineClient, request: CompletionRequest, prompts: TokenizedPrompts
    ) -> tuple[TokenizedPrompts, list[MediaPrompt | None]]:
        """Prompts with images tokenized through the model's projector, and their media
        handles (decoding, preprocessing and tokenizing in a worker thread)."""
        uris = images.assign(request.images, [text for _, text in prompts])
        if not any(uris):
            return prompts, [None] * len(prompts)
        limit = self.max_image_bytes

        def decode_and_tokenize() -> tuple[TokenizedPrompts, list[MediaPrompt | None]]:
            decoded, counter = [], 0
            for prompt_uris in uris:
                decoded.append(
                    [images.decode(u, counter + i, limit) for i, u in enumerate(prompt_uris)]
                )
                counter += len(prompt_uris)
            out: TokenizedPrompts = []
            media: list[MediaPrompt | None] = []
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


def _output_options(request: CompletionRequest) -> OutputOptions:
    return OutputOptions(
        logprobs=request.logprobs_format,
        num_top_logprobs=request.num_top_logprobs or 0,
        return_token_ids=bool(request.return_token_ids),
        raw_output=bool(request.raw_output),
        perf_metrics=bool(request.perf_metrics_in_response),
        stream_usage=request.stream_usage,
        continuous_usage=request.continuous_usage_stats,
    )


async def _compile_grammar(engine: EngineClient, spec: GrammarSpec | None) -> str | None:
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
    """What the choice's text starts with: the last `num_echo_tokens` of the prompt."""
    if num_echo_tokens == 0:
        return ""
    # Control tokens (`<|im_start|>`) render as their text, as in a text prompt.
    if num_echo_tokens < len(token_ids):
        return engine.detokenize(token_ids[-num_echo_tokens:], special=True)
    # The whole prompt: as sent, since detokenizing need not give the same string back.
    return text if text is not None else engine.detokenize(token_ids, special=True)


def affinity_key(prompt_cache_key: str | None, user: str | None) -> str | None:
    """The key a cluster router keeps a session on one replica by: `prompt_cache_key`,
    else `user` (the hosted API's precedence); the prefixes keep the two apart."""
    if prompt_cache_key:
        return f"key:{prompt_cache_key}"
    if user:
        return f"user:{user}"
    return None
