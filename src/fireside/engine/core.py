"""The engine thread: it owns the model and runs the step loop.

Any thread hands it requests and aborts (`submit`, `abort`); the thread takes
them between steps, then runs a step while there is work. A step is
schedule -> run -> postprocess, as in nano-vllm:

    chunks = scheduler.schedule()                # what runs
    plan = executor.build_batch(chunks)          # one batch
    logits = executor.forward(plan)              # one llama_decode, then images
    result = executor.postprocess(plan, logits)  # scores, tokens, outputs
    scheduler.postprocess(result.update)         # cells, forks, freed slots

A request leaves by one path, `_retire`, whether it finished, was aborted or
failed; every output of a step goes to `publish` in one call.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from enum import Enum

from fireside.engine.grammar import Grammars
from fireside.engine.request import OutputSink, Request
from fireside.engine.scheduler import Chunk, Scheduler, SchedulerConfig
from fireside.engine.speculation import Drafter, SpeculationConfig
from fireside.engine.step import StepExecutor
from fireside.engine.types import EngineRequest, EngineStats, FinishReason, RequestOutput
from fireside.runner.base import Runner

# The engine's one logger (core.py and step.py), named as before they were split apart.
log = logging.getLogger("fireside.engine.engine")

# Consecutive failed steps after which the engine counts as broken and stops.
_MAX_FAILED_STEPS = 3

# Called on the engine thread with a step's outputs; must not block.
Publish = Callable[[list[tuple[OutputSink, RequestOutput]]], None]


class Outcome(Enum):
    FINISHED = "finished"  # every sample is done: its output said so
    ABORTED = "aborted"  # the client left; nothing more is sent
    FAILED = "failed"  # a step or its acceptance failed: an error output is sent


class EngineCore:
    def __init__(
        self,
        runner: Runner,
        scheduler_config: SchedulerConfig,
        grammars: Grammars,
        publish: Publish,
        speculation: SpeculationConfig,
    ) -> None:
        self.runner = runner
        self.grammars = grammars
        self.speculation = speculation
        self.publish = publish
        self.stats = EngineStats(num_kv_cells_total=runner.n_ctx)
        self.scheduler = Scheduler(
            scheduler_config,
            release=runner.seq_remove,
            copy=lambda src, dst, length: runner.seq_copy(src, dst, 0, length),
        )
        # --deterministic: each prompt chunk in a forward call of its own, no drafts.
        self.deterministic = scheduler_config.fixed_chunk > 0
        self.executor = StepExecutor(runner, grammars, self.stats, self.deterministic)
        self._cv = threading.Condition()  # guards the inbox, the aborts and the flags
        self._inbox: list[Request] = []
        self._aborts: set[str] = set()
        self._requests: dict[str, Request] = {}  # accepted and not yet retired
        self._arrivals = 0
        self._thread: threading.Thread | None = None
        self._running = False
        self._dead = False
        self._crash = False
        self._failed_steps = 0  # consecutive

    # -- any thread --------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._running

    @property
    def is_dead(self) -> bool:
        """The engine thread failed: nothing more will run."""
        return self._dead

    @property
    def num_inbox(self) -> int:
        """Requests submitted and not yet taken by the engine thread."""
        return len(self._inbox)

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

    def crash_for_test(self) -> None:
        """Make the engine thread fail at its next step (tests of failure handling)."""
        with self._cv:
            self._crash = True
            self._cv.notify()

    def submit(self, request: EngineRequest, sink: OutputSink) -> None:
        """Queue a request; its outputs go to `sink` through `publish`."""
        if self._dead or not self._running:
            raise RuntimeError("the engine is not running")
        with self._cv:
            self._arrivals += 1
            self._inbox.append(Request.create(request, sink, self._arrivals))
            self._cv.notify()

    def abort(self, request_id: str) -> None:
        """Stop a request at the next step; unknown or finished ids are ignored."""
        with self._cv:
            self._aborts.add(request_id)
            self._cv.notify()

    # -- the engine thread -------------------------------------------------

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
            self._fail_everything("the engine failed; the request could not be completed")

    def run_once(self) -> None:
        """Take new requests and aborts, then run one step if there is work."""
        with self._cv:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, set()
        for request in inbox:
            try:
                self._accept(request)
            except Exception:
                log.exception("request %s could not be accepted", request.request_id)
                self._fail([request], "engine step failed")
        for request_id in aborts:
            aborted = self._requests.get(request_id)
            if aborted is not None:
                self._retire(aborted, Outcome.ABORTED)
        if self.scheduler.has_work():
            self.step()

    def _accept(self, request: Request) -> None:
        params = request.params
        if params.max_tokens == 0 and params.prompt_logprobs is None:
            # Nothing to generate: answer at once without touching the model.
            for s in request.samples:
                s.finish_reason = FinishReason.LENGTH
            output = request.pop_output()
            self._retire(request, Outcome.FINISHED)
            self.publish([(request.sink, output)])
            return
        if params.grammar is not None:
            for s in request.samples:
                s.matcher = self.grammars.matcher(params.grammar)
        if (request.speculation or self.speculation.auto) and not self.deterministic:
            for s in request.samples:
                s.drafter = Drafter(
                    request.speculation,
                    request.num_prompt,
                    params.max_tokens,
                    self.executor.context_length,
                    self.speculation,
                )
        self._requests[request.request_id] = request
        self.scheduler.add(request)

    def step(self) -> None:
        """One step: schedule, then build the batch, forward and postprocess it."""
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
            requests = {id(c.sample.request): c.sample.request for c in chunks}
            self._fail(requests.values(), "engine step failed")
        else:
            self._failed_steps = 0

    def _run(self, chunks: list[Chunk]) -> None:
        plan = self.executor.build_batch(chunks)
        logits = self.executor.forward(plan)
        if logits is None:  # llama.cpp found no KV room: nothing ran
            self.scheduler.evict_or_preempt()
            return
        result = self.executor.postprocess(plan, logits)
        self.scheduler.postprocess(result.update)
        for request in result.finished:
            self._retire(request, Outcome.FINISHED)
        self.publish([(r.sink, output) for r, output in result.outputs])

    def _retire(self, request: Request, outcome: Outcome) -> None:
        """The one way a request leaves the engine: its slots and queue places go,
        its KV stays cached unless it failed (a failed step may have half-written
        it), its images are freed, and it is counted."""
        self._requests.pop(request.request_id, None)
        self.scheduler.remove(request, keep_kv=outcome is not Outcome.FAILED)
        request.close_media()
        if outcome is Outcome.FINISHED:
            self.stats.requests_finished_total += 1
        elif outcome is Outcome.ABORTED:
            self.stats.requests_aborted_total += 1

    def _fail(self, requests: Iterable[Request], message: str) -> None:
        outputs: list[tuple[OutputSink, RequestOutput]] = []
        for request in requests:
            self._retire(request, Outcome.FAILED)
            outputs.append(
                (request.sink, RequestOutput(request.request_id, finished=True, error=message))
            )
        self.publish(outputs)

    def _fail_everything(self, message: str) -> None:
        """The thread is going away: answer every request with an error. Nothing is
        retired (the runner may be what broke); the process is about to stop."""
        with self._cv:
            pending = list(self._requests.values()) + self._inbox
            self._inbox = []
            self._requests.clear()
        self.publish(
            [(r.sink, RequestOutput(r.request_id, finished=True, error=message)) for r in pending]
        )
