"""Prometheus metrics: counts the API layer keeps, and engine counters read at scrape time.

Engine numbers are read from `EngineClient.stats()` when Prometheus scrapes,
so nothing has to push updates and the numbers are never stale. Each app owns
its registry, so two apps in one process (tests) never share counters.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fireside.engine.client import EngineClient
from fireside.engine.types import EngineStats

_MODEL = "model_name"


class ServingCounters:
    """What only the API layer sees: tokens submitted, how choices finished, HTTP
    statuses, and the latency histograms (names follow vLLM's)."""

    def __init__(self) -> None:
        self.prompt_tokens: Counter[str] = Counter()
        self.successes: Counter[tuple[str, str]] = Counter()  # (model, finish_reason)
        self.ttft = Histogram(
            "fireside:time_to_first_token_seconds",
            "From the request's arrival to its first generated token.",
            [_MODEL],
            buckets=(0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80),
            registry=None,
        )
        self.itl = Histogram(
            "fireside:inter_token_latency_seconds",
            "Between two generated tokens of one request.",
            [_MODEL],
            buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5),
            registry=None,
        )
        self.e2e = Histogram(
            "fireside:e2e_request_latency_seconds",
            "From the request's arrival to its last token.",
            [_MODEL],
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640),
            registry=None,
        )
        self.responses = PromCounter(
            "fireside:http_requests",
            "Completion requests answered, by HTTP status.",
            ["status"],
            registry=None,
        )

    def add_prompt_tokens(self, model: str, num_tokens: int) -> None:
        self.prompt_tokens[model] += num_tokens

    def add_success(self, model: str, finish_reason: str) -> None:
        self.successes[(model, finish_reason)] += 1

    def observe_latencies(
        self, model: str, ttft_s: float, total_s: float, token_gaps: Sequence[float]
    ) -> None:
        """The latency histograms of one request that generated tokens."""
        self.ttft.labels(model).observe(ttft_s)
        self.e2e.labels(model).observe(total_s)
        itl = self.itl.labels(model)
        for gap in token_gaps:
            itl.observe(gap)


def _kv_usage(stats: EngineStats) -> float:
    total = stats.num_kv_cells_total
    return stats.num_kv_cells_used / total if total else 0.0


# Per-engine metrics read from EngineStats at scrape time: (family, name, help, value).
_ENGINE_METRICS: list[tuple[type, str, str, Callable[[EngineStats], float]]] = [
    (
        GaugeMetricFamily,
        "fireside:num_requests_running",
        "Sequences running in the engine.",
        lambda s: s.num_running_seqs,
    ),
    (
        GaugeMetricFamily,
        "fireside:num_requests_waiting",
        "Requests waiting to be scheduled.",
        lambda s: s.num_waiting_requests,
    ),
    (
        GaugeMetricFamily,
        "fireside:kv_cache_usage_perc",
        "Fraction of KV cache cells in use.",
        _kv_usage,
    ),
    (
        CounterMetricFamily,
        "fireside:prefill_tokens_computed",
        "Prompt tokens run through the model (prefix-cache hits and forks excluded).",
        lambda s: s.prefill_tokens_total,
    ),
    (
        CounterMetricFamily,
        "fireside:generation_tokens",
        "Tokens generated.",
        lambda s: s.generated_tokens_total,
    ),
    (
        CounterMetricFamily,
        "fireside:prefix_cache_queries",
        "Prompt tokens looked up in the prefix cache.",
        lambda s: s.prefix_cache_queries_total,
    ),
    (
        CounterMetricFamily,
        "fireside:prefix_cache_hits",
        "Prompt tokens found in the prefix cache (not computed again).",
        lambda s: s.prefix_cache_hits_total,
    ),
    (
        CounterMetricFamily,
        "fireside:request_aborts",
        "Engine requests stopped early (client disconnected, timeout).",
        lambda s: s.requests_aborted_total,
    ),
    (
        CounterMetricFamily,
        "fireside:grammar_masks",
        "Token masks computed for constrained (response_format) sequences.",
        lambda s: s.grammar_masks_total,
    ),
    (
        CounterMetricFamily,
        "fireside:grammar_mask_seconds",
        "Seconds spent computing and applying those masks.",
        lambda s: s.grammar_mask_seconds_total,
    ),
    (
        CounterMetricFamily,
        "fireside:spec_decode_num_draft_tokens",
        "Draft tokens checked by speculative decoding (predictions and prompt lookup).",
        lambda s: s.spec_draft_tokens_total,
    ),
    (
        CounterMetricFamily,
        "fireside:spec_decode_num_accepted_tokens",
        "Of those, tokens accepted into outputs.",
        lambda s: s.spec_accepted_tokens_total,
    ),
]


class FiresideCollector(Collector):
    def __init__(self, engines: Mapping[str, EngineClient], counters: ServingCounters) -> None:
        self._engines = engines
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        stats = {model: engine.stats() for model, engine in self._engines.items()}
        for family, name, help_text, value in _ENGINE_METRICS:
            metric = family(name, help_text, labels=[_MODEL])
            for model, s in stats.items():
                metric.add_metric([model], value(s))
            yield metric
        prompt = CounterMetricFamily(
            "fireside:prompt_tokens", "Prompt tokens submitted.", labels=[_MODEL]
        )
        for model in self._engines:
            prompt.add_metric([model], self._counters.prompt_tokens[model])
        yield prompt
        successes = CounterMetricFamily(
            "fireside:request_success",
            "Choices finished, by finish reason.",
            labels=[_MODEL, "finished_reason"],
        )
        for (model, reason), count in sorted(self._counters.successes.items()):
            successes.add_metric([model, reason], count)
        yield successes


def make_registry(
    engines: Mapping[str, EngineClient], counters: ServingCounters
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FiresideCollector(engines, counters))
    for metric in (counters.ttft, counters.itl, counters.e2e, counters.responses):
        registry.register(metric)
    return registry
