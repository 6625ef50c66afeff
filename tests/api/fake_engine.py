"""A fake `EngineClient`: tokens are words, and samples say which step made them.

A token is a word with the whitespace before it ("hello world" is "hello",
" world"), so a text is exactly the concatenation of its tokens' bytes. Sample
j's k-th token is " s{j}t{k}" unless `script` gives every sample the same
token bytes, so a test can tell every choice and every delta apart without a
model. Logprobs are made-up but deterministic (see `sampled_score`,
`prompt_score`).
"""

from __future__ import annotations

import asyncio
import codecs
import re
from collections.abc import AsyncIterator, Sequence

from fireside.engine.types import (
    EngineRequest,
    EngineStats,
    FinishReason,
    GrammarError,
    GrammarSpec,
    RequestOutput,
    SampleDelta,
    SpeculationCounts,
    TokenLogprob,
)
from fireside.runner.base import TokenizerInfo

_TOKEN = re.compile(r"\s*\S+")


class FakeEngine:
    def __init__(
        self,
        *,
        vocab_size: int = 1000,
        context_length: int = 64,
        num_words: int = 3,  # tokens a sample makes before "end of sequence"
        script: Sequence[bytes] | None = None,  # the tokens every sample makes, in order
        error_at_step: int | None = None,
        hang: bool = False,
        cached_tokens: int = 0,
        omit_prompt_logprobs: bool = False,  # a broken engine, for the failure path
    ) -> None:
        self._vocab_size = vocab_size
        self._context_length = context_length
        self.script = list(script) if script is not None else None
        self.num_words = len(self.script) if self.script is not None else num_words
        self.error_at_step = error_at_step
        self.hang = hang  # never produce anything: for disconnect tests
        self.cached_tokens = cached_tokens
        self.omit_prompt_logprobs = omit_prompt_logprobs
        self.healthy = True
        self.fail_tokenize = False
        self.requests: list[EngineRequest] = []
        self.grammar_specs: list[GrammarSpec] = []
        self.vision = False
        self.closed_early: list[str] = []  # request ids whose iteration was left early
        self.num_tokenize_calls = 0
        self.add_bos = False  # tokenizing with special tokens starts with BOS, id 1
        self.tokenizer = TokenizerInfo(
            bos_token="<|c1|>",
            eos_token="<|c2|>",
            pad_token=None,
            add_bos_token=False,
            add_eos_token=False,
            chat_template="{% for m in messages %}{{ m.content }}{% endfor %}",
        )
        self._ids: dict[bytes, int] = {}
        self._bytes: dict[int, bytes] = {}

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def is_healthy(self) -> bool:
        return self.healthy

    def token_id(self, data: bytes) -> int:
        """The id of a token with these bytes (made up on first sight)."""
        if data not in self._ids:
            self._ids[data] = 10 + len(self._ids)
            self._bytes[self._ids[data]] = data
        return self._ids[data]

    def tokenize(
        self, text: str, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        self.num_tokenize_calls += 1
        if self.fail_tokenize:
            raise RuntimeError("secret internal detail")
        ids = [self.token_id(word.encode()) for word in _TOKEN.findall(text)]
        return [1, *ids] if add_special and self.add_bos else ids

    def tokenizer_info(self) -> TokenizerInfo:
        return self.tokenizer

    def token_bytes(self, token_id: int, special: bool = False) -> bytes:
        if special and token_id < 10:  # ids below 10 play control tokens
            return f"<|c{token_id}|>".encode()
        return self._bytes.get(token_id, f"<{token_id}>".encode())

    @property
    def supports_images(self) -> bool:
        return self.vision

    def tokenize_media(self, text: str, images) -> tuple[list[int], object]:
        """Each image is 4 positions of placeholder -1; the handle records what it got."""
        ids: list[int] = []
        parts = text.split("<image>")
        for i, part in enumerate(parts):
            ids += self.tokenize(part)
            if i < len(parts) - 1:
                ids += [-1] * 4
        return ids, ("media", len(images))

    def compile_grammar(self, spec: GrammarSpec) -> str:
        """Echoes the spec; a source containing "bad" does not compile."""
        self.grammar_specs.append(spec)
        if "bad" in spec.source:
            raise GrammarError("bad grammar")
        return f"{spec.kind}:{spec.source}"

    def detokenize(self, token_ids: Sequence[int], special: bool = False) -> str:
        data = b"".join(self.token_bytes(i, special) for i in token_ids)
        return data.decode("utf-8", errors="replace")

    def sampled_bytes(self, sample: int, step: int) -> bytes:
        if self.script is not None:
            return self.script[step]
        return f" s{sample}t{step}".encode()

    def alternatives(self, num: int) -> list[int]:
        return [self.token_id(f" alt{r}".encode()) for r in range(num)]

    def sampled_score(self, token_id: int, step: int, num_top: int) -> TokenLogprob:
        """At even steps the sampled token is the most likely one, at odd steps not listed."""
        logprob = -0.25 * (step + 1)
        alternatives = [(i, -2.0 - r) for r, i in enumerate(self.alternatives(num_top))]
        if step % 2 == 0 and num_top:
            alternatives = [(token_id, logprob), *alternatives[: num_top - 1]]
        return TokenLogprob(token_id, logprob, tuple(alternatives), logprob / 2)

    def prompt_score(self, token_ids: Sequence[int], position: int, num_top: int):
        if position == 0:
            return None
        alternatives = tuple((i, -3.0 - r) for r, i in enumerate(self.alternatives(num_top)))
        return TokenLogprob(token_ids[position], -0.5 * position, alternatives)

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        self.requests.append(request)
        params = request.params
        prompt = request.prompt_token_ids
        num_steps = min(params.max_tokens, self.num_words)
        reason = FinishReason.LENGTH if params.max_tokens <= self.num_words else FinishReason.STOP
        decoders = [codecs.getincrementaldecoder("utf-8")("replace") for _ in range(params.n)]
        prompt_logprobs = None
        if params.prompt_logprobs is not None and not self.omit_prompt_logprobs:
            prompt_logprobs = tuple(
                self.prompt_score(prompt, i, params.prompt_logprobs)
                for i in range(params.prompt_logprobs_start, len(prompt))
            )
        is_finished = False
        try:
            if self.hang:
                await asyncio.Event().wait()
            if num_steps == 0:  # scoring only
                is_finished = True
                empty = () if params.logprobs is not None else None
                deltas = tuple(SampleDelta(j, "", (), reason, empty) for j in range(params.n))
                yield RequestOutput(
                    request.request_id,
                    deltas,
                    num_prompt_tokens=len(prompt),
                    prompt_logprobs=prompt_logprobs,
                    finished=True,
                )
                return
            for step in range(num_steps):
                await asyncio.sleep(0)
                if step == self.error_at_step:
                    is_finished = True
                    yield RequestOutput(request.request_id, error="boom", finished=True)
                    return
                is_last = step == num_steps - 1
                deltas = []
                for j in range(params.n):
                    data = self.sampled_bytes(j, step)
                    token_id = self.token_id(data)
                    logprobs = None
                    if params.logprobs is not None:
                        logprobs = (self.sampled_score(token_id, step, params.logprobs),)
                    text = decoders[j].decode(data, final=is_last)
                    deltas.append(
                        SampleDelta(j, text, (token_id,), reason if is_last else None, logprobs)
                    )
                is_finished = is_last
                # With a draft, each step after the first "checks" two tokens, keeps one.
                speculation = None
                if request.speculation:
                    given = len(request.speculation) * params.n
                    speculation = SpeculationCounts(given, step, 2 * step, step)
                yield RequestOutput(
                    request.request_id,
                    tuple(deltas),
                    num_prompt_tokens=len(prompt),
                    num_cached_tokens=self.cached_tokens,
                    prompt_logprobs=prompt_logprobs if step == 0 else None,
                    finished=is_last,
                    speculation=speculation,
                )
        finally:
            if not is_finished:
                self.closed_early.append(request.request_id)

    def abort(self, request_id: str) -> None:
        self.closed_early.append(request_id)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running_seqs=2,
            num_waiting_requests=1,
            num_kv_cells_used=16,
            num_kv_cells_total=64,
            prefill_tokens_total=7,
            generated_tokens_total=11,
            prefix_cache_queries_total=40,
            prefix_cache_hits_total=30,
            grammar_masks_total=5,
            grammar_mask_seconds_total=0.5,
            spec_draft_tokens_total=9,
            spec_accepted_tokens_total=4,
        )
