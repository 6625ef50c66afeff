"""The completions endpoint, minus HTTP: plan a request, then run the plan.

Two phases, so that every client error is an HTTP status and never a broken
stream: `prepare` checks everything and submits nothing (planning.py);
`complete` or `stream` then runs the plan (running.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

from fireside.api.admission import Admission
from fireside.api.metrics import ServingCounters
from fireside.api.plan import Caller, CompletionPlan
from fireside.api.planning import CompletionPlanner
from fireside.api.protocol import MAX_N, CompletionRequest
from fireside.api.request_log import ClientDisconnected
from fireside.api.running import CompletionResult, IsDisconnected, PlanRunner
from fireside.engine.client import EngineClient

__all__ = ["ClientDisconnected", "CompletionResult", "CompletionService", "MAX_TOTAL_TOKENS"]

# Generated tokens one request may ask for in all (prompts x n x max_tokens).
MAX_TOTAL_TOKENS = 2**20


class CompletionService:
    """Plans and runs completion requests on the engines of their models."""

    def __init__(
        self,
        engines: Mapping[str, EngineClient],
        *,  # the server settings: no defaults here, server.py passes config.ServeConfig's
        default_max_tokens: int,
        max_image_bytes: int,
        max_waiting: int,
        request_timeout_s: float,
        include_stop_str_in_output: bool,
        isolate_cache_per_key: bool,
        counters: ServingCounters | None = None,
        max_prompts: int = MAX_N,
        max_total_tokens: int = MAX_TOTAL_TOKENS,
    ) -> None:
        self.engines = dict(engines)
        self.counters = counters or ServingCounters()
        self.admission = Admission(max_waiting)
        self.planner = CompletionPlanner(
            self.engines,
            self.admission,
            default_max_tokens=default_max_tokens,
            include_stop_str_in_output=include_stop_str_in_output,
            max_image_bytes=max_image_bytes,
            max_prompts=max_prompts,
            max_total_tokens=max_total_tokens,
            isolate_cache_per_key=isolate_cache_per_key,
        )
        self.runner = PlanRunner(self.counters, request_timeout_s)

    async def prepare(
        self, request: CompletionRequest, caller: Caller | None = None
    ) -> CompletionPlan:
        """Check everything a client could get wrong; raises `APIError`, submits nothing."""
        return await self.planner.prepare(request, caller)

    async def complete(
        self, plan: CompletionPlan, is_disconnected: IsDisconnected | None = None
    ) -> CompletionResult:
        """The whole answer; `ClientDisconnected` if the client leaves first."""
        return await self.runner.complete(plan, is_disconnected)

    def stream(self, plan: CompletionPlan) -> AsyncIterator[bytes]:
        """The answer as SSE events, ending with `[DONE]`."""
        return self.runner.stream(plan)
