"""The Serve application: one HTTP ingress running Fireside's API, N engine replicas.

- `EngineReplica` (N replicas, `--threads` CPUs each): one runner and `Engine`,
  as `fireside serve` has. It streams a request's `RequestOutput`s back through
  the handle, reports what it caches to the router (`record_routing_stats`) and
  its counters to the ingress every second, and fails Serve's health check once
  its engine thread has died, so Serve replaces it.
- `Ingress` (one replica, no CPU reserved): the same FastAPI app `fireside
  serve` runs (auth, validation, errors, SSE, /v1/models, /health, /metrics),
  over a `ClusterEngine`: the `EngineClient` protocol on a deployment handle.
  Tokenizing, validation and grammar compiling happen here, on a vocab-only load
  of the model (`LlamaCppVocab`: no weights read): the API layer tokenizes
  synchronously while it validates (prompt length, logit_bias ids, echo), which a
  call to a replica could not do, and the router needs the token ids to route by.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, cast

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.deployment import Application
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from fireside import logs
from fireside.cluster.prefix import report
from fireside.config import ServeConfig
from fireside.engine.grammar import Grammars
from fireside.engine.types import (
    EngineRequest,
    EngineStats,
    GrammarSpec,
    PromptImage,
    RequestOutput,
)
from fireside.models import ModelSpec, resolve_aliases, resolve_models
from fireside.runner.base import MediaPrompt, TokenizerInfo

log = logging.getLogger("fireside.cluster")

APP_NAME = "fireside"
INGRESS = "FiresideIngress"
ENGINE = "FiresideEngine"
# The response header naming the replica that ran a request (its Serve replica id).
REPLICA_HEADER = "x-fireside-replica"
# With FIRESIDE_TEST_HOOKS=1, also its process id (tests kill replicas by it).
REPLICA_PID_HEADER = "x-fireside-replica-pid"
REPORT_PERIOD_S = 1.0
# A replica whose report is older than this no longer counts for /health or /metrics.
REPORT_STALE_S = 5.0


def _model(config: ServeConfig) -> ModelSpec:
    return resolve_models(config.models, config.model_name, ())[0]


# -- the engine replicas ------------------------------------------------------


class EngineReplica:
    # Serve awaits an async constructor; mypy wants __init__ to return None.
    async def __init__(self, config: ServeConfig) -> None:  # type: ignore[misc]
        from fireside.server import build_engine  # the runner: llama_cpp loads here

        logs.configure(config.log_level)
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.engine = build_engine(config, _model(config))
        self.engine.start()
        self._running: dict[str, EngineRequest] = {}
        self._ingress = serve.get_deployment_handle(INGRESS, app_name=context.app_name)
        self._reporter = asyncio.get_running_loop().create_task(self._report_forever())

    def info(self) -> dict[str, Any]:
        """What the ingress cannot learn from the vocabulary alone."""
        return {"context_length": self.engine.context_length}

    async def generate(self, request: EngineRequest) -> AsyncIterator[object]:
        """First a dict naming this replica, then the request's outputs. A cancelled
        call (the client left, the ingress aborted) aborts it in the engine."""
        yield {"replica": self.replica_id, "pid": os.getpid()}
        self._running[request.request_id] = request
        try:
            async for output in self.engine.generate(request):
                yield output
        finally:
            self._running.pop(request.request_id, None)

    def record_routing_stats(self) -> dict[str, Any]:
        """For the router (every second): the prefixes this replica holds, running
        prompts first, then its prefix cache, most recently used first."""
        running = [(r.prompt_token_ids, r.cache_isolation_key) for r in self._running.values()]
        entries = sorted(self.engine.scheduler.cache.entries, key=lambda e: -e.last_used)
        cached = [(e.tokens, e.isolation_key) for e in entries]
        return {
            "blocks": report(running + cached),
            "running": len(self._running),
            "at": time.time(),  # every report differs: the router resets its counts by it
        }

    def check_health(self) -> None:
        """Serve's health check: a dead engine thread makes Serve replace this replica."""
        if self.engine.is_dead:
            raise RuntimeError("the engine thread died")

    async def _report_forever(self) -> None:
        while True:
            status = {
                "healthy": self.engine.is_healthy,
                "stats": dataclasses.asdict(self.engine.stats()),
            }
            try:
                await self._ingress.report.remote(self.replica_id, status)
            except Exception as exc:  # the ingress is starting or restarting
                log.debug("report to the ingress failed: %s", exc)
            await asyncio.sleep(REPORT_PERIOD_S)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


# -- the ingress --------------------------------------------------------------

# Per HTTP request: where ClusterEngine.generate notes the replica that ran it.
_served_by: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "fireside_served_by", default=None
)


class ClusterEngine:
    """`EngineClient` over the engine deployment's handle; the vocabulary is local."""

    def __init__(
        self, handle: DeploymentHandle[Any], model_path: str, info: Mapping[str, Any]
    ) -> None:
        from fireside.runner.llamacpp import LlamaCppVocab

        self._handle = handle.options(stream=True)
        self._vocab = LlamaCppVocab(model_path)
        self.grammars = Grammars(self._vocab.grammar_tokenizer, num_threads=1)
        self._context_length = int(info["context_length"])
        self._streams: dict[str, DeploymentResponseGenerator[Any]] = {}
        self._reports: dict[str, tuple[float, Mapping[str, Any]]] = {}

    # -- what replicas report --------------------------------------------------

    def report(self, replica_id: str, status: Mapping[str, Any]) -> None:
        self._reports[replica_id] = (time.monotonic(), status)

    def _live(self) -> list[Mapping[str, Any]]:
        now = time.monotonic()
        for rid in [r for r, (at, _) in self._reports.items() if now - at > REPORT_STALE_S]:
            del self._reports[rid]
        return [status for _, status in self._reports.values()]

    @property
    def num_healthy_replicas(self) -> int:
        return sum(1 for status in self._live() if status["healthy"])

    # -- EngineClient ------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._vocab.vocab_size

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def is_healthy(self) -> bool:
        """Some replica is up and its engine runs."""
        return self.num_healthy_replicas > 0

    def tokenize(
        self, text: str, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        return self._vocab.tokenize(text, add_special, parse_special)

    def tokenizer_info(self) -> TokenizerInfo:
        return self._vocab.tokenizer_info()

    def detokenize(self, token_ids: Sequence[int], special: bool = False) -> str:
        return self._vocab.detokenize(token_ids, special)

    def token_bytes(self, token_id: int, special: bool = False) -> bytes:
        return self._vocab.token_bytes(token_id, special)

    @property
    def supports_images(self) -> bool:
        return False  # config.problems refuses --mmproj with --replicas

    def tokenize_media(
        self, text: str, images: Sequence[PromptImage]
    ) -> tuple[list[int], MediaPrompt]:
        raise ValueError("this model does not accept images")

    def compile_grammar(self, spec: GrammarSpec) -> str:
        return self.grammars.compile(spec)

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        stream = cast(DeploymentResponseGenerator[Any], self._handle.generate.remote(request))
        self._streams[request.request_id] = stream
        finished = False
        try:
            async for item in stream:
                if isinstance(item, dict):  # the replica's name comes first
                    served_by = _served_by.get()
                    if served_by is not None:
                        served_by.update({k: str(v) for k, v in item.items()})
                    continue
                finished = item.finished
                yield item
                if finished:
                    break
        except Exception as exc:  # the replica died, or Serve could not reach one
            log.error("request %s: replica failed: %s", request.request_id, exc)
            finished = True
            yield RequestOutput(
                request.request_id,
                finished=True,
                error=f"the replica running it failed ({type(exc).__name__})",
            )
        finally:
            self._streams.pop(request.request_id, None)
            if not finished:
                stream.cancel()  # the replica's generator is cancelled: the engine aborts

    def abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.cancel()

    def stats(self) -> EngineStats:
        """The replicas' counters summed (as of their last reports, ≤ 1 s old)."""
        total = EngineStats()
        for status in self._live():
            for name, value in status["stats"].items():
                if name == "extra":
                    for key, x in value.items():
                        total.extra[key] = total.extra.get(key, 0) + x
                else:
                    setattr(total, name, getattr(total, name) + value)
        return total


class _ReplicaHeaders:
    """ASGI middleware: each HTTP request gets a fresh note for `ClusterEngine` to fill,
    and the response's headers say which replica ran it (when one did). A stream's
    headers wait for its first body chunk, which comes after the replica has named
    itself (a client sees nothing of a stream before that chunk anyway)."""

    def __init__(self, app: Any, with_pid: bool) -> None:
        self.app = app
        self.with_pid = with_pid

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        note: dict[str, str] = {}
        token = _served_by.set(note)
        start: dict[str, Any] | None = None

        async def send_with_replica(message: Any) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if start is not None:
                headers = list(start.get("headers", []))
                if "replica" in note:
                    headers.append((REPLICA_HEADER.encode(), note["replica"].encode()))
                    if self.with_pid:
                        headers.append((REPLICA_PID_HEADER.encode(), note["pid"].encode()))
                await send({**start, "headers": headers})
                start = None
            await send(message)

        try:
            await self.app(scope, receive, send_with_replica)
        finally:
            _served_by.reset(token)


@serve.ingress()
class Ingress:
    async def __init__(  # type: ignore[misc]
        self, config: ServeConfig, engine: DeploymentHandle[Any]
    ) -> None:
        from fireside.server import build_app, check_chat_template

        logs.configure(config.log_level)
        template = check_chat_template(config)
        spec = _model(config)
        aliases = resolve_aliases(config.aliases, [spec])
        info = await engine.info.remote()  # waits until a replica is up
        self.engine = ClusterEngine(engine, spec.path, info)
        _, asgi_app = build_app(config, {spec.name: self.engine}, aliases, template)
        self._app = _ReplicaHeaders(asgi_app, os.environ.get("FIRESIDE_TEST_HOOKS") == "1")
        log.info("model %s: served by %d replicas", spec.name, config.replicas)

    def __serve_build_asgi_app__(self) -> Any:
        return self._app

    def report(self, replica_id: str, status: Mapping[str, Any]) -> None:
        self.engine.report(replica_id, status)


# -- the application ----------------------------------------------------------


def application(config: ServeConfig) -> Application:
    """The Serve application for these settings (`config.replicas` engine replicas)."""
    routing: dict[str, Any] = {"request_routing_stats_period_s": REPORT_PERIOD_S}
    if config.router == "prefix":
        routing["request_router_class"] = "fireside.cluster.router:PrefixAwareRouter"
        # A replica may run a quarter of a batch more than the least loaded one and
        # still get the prompts whose prefixes it holds; beyond that, waiting there
        # costs more than recomputing a prefix elsewhere (benchmarks/cluster.py).
        routing["request_router_kwargs"] = {"imbalance": max(2, config.parallel // 4)}
    # Every request a replica's engine would run or queue itself: continuous batching
    # sees a full batch, and the engine's own queue does the waiting.
    per_replica = config.parallel + config.max_waiting
    engine = serve.deployment(
        name=ENGINE,
        num_replicas=max(1, config.replicas),
        ray_actor_options={"num_cpus": config.threads or 1},
        max_ongoing_requests=per_replica,
        request_router_config=RequestRouterConfig(**routing),
        health_check_period_s=2.0,
        health_check_timeout_s=10.0,
        graceful_shutdown_timeout_s=config.shutdown_grace,
    )(EngineReplica)
    ingress = serve.deployment(
        name=INGRESS,
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max(1000, 4 * max(1, config.replicas) * per_replica),
        graceful_shutdown_timeout_s=config.shutdown_grace,
    )(Ingress)
    return ingress.bind(config, engine.bind(config))
