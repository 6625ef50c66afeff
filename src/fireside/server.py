"""Wiring: model -> runner -> engine -> app -> uvicorn. The only place all layers meet."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import uvicorn

from fireside.api import CompletionService, ModelInfo, create_app
from fireside.cli import resolve_model
from fireside.config import ServeConfig
from fireside.engine.engine import Engine, EngineConfig
from fireside.runner import weights
from fireside.runner.llamacpp import LlamaCppConfig, LlamaCppRunner, available_cores

log = logging.getLogger("fireside")


class _Server(uvicorn.Server):
    """uvicorn, announcing the bound address (port 0 picks a free one) once it listens."""

    async def startup(self, sockets=None) -> None:  # type: ignore[no-untyped-def]
        await super().startup(sockets)
        if self.should_exit or not self.servers:
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        print(f"fireside: listening on http://{host}:{port}", file=sys.stderr, flush=True)


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


def build_engine(config: ServeConfig, path: str, name: str) -> Engine:
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
            mmproj_path=config.mmproj,
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
    path, name = resolve_model(config)
    engine = build_engine(config, path, name)
    engine.start()
    service = CompletionService(
        {name: engine},
        default_max_tokens=config.default_max_tokens,
        max_image_bytes=config.max_image_bytes,
    )
    app = create_app(
        service,
        models=[
            ModelInfo(name, engine.context_length, int(time.time()), vision=engine.supports_images)
        ],
        api_keys=config.api_keys,
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
            app,
            host=config.host,
            port=config.port,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=10,
        )
    )
    try:
        server.run()
    finally:
        engine.shutdown()
    return 0
