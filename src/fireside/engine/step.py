"""The model's part of one engine step: chunks to a batch, the batch to logits,
logits to tokens and outputs.

`StepExecutor` does it in three calls, each on the engine thread:

- `build_batch`: the scheduled chunks as one `runner.Batch`, asking for logits
  only where they are needed (the last prompt position, every decode token,
  every scored prompt position), with the row each of them will get;
- `forward`: one `Runner.forward` over the batch, then each image encoded and
  decoded into its sample, as one logits array;
- `postprocess`: prompt scores, the fork of finished prompts to all samples,
  sampling (grammar masks, penalties, logprobs), stop checks, drafts checked
  position by position (`_verify`), and each request's output. It changes no
  scheduler state: it returns the `StepUpdate` that the engine hands to
  `Scheduler.postprocess`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from fireside.engine import grammar
from fireside.engine.grammar import Grammars
from fireside.engine.request import Request, Sample
from fireside.engine.sampler import History, logprobs_of, sample_rows
from fireside.engine.scheduler import Chunk, StepUpdate
from fireside.engine.types import EngineStats, FinishReason, RequestOutput, TokenLogprob
from fireside.runner.base import Batch, KVCacheFull, Runner

log = logging.getLogger("fireside.engine.engine")  # as in core.py

Logits = npt.NDArray[np.float32]
# --deterministic: decode rows per forward call. Measured bitwise independent of
# their neighbours up to 64 rows without a unified KV cache (docs/batch_invariance.md).
MAX_DECODE_ROWS = 64


@dataclass
class _ScoredRows:
    chunk: Chunk
    first_pos: int  # the position whose logits are the first row
    count: int
    first_row: int


@dataclass
class StepPlan:
    """One step's batch, and which logits row serves what."""

    chunks: list[Chunk]
    batch: Batch = field(default_factory=Batch)
    images: list[Chunk] = field(default_factory=list)  # computed after the batch, in order
    to_sample: list[tuple[Chunk, int]] = field(default_factory=list)  # chunk, its logits row
    scored: list[_ScoredRows] = field(default_factory=list)  # prompt positions scored
    num_rows: int = 0  # logits rows the batch gives (the images' rows come after)


@dataclass
class StepResult:
    update: StepUpdate  # for Scheduler.postprocess
    outputs: list[tuple[Request, RequestOutput]]  # one per request with something new
    finished: list[Request]  # requests whose every sample is done


class StepExecutor:
    def __init__(
        self, runner: Runner, grammars: Grammars, stats: EngineStats, split_calls: bool = False
    ) -> None:
        self.runner = runner
        self.grammars = grammars
        self.stats = stats  # counters this module adds to
        # Without a unified KV cache a sequence holds at most its stream's cells.
        self.context_length = min(runner.n_ctx_train, runner.n_ctx, runner.n_ctx_seq)
        # --deterministic: each prompt chunk alone in its forward call, decode rows
        # together (docs/batch_invariance.md: what a row's logits then depend on).
        self.split_calls = split_calls

    # -- build the batch ---------------------------------------------------

    def build_batch(self, chunks: list[Chunk]) -> StepPlan:
        if not self.split_calls:
            # In sequence id order: without a unified cache llama.cpp computes a batch
            # in one pass per run of consecutive ids it meets in the batch's order.
            chunks = sorted(chunks, key=lambda c: c.sample.seq_id)
        plan = StepPlan(chunks)
        batch = plan.batch
        for c in chunks:
            if c.image is not None:
                plan.images.append(c)
                continue
            sample, end = c.sample, c.start + c.count
            lo, hi = _scored_positions(c)
            for pos in range(c.start, end):
                batch.add(sample.tokens[pos], pos, sample.seq_id, lo <= pos < hi)
            if hi > lo:
                plan.scored.append(_ScoredRows(c, lo, hi - lo, plan.num_rows))
                plan.num_rows += hi - lo
            if c.reaches_end and sample.request.params.max_tokens > 0:
                batch.want_logits[-1] = True
                plan.to_sample.append((c, plan.num_rows))
                plan.num_rows += 1
                # A draft follows its sample's last token, with logits at every position:
                # row i picks the token after the draft's first i tokens.
                for i, token in enumerate(c.draft):
                    batch.add(token, end + i, sample.seq_id, True)
                plan.num_rows += len(c.draft)
        return plan

    # -- forward -----------------------------------------------------------

    def forward(self, plan: StepPlan) -> Logits | None:
        """Run the batch, then the images; None (nothing computed) if llama.cpp found
        no KV room. Rows for images that pick a token join `plan.to_sample`."""
        batch = plan.batch
        logits: Logits | None = None
        try:
            if self.split_calls and len(batch):
                logits = self._forward_split(plan)
            elif len(batch):
                logits = self.runner.forward(batch)
        except KVCacheFull:
            # Our count said it fits; llama.cpp's placement disagreed. Nothing was
            # computed: the scheduler makes room and the step runs again.
            log.warning("llama.cpp found no KV room for a %d-token batch", len(batch))
            return None
        # Then images: each is encoded and its embeddings decoded into its sample.
        image_rows: list[Logits] = []
        if plan.images and logits is not None:
            logits = logits.copy()  # a view of llama.cpp's buffer, which the images overwrite
        media = self.runner.media
        for c in plan.images:
            if media is None or c.image is None:
                raise RuntimeError("an image chunk for a model without a vision projector")
            want = c.reaches_end and c.sample.request.params.max_tokens > 0
            row = media.evaluate(c.image, c.sample.seq_id, want)
            if row is not None:
                plan.to_sample.append((c, plan.num_rows + len(image_rows)))
                image_rows.append(row)
        if logits is None:
            logits = np.empty((0, self.runner.vocab_size), dtype=np.float32)
        if image_rows:
            logits = np.vstack([logits, *image_rows])
        return logits

    def _forward_split(self, plan: StepPlan) -> Logits:
        """The batch as several forward calls: every prompt chunk alone (its rows first
        in the micro-batch, nothing after them), then the decode rows together, at most
        MAX_DECODE_ROWS a call. Logits rows come back in the batch's order."""
        batch = plan.batch
        groups: list[tuple[int, int]] = []  # [start, end) token ranges of the batch
        start = 0
        decode_start: int | None = None
        for c in plan.chunks:
            if c.image is not None:
                continue
            n = c.count + len(c.draft)
            is_decode = c.count == 1 and c.start >= c.sample.num_prompt and not c.draft
            if is_decode:
                if decode_start is None:
                    decode_start = start
                elif start - decode_start >= MAX_DECODE_ROWS:
                    groups.append((decode_start, start))
                    decode_start = start
            else:
                if decode_start is not None:
                    groups.append((decode_start, start))
                    decode_start = None
                groups.append((start, start + n))
            start += n
        if decode_start is not None:
            groups.append((decode_start, start))
        parts = []
        for lo, hi in groups:
            part = Batch(
                batch.tokens[lo:hi],
                batch.positions[lo:hi],
                batch.seq_ids[lo:hi],
                batch.want_logits[lo:hi],
            )
            rows = self.runner.forward(part)
            if rows.shape[0]:
                parts.append(rows.copy())  # the next call overwrites llama.cpp's buffer
        if not parts:
            return np.empty((0, self.runner.vocab_size), dtype=np.float32)
        return np.concatenate(parts)

    # -- postprocess -------------------------------------------------------

    def postprocess(self, plan: StepPlan, logits: Logits) -> StepResult:
        """Scores, tokens and outputs from the step's logits. Scheduler state is left
        alone: what changes there comes back as `StepResult.update`."""
        update = StepUpdate(plan.chunks)
        self.stats.steps_total += 1
        for c in plan.chunks:
            self.stats.prefill_tokens_total += max(
                0, min(c.start + c.count, c.sample.num_prompt) - c.start
            )
        for scored in plan.scored:
            scored_logits = logits[scored.first_row : scored.first_row + scored.count]
            _score_prompt(scored.chunk.sample.request, scored_logits, scored.first_pos)

        with_output: dict[int, Request] = {}  # by id(), in the order they came
        for c in plan.chunks:
            request = c.sample.request
            if c.reaches_end and request.params.max_tokens == 0:
                # Scoring only (echo with logprobs): the prompt is done, nothing to generate.
                for s in request.samples:
                    s.finish_reason = FinishReason.LENGTH
                    update.finished.append(s)
                with_output[id(request)] = request

        rows: list[int] = []  # each sample's logits row
        samples: list[Sample] = []
        for c, row in plan.to_sample:
            request = c.sample.request
            if not request.forked and request not in update.shared:
                # Prefill once, decode n ways: the other samples share the prompt's cells.
                update.shared.append(request)
                for s in request.samples:
                    if not s.is_finished:
                        samples.append(s)
                        rows.append(row)
            else:
                samples.append(c.sample)
                rows.append(row)
        if samples:
            self._sample(logits[rows], samples)
            drafts = [(c.sample, c.draft, row) for c, row in plan.to_sample if c.draft]
            num_sampled = len(samples) + self._verify(logits, drafts)
            for s in samples:
                with_output[id(s.request)] = s.request
                if s.is_finished:
                    update.finished.append(s)
            self.stats.generated_tokens_total += num_sampled

        outputs = [(r, r.pop_output()) for r in with_output.values()]
        finished = [r for r in with_output.values() if r.is_finished]
        return StepResult(update, outputs, finished)

    def _verify(self, logits: Logits, drafts: list[tuple[Sample, tuple[int, ...], int]]) -> int:
        """Accept each draft as far as sampling agrees with it; returns the tokens sampled.

        Each (sample, draft, row) has sampled its first token from `row` already. While
        the token just sampled equals the draft's token at that place (and the sample
        goes on), the next one is sampled from the next row: the logits after that
        draft token. Position by position, exactly as without a draft: one draw of the
        sample's generator each, penalties over the tokens accepted so far, the grammar
        matcher fed only accepted tokens, stop strings, EOS and max_tokens checked in
        order (nothing after a stop is kept). What is rejected is never appended, so
        there is nothing to roll back but its cells (`Scheduler.postprocess`).
        """
        accepted = [0] * len(drafts)
        live = list(range(len(drafts)))
        num_sampled = 0
        while live:
            matched = []
            for i in live:
                sample, draft, _ = drafts[i]
                at = accepted[i]
                if at < len(draft) and sample.tokens[-1] == draft[at]:
                    accepted[i] = at + 1
                    if not sample.is_finished:
                        matched.append(i)
            live = matched
            if live:
                rows = [drafts[i][2] + accepted[i] for i in live]
                self._sample(logits[rows], [drafts[i][0] for i in live])
                num_sampled += len(live)
        for (sample, draft, _), num in zip(drafts, accepted, strict=True):
            if sample.drafter is not None:
                sample.drafter.verified(len(draft), num)
            self.stats.spec_draft_tokens_total += len(draft)
            self.stats.spec_accepted_tokens_total += num
        return num_sampled

    def _sample(self, rows: Logits, samples: list[Sample]) -> None:
        """Choose each sample's next token from its logits row (a copy we may change)."""
        params = [s.request.params for s in samples]
        want_lp = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw = rows[want_lp] if want_lp else None  # scores come from the untouched logits
        histories = [
            History(s.request.prompt_unique, s.tokens[s.num_prompt :])
            if s.request.params.has_penalties
            else None
            for s in samples
        ]
        constrained = [(i, s.matcher) for i, s in enumerate(samples) if s.matcher is not None]
        if constrained:
            indices = [i for i, _ in constrained]
            masked = rows[indices]
            self.grammars.mask(masked, [m for _, m in constrained])
            rows[indices] = masked
        sampled = sample_rows(
            rows, params, [s.rng for s in samples], histories, [s.mirostat for s in samples]
        )
        if raw is not None:
            num_top = max(params[i].logprobs or 0 for i in want_lp)
            targets = [sampled.tokens[i] for i in want_lp]
            target_lp, top, top_lp = logprobs_of(raw, targets, num_top)
            for r, i in enumerate(want_lp):
                n = params[i].logprobs or 0
                samples[i].new_logprobs.append(
                    TokenLogprob(
                        targets[r],
                        float(target_lp[r]),
                        _pairs(top[r, :n], top_lp[r, :n]),
                        sampled.sampling_logprobs[i],
                    )
                )
        for sample, token in zip(samples, sampled.tokens, strict=True):
            self._append(sample, token)

    def _append(self, sample: Sample, token: int) -> None:
        """Add the sampled token; decide whether the sample is done."""
        sample.tokens.append(token)
        sample.new_token_ids.append(token)
        params = sample.request.params
        if self.runner.is_eog(token) and not params.ignore_eos:
            sample.finish_reason = FinishReason.STOP
        elif sample.detok.add(self.runner.token_bytes(token)):
            sample.finish_reason = FinishReason.STOP
        elif sample.matcher is not None and not grammar.consume(sample.matcher, token):
            sample.finish_reason = FinishReason.STOP
        elif sample.num_output >= params.max_tokens or len(sample.tokens) >= self.context_length:
            sample.finish_reason = FinishReason.LENGTH
        if sample.is_finished:
            sample.detok.finish()


def _scored_positions(c: Chunk) -> tuple[int, int]:
    """Positions [lo, hi) of the chunk whose logits score the next prompt token."""
    request = c.sample.request
    if not request.scores_prompt:
        return 0, 0
    # The logits at position p score prompt token p + 1.
    first = max(request.params.prompt_logprobs_start, 1) - 1
    lo = max(c.start, first)
    hi = min(c.start + c.count, request.num_prompt - 1)
    return lo, max(lo, hi)


def _score_prompt(request: Request, rows: Logits, first_pos: int) -> None:
    prompt = request.prompt_token_ids
    if request.prompt_scores is None:
        request.prompt_scores = [None] * request.num_prompt
    num_top = request.params.prompt_logprobs or 0
    targets = prompt[first_pos + 1 : first_pos + 1 + rows.shape[0]]
    # Image positions (negative placeholders) are not scored; score them as 0
    # and drop the result, so the rows stay aligned.
    target_lp, top, top_lp = logprobs_of(rows, [max(t, 0) for t in targets], num_top)
    for r, token in enumerate(targets):
        if token < 0:
            continue
        request.prompt_scores[first_pos + 1 + r] = TokenLogprob(
            token, float(target_lp[r]), _pairs(top[r], top_lp[r])
        )


def _pairs(
    ids: npt.NDArray[np.int64], logprobs: npt.NDArray[np.float64]
) -> tuple[tuple[int, float], ...]:
    return tuple((int(t), float(lp)) for t, lp in zip(ids, logprobs, strict=True))
