"""Wiring: model -> runner -> engine -> app -> uvicorn. The only place all layers meet."""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import uvicorn
from fastapi import FastAPI

from fireside.api import CompletionService, ModelInfo, create_app
from fireside.api.status import StatusCounter
from fireside.cli import ModelSpec, resolve_aliases, resolve_models
from fireside.config import ServeConfig
from fireside.engine.engine import Engine, EngineConfig
from fireside.runner import weights
from fireside.runner.llamacpp import LlamaCppConfig, LlamaCppRunner, available_cores

log = logging.getLogger("fireside")


class _Server(uvicorn.Server):
    """uvicorn, announcing the bound address (port 0 picks a free one) once it listens,
    draining on SIGTERM/SIGINT, and stopping with an error if an engine dies."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, engines: list[Engine]) -> None:
        super().__init__(config)
        self.app = app
        self.engines = engines
        self.exit_code = 0

    async def startup(self, sockets=None) -> None:  # type: ignore[no-untyped-def]
        await super().startup(sockets)
        if self.should_exit or not self.servers:
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        print(f"fireside: listening on http://{host}:{port}", file=sys.stderr, flush=True)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            print(
                "fireside: draining: new requests get 503, running ones may finish",
                file=sys.stderr,
                flush=True,
            )
        self.app.state.draining = True
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals once it has stopped, so the process would
        # die of SIGTERM; a drained shutdown is a clean one and exits 0.
        if sig in (signal.SIGTERM, signal.SIGINT) and self._captured_signals:
            self._captured_signals.pop()

    async def on_tick(self, counter: int) -> bool:
        # uvicorn ticks every 0.1 s; a dead engine makes the process exit non-zero, so
        # a supervisor restarts it (its requests have already been failed).
        if any(engine.is_dead for engine in self.engines) and not self.should_exit:
            log.error("an engine thread died; stopping so a supervisor can restart us")
            self.exit_code = 1
            self.should_exit = True
        return await super().on_tick(counter)


class _Progress:
    def __init__(self, name: str) -> None:
        self.name = name
        self.shown = -1

    def __call__(self, fraction: float) -> None:
        percent = int(fraction * 100)
        if percent // 10 > self.shown // 10 or percent == 100 and self.shown != 100:
            self.shown = percent
            print(f"fireside: loading {self.name}: {percent}%", file=sys.stderr, flush=True)


def _say(text: str) -> None:
    print(f"fireside: {text}", file=sys.stderr, flush=True)


def weights_path(config: ServeConfig, path: str) -> str:
    """The file to load: the model itself, or its conversion to a fast format."""
    target = weights.choose(path, config.weights)
    if target is None:
        return path
    cache_dir = Path(config.cache_dir) if config.cache_dir else None
    return weights.convert(path, target, cache_dir, config.threads, say=_say)


def build_engine(config: ServeConfig, spec: ModelSpec) -> Engine:
    path, name = spec.path, spec.name
    threads = config.threads or available_cores()
    path = weights_path(config, path)
    started = time.perf_counter()
    runner = LlamaCppRunner(
        LlamaCppConfig(
            model_path=path,
            n_ctx=config.ctx_size,
            n_batch=config.batch_size,
            # A sequence id per running sample, plus one per cached prefix.
            n_seq_max=min(256, max(config.parallel, config.max_n) + config.prefix_cache),
            n_threads=threads,
            flash_attn=config.flash_attn,
            mmproj_path=spec.mmproj,
        ),
        progress=_Progress(name),
    )
    log.info(
        "loaded %s in %.1fs: vocab %d, context %d, %d KV cells, %d threads",
        path,
        time.perf_counter() - started,
        runner.vocab_size,
        min(runner.n_ctx, runner.n_ctx_train),
        runner.n_ctx,
        threads,
    )
    return Engine(
        runner,
        EngineConfig(
            max_running=config.parallel,
            token_budget=config.batch_size,
            cache_entries=config.prefix_cache,
            prefill_chunk=config.prefill_chunk,
        ),
    )


def serve(config: ServeConfig) -> int:
    specs = resolve_models(config)
    aliases = resolve_aliases(config, specs)
    engines: dict[str, Engine] = {}
    for spec in specs:  # each model has its own engine (and its own llama.cpp threads)
        engines[spec.name] = build_engine(config, spec)
        engines[spec.name].start()
    created = int(time.time())
    models = [
        ModelInfo(name, e.context_length, created, vision=e.supports_images)
        for name, e in engines.items()
    ]
    models += [
        ModelInfo(
            alias, engines[target].context_length, created, vision=engines[target].supports_images
        )
        for alias, target in aliases.items()
    ]
    service = CompletionService(
        {**engines, **{alias: engines[target] for alias, target in aliases.items()}},
        default_max_tokens=config.default_max_tokens,
        max_image_bytes=config.max_image_bytes,
        max_waiting=config.max_waiting,
        request_timeout_s=config.request_timeout,
    )
    app = create_app(
        service,
        models=models,
        api_keys=config.api_keys,
        engines=engines,  # health and metrics per model, not per alias
        test_hooks=os.environ.get("FIRESIDE_TEST_HOOKS") == "1",
    )
    if not config.api_keys:
        print(
            "fireside: WARNING: no API key configured (--api-key or FIRESIDE_API_KEYS): "
            "anyone who can reach this port can use the server",
            file=sys.stderr,
            flush=True,
        )
    server = _Server(
        uvicorn.Config(
            StatusCounter(app, service.counters.responses),
            host=config.host,
            port=config.port,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=math.ceil(config.shutdown_grace),
        ),
        app,
        list(engines.values()),
    )
    try:
        server.run()
    finally:
        for engine in engines.values():
            engine.shutdown()
    return server.exit_code
