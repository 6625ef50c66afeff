"""The engine as asyncio code sees it: `Engine`, the `EngineClient` the API layer uses.

`generate()` hands a request to the engine thread (`core.EngineCore`, which
owns the model and runs the steps) and yields what it produces from a
per-request asyncio queue. All the outputs of one step reach each event loop
in a single `call_soon_threadsafe` (`publish`). Tokenizing and grammar
compiling run on the caller's thread, outside the step loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from fireside.engine.core import EngineCore
from fireside.engine.grammar import Grammars
from fireside.engine.request import OutputSink
from fireside.engine.scheduler import MAX_SCORED_ROWS, MIN_CACHE_HIT, Scheduler, SchedulerConfig
from fireside.engine.speculation import MAX_DRAFT, SpeculationConfig
from fireside.engine.types import (
    EngineRequest,
    EngineStats,
    GrammarSpec,
    PromptImage,
    RequestOutput,
)
from fireside.runner.base import MediaPrompt, Runner, TokenizerInfo


@dataclass(frozen=True)
class EngineConfig:
    """No defaults: `server.py` fills it from `config.ServeConfig`, the one place they live."""

    max_running: int  # sequences decoding at once; `--parallel`
    token_budget: int  # tokens per step, at most the runner's n_batch; `--batch-size`
    cache_entries: int  # finished sequences kept in the prefix cache, 0: off; `--prefix-cache`
    prefill_chunk: int  # prompt tokens per step while streams are decoding; `--prefill-chunk`
    speculate_auto: bool  # prompt-lookup drafts for every request; `--speculate auto`
    speculate_max_running: int  # ... only while at most this many run; `--speculate-max-running`
    # Batch-invariant steps (`--deterministic`; needs a runner without a unified KV
    # cache, the default): fixed prompt chunks, each computed alone, no drafts.
    deterministic: bool


def scheduler_config(config: EngineConfig, runner: Runner) -> SchedulerConfig:
    """The engine's settings within what the runner's context allows."""
    return SchedulerConfig(
        num_slots=runner.n_seq_max,
        max_running=min(config.max_running, runner.n_seq_max),
        kv_capacity=runner.n_ctx,
        slot_cells=0 if runner.kv_unified else runner.n_ctx_seq,
        token_budget=min(config.token_budget, runner.n_batch),
        max_scored_rows=MAX_SCORED_ROWS,
        cache_entries=config.cache_entries,
        # In a unified cache idle cached cells slow every decode row's attention; in a
        # stream of their own they cost only the memory, which is allocated anyway.
        cache_cells=runner.n_ctx // 4 if runner.kv_unified else runner.n_ctx,
        prefill_chunk=config.prefill_chunk,
        min_cache_hit=MIN_CACHE_HIT,
        fixed_chunk=(
            min(config.prefill_chunk, config.token_budget, runner.n_batch, MAX_SCORED_ROWS)
            if config.deterministic
            else 0
        ),
    )


@dataclass
class _Sink:
    """One request's queue, and the event loop that reads it (`OutputSink`)."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput]

    def put_nowait(self, output: RequestOutput) -> None:
        self.queue.put_nowait(output)


def publish(outputs: list[tuple[OutputSink, RequestOutput]]) -> None:
    """Hand a step's outputs to their event loops, one callback per loop (engine thread)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[OutputSink, RequestOutput]]] = {}
    for sink, output in outputs:
        by_loop.setdefault(sink.loop, []).append((sink, output))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the loop has closed; nobody is listening
            pass


def _put_all(items: list[tuple[OutputSink, RequestOutput]]) -> None:
    for sink, output in items:
        sink.put_nowait(output)


class Engine:
    def __init__(self, runner: Runner, config: EngineConfig) -> None:
        self.runner = runner
        self.config = config
        self.grammars = Grammars(runner.grammar_tokenizer, num_threads=runner.n_threads)
        speculation = SpeculationConfig(
            auto=config.speculate_auto and not config.deterministic,
            auto_max_running=config.speculate_max_running,
            max_draft=MAX_DRAFT,
        )
        self.core = EngineCore(
            runner, scheduler_config(config, runner), self.grammars, publish, speculation
        )

    # -- lifecycle ---------------------------------------------------------

    def start(self, background: bool = True) -> None:
        """Start taking requests; without `background`, the caller steps with `run_once`."""
        self.core.start(background)

    def run_once(self) -> None:
        """Take new requests and aborts, then run one step (when started without a thread)."""
        self.core.run_once()

    def shutdown(self) -> None:
        self.core.shutdown()

    @property
    def scheduler(self) -> Scheduler:
        return self.core.scheduler

    # -- the EngineClient interface -----------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    @property
    def context_length(self) -> int:
        return self.core.executor.context_length

    @property
    def is_healthy(self) -> bool:
        return self.core.is_running and not self.core.is_dead

    @property
    def is_dead(self) -> bool:
        """The engine thread failed: nothing more will run; the process should restart."""
        return self.core.is_dead

    def crash_for_test(self) -> None:
        """Make the engine thread fail at its next step (tests of failure handling)."""
        self.core.crash_for_test()

    def tokenize(
        self, text: str, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        return self.runner.tokenize(text, add_special, parse_special)

    def tokenizer_info(self) -> TokenizerInfo:
        return self.runner.tokenizer_info()

    def detokenize(self, token_ids: Sequence[int], special: bool = False) -> str:
        return self.runner.detokenize(token_ids, special)

    def token_bytes(self, token_id: int, special: bool = False) -> bytes:
        return self.runner.token_bytes(token_id, special)

    @property
    def supports_images(self) -> bool:
        return self.runner.media is not None

    def tokenize_media(
        self, text: str, images: Sequence[PromptImage]
    ) -> tuple[list[int], MediaPrompt]:
        media = self.runner.media
        if media is None:
            raise ValueError("this model does not accept images")
        prompt = media.tokenize(text, [i.rgb for i in images], [i.digest for i in images])
        return prompt.token_ids, prompt

    def compile_grammar(self, spec: GrammarSpec) -> str:
        return self.grammars.compile(spec)

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        sink = _Sink(asyncio.get_running_loop(), asyncio.Queue())
        self.core.submit(request, sink)
        finished = False
        try:
            while not finished:
                out = await sink.queue.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        self.core.abort(request_id)

    def stats(self) -> EngineStats:
        s = self.core.stats
        scheduler = self.scheduler
        s.num_running_seqs = len(scheduler.running)
        s.num_waiting_requests = len(scheduler.waiting) + self.core.num_inbox
        s.num_kv_cells_used = scheduler.kv_used()
        s.extra["num_preempted"] = scheduler.num_preempted
        s.prefix_cache_queries_total = scheduler.queried_tokens
        s.prefix_cache_hits_total = scheduler.hit_tokens
        s.grammar_masks_total = self.grammars.num_masks
        s.grammar_mask_seconds_total = self.grammars.mask_seconds
        return s
