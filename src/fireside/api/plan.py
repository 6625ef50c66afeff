"""What `planning.CompletionPlanner.prepare` decided: a checked request, ready to run.

Frozen data, plus the two things a plan holds until it has run: its places in
the waiting queue and its log lines. `running` runs a plan and `choices` turns
its engine outputs into response choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fireside.api.admission import QueueHold
from fireside.api.protocol import LogprobsFormat, StreamUsage
from fireside.api.request_log import RequestLog
from fireside.engine.client import EngineClient
from fireside.engine.types import SamplingParams
from fireside.runner.base import MediaPrompt


@dataclass(frozen=True)
class Caller:
    """What the HTTP layer knows of who sent a request, for planning."""

    tenant: str | None = None  # a digest of the API key it authenticated with (auth.py)
    isolation_header: str | None = None  # `x-prompt-cache-isolation-key`, if sent


@dataclass(frozen=True)
class OutputOptions:
    """What a request asked to see beyond the text."""

    logprobs: LogprobsFormat | None = None  # None: no logprobs
    num_top_logprobs: int = 0  # alternatives per position
    return_token_ids: bool = False
    raw_output: bool = False
    perf_metrics: bool = False  # in the body; non-streamed answers always have the headers
    stream_usage: StreamUsage = StreamUsage.LAST_CHOICE  # where a stream's usage goes
    continuous_usage: bool = False  # every streamed chunk has its choice's usage so far

    @property
    def is_per_token(self) -> bool:
        """Whether a streamed chunk is worth sending for tokens that added no text yet."""
        return self.logprobs is not None or self.return_token_ids


@dataclass(frozen=True)
class PromptPlan:
    """One prompt of a request: its tokens and the engine parameters it runs with."""

    index: int
    token_ids: tuple[int, ...]
    text: str | None  # the prompt as the client sent it; None for token ids
    echo_text: str  # what the choice's text starts with; "" without echo
    params: SamplingParams  # max_tokens already fitted to the context
    media: MediaPrompt | None = None  # its images, tokenized (EngineClient.tokenize_media)
    speculation: tuple[int, ...] = ()  # draft token ids, at most max_tokens of them

    @property
    def is_scored(self) -> bool:
        """Whether the engine scores the echoed prompt tokens (echo with logprobs)."""
        return self.params.prompt_logprobs is not None

    @property
    def needs_engine(self) -> bool:
        # max_tokens 0 without scoring generates nothing, so the engine is not asked.
        return self.params.max_tokens > 0 or self.is_scored

    @property
    def fragments(self) -> list[str | int]:
        """`raw_output.prompt_fragments`: the prompt as sent, string or token ids."""
        return [self.text] if self.text is not None else list(self.token_ids)


@dataclass(frozen=True)
class CompletionPlan:
    """A request that passed every check."""

    cmpl_id: str
    created: int
    model: str
    engine: EngineClient
    prompts: tuple[PromptPlan, ...]
    n: int
    stream: bool
    options: OutputOptions
    started_at: float  # time.monotonic() when prepare began, for perf metrics
    # Queue places for the engine requests, released once they are submitted.
    queue_hold: QueueHold = field(compare=False)
    log: RequestLog = field(compare=False)  # `start` written; `done` once it ends
    # What each engine request carries besides its prompt (EngineRequest's fields).
    cache_isolation_key: str | None = None
    cache_key: str | None = None
    priority: bool = False

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p.token_ids) for p in self.prompts)

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n
