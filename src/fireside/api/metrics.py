"""Prometheus metrics: counts the API layer keeps, and engine counters read at scrape time.

Engine numbers are read from `EngineClient.stats()` when Prometheus scrapes,
so nothing has to push updates and the numbers are never stale. Each app owns
its registry, so two apps in one process (tests) never share counters.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fireside.engine.client import EngineClient

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


class FiresideCollector(Collector):
    def __init__(self, engines: Mapping[str, EngineClient], counters: ServingCounters) -> None:
        self._engines = engines
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        running = GaugeMetricFamily(
            "fireside:num_requests_running", "Sequences running in the engine.", labels=[_MODEL]
        )
        waiting = GaugeMetricFamily(
            "fireside:num_requests_waiting", "Requests waiting to be scheduled.", labels=[_MODEL]
        )
        kv_usage = GaugeMetricFamily(
            "fireside:kv_cache_usage_perc", "Fraction of KV cache cells in use.", labels=[_MODEL]
        )
        prefill = CounterMetricFamily(
            "fireside:prefill_tokens_computed",
            "Prompt tokens run through the model (prefix-cache hits and forks excluded).",
            labels=[_MODEL],
        )
        generated = CounterMetricFamily(
            "fireside:generation_tokens", "Tokens generated.", labels=[_MODEL]
        )
        prompt = CounterMetricFamily(
            "fireside:prompt_tokens", "Prompt tokens submitted.", labels=[_MODEL]
        )
        cache_queries = CounterMetricFamily(
            "fireside:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            labels=[_MODEL],
        )
        cache_hits = CounterMetricFamily(
            "fireside:prefix_cache_hits",
            "Prompt tokens found in the prefix cache (not computed again).",
            labels=[_MODEL],
        )
        aborts = CounterMetricFamily(
            "fireside:request_aborts",
            "Engine requests stopped early (client disconnected, timeout).",
            labels=[_MODEL],
        )
        masks = CounterMetricFamily(
            "fireside:grammar_masks",
            "Token masks computed for constrained (response_format) sequences.",
            labels=[_MODEL],
        )
        mask_seconds = CounterMetricFamily(
            "fireside:grammar_mask_seconds",
            "Seconds spent computing and applying those masks.",
            labels=[_MODEL],
        )
        successes = CounterMetricFamily(
            "fireside:request_success",
            "Choices finished, by finish reason.",
            labels=[_MODEL, "finished_reason"],
        )
        for model, engine in self._engines.items():
            stats = engine.stats()
            used, total = stats.num_kv_cells_used, stats.num_kv_cells_total
            running.add_metric([model], stats.num_running_seqs)
            waiting.add_metric([model], stats.num_waiting_requests)
            kv_usage.add_metric([model], used / total if total else 0.0)
            prefill.add_metric([model], stats.prefill_tokens_total)
            generated.add_metric([model], stats.generated_tokens_total)
            prompt.add_metric([model], self._counters.prompt_tokens[model])
            cache_queries.add_metric([model], stats.prefix_cache_queries_total)
            cache_hits.add_metric([model], stats.prefix_cache_hits_total)
            aborts.add_metric([model], stats.requests_aborted_total)
            masks.add_metric([model], stats.grammar_masks_total)
            mask_seconds.add_metric([model], stats.grammar_mask_seconds_total)
        for (model, reason), count in sorted(self._counters.successes.items()):
            successes.add_metric([model, reason], count)
        yield from (
            running,
            waiting,
            kv_usage,
            prefill,
            generated,
            prompt,
            cache_queries,
            cache_hits,
            aborts,
            masks,
            mask_seconds,
            successes,
        )


def make_registry(
    engines: Mapping[str, EngineClient], counters: ServingCounters
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FiresideCollector(engines, counters))
    for metric in (counters.ttft, counters.itl, counters.e2e, counters.responses):
        registry.register(metric)
    return registry
