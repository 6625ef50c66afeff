"""The engine: one thread that owns the model and runs the step loop.

asyncio handlers call `generate()`, which hands the request to the engine
thread and yields what it produces through a per-request asyncio queue. Each
engine step is schedule -> forward -> sample -> update (DESIGN.md); all the
outputs of one step reach the event loop in a single thread-safe callback.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fireside.engine.grammar import Grammars
from fireside.engine.sampler import History, logprobs_of, sample_rows
from fireside.engine.scheduler import Chunk, Scheduler, SchedulerConfig
from fireside.engine.sequence import RequestState
from fireside.engine.sequence import Sequence as Seq
from fireside.engine.types import (
    EngineRequest,
    EngineStats,
    FinishReason,
    GrammarError,
    GrammarSpec,
    PromptImage,
    RequestOutput,
    SampleDelta,
    TokenLogprob,
)
from fireside.runner.base import Batch, KVCacheFull, Runner, TokenizerInfo

log = logging.getLogger(__name__)

# Consecutive failed steps after which the engine counts as broken and stops.
_MAX_FAILED_STEPS = 3


@dataclass(frozen=True)
class EngineConfig:
    max_running: int = 16  # sequences decoding at once; `--parallel`
    token_budget: int = 512  # tokens per step, at most the runner's n_batch
    cache_entries: int = 32  # finished sequences kept in the prefix cache; 0 turns it off
    prefill_chunk: int = 512  # prompt tokens per step while streams are decoding


@dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput]


class Engine:
    def __init__(self, runner: Runner, config: EngineConfig | None = None) -> None:
        self.runner = runner
        self.config = config or EngineConfig()
        self._context_length = min(runner.n_ctx_train, runner.n_ctx)
        self.scheduler = Scheduler(
            SchedulerConfig(
                num_slots=runner.n_seq_max,
                max_running=min(self.config.max_running, runner.n_seq_max),
                kv_capacity=runner.n_ctx,
                token_budget=min(self.config.token_budget, runner.n_batch),
                cache_entries=self.config.cache_entries,
                cache_cells=runner.n_ctx // 4,
                prefill_chunk=self.config.prefill_chunk,
            ),
            release=runner.seq_remove,
            copy=lambda src, dst, length: runner.seq_copy(src, dst, 0, length),
        )
        self._cv = threading.Condition()
        self._inbox: list[RequestState] = []
        self._aborts: set[str] = set()
        self._states: dict[str, RequestState] = {}
        self._arrivals = 0
        self._stats = EngineStats(num_kv_cells_total=runner.n_ctx)
        self._thread: threading.Thread | None = None
        self._running = False
        self._dead = False
        self._crash = False
        self._failed_steps = 0  # consecutive
        self._media = getattr(runner, "media", None)  # a vision projector, if any
        make_tokenizer = getattr(runner, "grammar_tokenizer", None)
        self.grammars = (
            Grammars(make_tokenizer, num_threads=getattr(runner, "n_threads", 1))
            if make_tokenizer is not None
            else None
        )

    # -- lifecycle ---------------------------------------------------------

    def start(self, background: bool = True) -> None:
        """Start taking requests; without `background`, the caller steps with `run_once`."""
        self._running = True
        if background:
            self._thread = threading.Thread(target=self._loop, name="fireside-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        with self._cv:
            self._running = False
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()

    # -- the EngineClient interface -----------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def is_healthy(self) -> bool:
        return self._running and not self._dead

    @property
    def is_dead(self) -> bool:
        """The engine thread failed: nothing more will run; the process should restart."""
        return self._dead

    def crash_for_test(self) -> None:
        """Make the engine thread fail at its next step (tests of failure handling)."""
        with self._cv:
            self._crash = True
            self._cv.notify()

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return self.runner.tokenize(text, add_special)

    def tokenizer_info(self) -> TokenizerInfo:
        return self.runner.tokenizer_info()

    def detokenize(self, token_ids: Sequence[int], special: bool = False) -> str:
        return self.runner.detokenize(token_ids, special)

    def token_bytes(self, token_id: int, special: bool = False) -> bytes:
        return self.runner.token_bytes(token_id, special)

    @property
    def supports_images(self) -> bool:
        return self._media is not None

    def tokenize_media(self, text: str, images: Sequence[PromptImage]) -> tuple[list[int], Any]:
        if self._media is None:
            raise ValueError("this model does not accept images")
        prompt = self._media.tokenize(text, [i.rgb for i in images], [i.digest for i in images])
        return prompt.token_ids, prompt

    def compile_grammar(self, spec: GrammarSpec) -> str:
        if self.grammars is None:
            raise GrammarError("this model does not support constrained output")
        return self.grammars.compile(spec)

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        sink = _Sink(asyncio.get_running_loop(), asyncio.Queue())
        self._submit(request, sink)
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
        with self._cv:
            self._aborts.add(request_id)
            self._cv.notify()

    def stats(self) -> EngineStats:
        s = self._stats
        s.num_running_seqs = len(self.scheduler.running)
        s.num_waiting_requests = len(self.scheduler.waiting) + len(self._inbox)
        s.num_kv_cells_used = self.scheduler.kv_used()
        s.extra["num_preempted"] = self.scheduler.num_preempted
        s.prefix_cache_queries_total = self.scheduler.queried_tokens
        s.prefix_cache_hits_total = self.scheduler.hit_tokens
        if self.grammars is not None:
            s.grammar_masks_total = self.grammars.num_masks
            s.grammar_mask_seconds_total = self.grammars.mask_seconds
        return s

    def _submit(self, request: EngineRequest, sink: _Sink) -> None:
        if self._dead or not self._running:
            raise RuntimeError("the engine is not running")
        with self._cv:
            self._arrivals += 1
            self._inbox.append(RequestState.create(request, sink, self._arrivals))
            self._cv.notify()

    # -- the engine thread --------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while self._running and not (
                        self._inbox or self._aborts or self.scheduler.has_work() or self._crash
                    ):
                        self._cv.wait()
                    if not self._running:
                        break
                    if self._crash:
                        raise RuntimeError("engine crash requested by a test hook")
                self.run_once()
        except Exception:
            log.exception("engine thread failed")
            self._dead = True
            self._fail_all("the engine failed; the request could not be completed")

    def run_once(self) -> None:
        """Take new requests and aborts, then run one step if there is work."""
        with self._cv:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, set()
        self._accept(inbox)
        self._abort(aborts)
        if self.scheduler.has_work():
            self.step()

    def _accept(self, inbox: list[RequestState]) -> None:
        for state in inbox:
            try:
                self._accept_one(state)
            except Exception:
                log.exception("request %s could not be accepted", state.request_id)
                self._fail_groups([state])

    def _accept_one(self, state: RequestState) -> None:
        if state.params.max_tokens == 0 and state.params.prompt_logprobs is None:
            # Nothing to generate: answer at once without touching the model.
            for s in state.seqs:
                s.finish_reason = FinishReason.LENGTH
            self._emit([(state, self._output(state))])
            _close_media(state)
            return
        if state.params.grammar is not None:
            assert self.grammars is not None  # compile_grammar said so
            for s in state.seqs:
                s.matcher = self.grammars.matcher(state.params.grammar)
        self._states[state.request_id] = state
        self.scheduler.add(state)

    def _abort(self, request_ids: set[str]) -> None:
        for rid in request_ids:
            state = self._states.pop(rid, None)
            if state is not None:
                self.scheduler.remove_request(state)
                _close_media(state)
                self._stats.requests_aborted_total += 1

    def _fail_all(self, message: str) -> None:
        with self._cv:
            pending = list(self._states.values()) + self._inbox
            self._inbox = []
            self._states.clear()
        self._emit(
            [(s, RequestOutput(s.request_id, finished=True, error=message)) for s in pending]
        )

    def step(self) -> None:
        chunks = self.scheduler.schedule()
        if not chunks:
            # Only a waiting request that needs more sequence slots than exist gets here.
            with self._cv:
                self._cv.wait(0.005)
            return
        try:
            self._run(chunks)
        except Exception:
            # Fail the requests of this step, not the server: the next steps run
            # without them. Failing again and again means the engine itself is broken.
            self._failed_steps += 1
            if self._failed_steps >= _MAX_FAILED_STEPS:
                raise
            log.exception("an engine step failed; failing its requests")
            self._fail_groups({id(c.seq.group): c.seq.group for c in chunks}.values())
        else:
            self._failed_steps = 0

    def _fail_groups(self, groups: Iterable[RequestState]) -> None:
        outputs = []
        for group in groups:
            self._states.pop(group.request_id, None)
            self.scheduler.remove_request(group, keep=False)  # its KV may be half-written
            _close_media(group)
            outputs.append(
                (group, RequestOutput(group.request_id, finished=True, error="engine step failed"))
            )
        self._emit(outputs)

    def _run(self, chunks: list[Chunk]) -> None:
        batch = Batch()
        to_sample: list[tuple[Chunk, int]] = []  # chunk, its logits row
        scored: list[tuple[Chunk, int, int, int]] = []  # chunk, first position, count, first row
        images: list[Chunk] = []
        num_rows = 0
        for c in chunks:
            if c.image is not None:
                images.append(c)
                continue
            seq, end = c.seq, c.start + c.count
            lo, hi = self._scored_positions(c)
            for pos in range(c.start, end):
                batch.add(seq.tokens[pos], pos, seq.seq_id, lo <= pos < hi)
            if hi > lo:
                scored.append((c, lo, hi - lo, num_rows))
                num_rows += hi - lo
            if c.reaches_end and c.seq.group.params.max_tokens > 0:
                batch.want_logits[-1] = True
                to_sample.append((c, num_rows))
                num_rows += 1
        try:
            logits = self.runner.forward(batch) if len(batch) else None
        except KVCacheFull:
            # Our count said it fits; llama.cpp's placement disagreed. Nothing was
            # computed: make room and run the step again.
            log.warning("llama.cpp found no KV room for a %d-token batch", len(batch))
            self.scheduler.relieve()
            return
        # Then images: each is encoded and its embeddings decoded into its sequence.
        image_rows: list[np.ndarray] = []
        if images and logits is not None:
            logits = logits.copy()  # a view of llama.cpp's buffer, which the images overwrite
        for c in images:
            assert self._media is not None and c.image is not None
            want = c.reaches_end and c.seq.group.params.max_tokens > 0
            row = self._media.evaluate(c.image, c.seq.seq_id, want)
            if row is not None:
                to_sample.append((c, num_rows + len(image_rows)))
                image_rows.append(row)
        if logits is None:
            logits = np.empty((0, self.runner.vocab_size), dtype=np.float32)
        if image_rows:
            logits = np.vstack([logits, *image_rows])
        self._stats.steps_total += 1

        for c in chunks:
            self.scheduler.computed(c)
            self._stats.prefill_tokens_total += max(
                0, min(c.start + c.count, c.seq.num_prompt) - c.start
            )
        for c, first_pos, count, first_row in scored:
            self._score_prompt(c.seq.group, logits[first_row : first_row + count], first_pos)

        touched: dict[int, RequestState] = {}
        for c in chunks:
            group = c.seq.group
            if c.reaches_end and group.params.max_tokens == 0:
                # Scoring only (echo with logprobs): the prompt is done, nothing to generate.
                for s in group.seqs:
                    s.finish_reason = FinishReason.LENGTH
                    self.scheduler.free(s)
                touched[id(group)] = group

        rows: list[int] = []
        seqs: list[Seq] = []
        for c, row in to_sample:
            group = c.seq.group
            if not group.forked:
                # Prefill once, decode n ways: the other samples share the prompt's cells.
                self.scheduler.share_prompt(group)
                for s in group.seqs:
                    if not s.is_finished:
                        seqs.append(s)
                        rows.append(row)
            else:
                seqs.append(c.seq)
                rows.append(row)
        if seqs:
            self._sample(logits[rows], seqs)
            for seq in seqs:
                touched[id(seq.group)] = seq.group
            self._stats.generated_tokens_total += len(seqs)

        outputs: list[tuple[RequestState, RequestOutput]] = []
        for group in touched.values():
            outputs.append((group, self._output(group)))
            if group.is_finished:
                self._states.pop(group.request_id, None)
                self.scheduler.remove_request(group)
                _close_media(group)
                self._stats.requests_finished_total += 1
        self._emit(outputs)

    def _scored_positions(self, c: Chunk) -> tuple[int, int]:
        """Positions [lo, hi) of the chunk whose logits score the next prompt token."""
        group = c.seq.group
        if not group.scores_prompt:
            return 0, 0
        # The logits at position p score prompt token p + 1.
        first = max(group.params.prompt_logprobs_start, 1) - 1
        lo = max(c.start, first)
        hi = min(c.start + c.count, group.num_prompt - 1)
        return lo, max(lo, hi)

    def _score_prompt(self, group: RequestState, rows: np.ndarray, first_pos: int) -> None:
        prompt = group.request.prompt_token_ids
        if group.prompt_scores is None:
            group.prompt_scores = [None] * group.num_prompt
        num_top = group.params.prompt_logprobs or 0
        targets = prompt[first_pos + 1 : first_pos + 1 + rows.shape[0]]
        # Image positions (negative placeholders) are not scored; score them as 0
        # and drop the result, so the rows stay aligned.
        target_lp, top, top_lp = logprobs_of(rows, [max(t, 0) for t in targets], num_top)
        for r, token in enumerate(targets):
            if token < 0:
                continue
            group.prompt_scores[first_pos + 1 + r] = TokenLogprob(
                token, float(target_lp[r]), _pairs(top[r], top_lp[r])
            )

    def _sample(self, rows: np.ndarray, seqs: list[Seq]) -> None:
        """Choose each sequence's next token from its logits row (a copy we may change)."""
        params = [s.group.params for s in seqs]
        want_lp = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw = rows[want_lp] if want_lp else None  # scores come from the untouched logits
        histories = [
            History(s.group.prompt_unique, s.tokens[s.num_prompt :])
            if s.group.params.has_penalties
            else None
            for s in seqs
        ]
        constrained = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if constrained:
            assert self.grammars is not None
            masked = rows[constrained]
            self.grammars.mask(masked, [seqs[i].matcher for i in constrained])
            rows[constrained] = masked
        sampled = sample_rows(rows, params, [s.rng for s in seqs], histories)
        if raw is not None:
            num_top = max(params[i].logprobs or 0 for i in want_lp)
            targets = [sampled.tokens[i] for i in want_lp]
            target_lp, top, top_lp = logprobs_of(raw, targets, num_top)
            for r, i in enumerate(want_lp):
                n = params[i].logprobs or 0
                seqs[i].new_logprobs.append(
                    TokenLogprob(
                        targets[r],
                        float(target_lp[r]),
                        _pairs(top[r, :n], top_lp[r, :n]),
                        sampled.sampling_logprobs[i],
                    )
                )
        for seq, token in zip(seqs, sampled.tokens, strict=True):
            self._append(seq, token)

    def _append(self, seq: Seq, token: int) -> None:
        seq.tokens.append(token)
        seq.new_token_ids.append(token)
        params = seq.group.params
        if self.runner.is_eog(token) and not params.ignore_eos:
            seq.finish_reason = FinishReason.STOP
        elif seq.detok.add(self.runner.token_bytes(token)):
            seq.finish_reason = FinishReason.STOP
        elif seq.matcher is not None and not _grammar_continues(seq.matcher, token):
            seq.finish_reason = FinishReason.STOP
        elif seq.num_output >= params.max_tokens or len(seq.tokens) >= self._context_length:
            seq.finish_reason = FinishReason.LENGTH
        if seq.is_finished:
            seq.detok.finish()
            self.scheduler.free(seq)

    def _output(self, group: RequestState) -> RequestOutput:
        params = group.params
        deltas = []
        for s in group.seqs:
            text = s.detok.take(final=s.is_finished)
            if text or s.new_token_ids or s.is_finished:
                deltas.append(
                    SampleDelta(
                        index=s.index,
                        text=text,
                        token_ids=tuple(s.new_token_ids),
                        finish_reason=s.finish_reason,
                        logprobs=tuple(s.new_logprobs) if params.logprobs is not None else None,
                    )
                )
                s.new_token_ids.clear()
                s.new_logprobs.clear()
        prompt_logprobs = None
        if params.prompt_logprobs is not None and not group.prompt_scores_sent:
            scores = group.prompt_scores or [None] * group.num_prompt
            prompt_logprobs = tuple(scores[params.prompt_logprobs_start :])
            group.prompt_scores_sent = True
            group.prompt_scores = None  # sent once; no need to keep them
        return RequestOutput(
            request_id=group.request_id,
            deltas=tuple(deltas),
            num_prompt_tokens=group.num_prompt,
            num_cached_tokens=group.num_cached,
            prompt_logprobs=prompt_logprobs,
            finished=group.is_finished,
        )

    def _emit(self, outputs: list[tuple[RequestState, RequestOutput]]) -> None:
        """Hand a step's outputs to their event loops, one callback per loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for state, out in outputs:
            sink = state.sink
            assert isinstance(sink, _Sink)
            by_loop.setdefault(sink.loop, []).append((sink.queue, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop has closed; nobody is listening
                pass


def _deliver(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)


def _pairs(ids: np.ndarray, logprobs: np.ndarray) -> tuple[tuple[int, float], ...]:
    return tuple((int(t), float(lp)) for t, lp in zip(ids, logprobs, strict=True))


def _grammar_continues(matcher: object, token: int) -> bool:
    """Feed the sampled token to the sequence's matcher; False once the grammar is done.

    A matcher in error (it cannot happen with the mask applied, but a grammar bug
    must not loop forever) ends the sequence too.
    """
    matcher.consume_token(token)  # type: ignore[attr-defined]
    return not (matcher.is_stopped() or matcher.is_error())  # type: ignore[attr-defined]


def _close_media(state: RequestState) -> None:
    """Free a finished request's image chunks (their KV, if cached, stays)."""
    media = state.request.media
    if media is not None:
        media.close()
