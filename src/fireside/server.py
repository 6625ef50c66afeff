"""Wiring: model -> runner -> engine -> app -> uvicorn. The only place all layers meet."""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

import uvicorn
from fastapi import FastAPI

from fireside import logs
from fireside.api import CompletionService, ModelInfo, create_app
from fireside.api.chat_template import ChatTemplate, load_chat_template
from fireside.api.status import StatusCounter
from fireside.config import ServeConfig
from fireside.engine.client import EngineClient
from fireside.engine.engine import Engine, EngineConfig
from fireside.models import ModelSpec, resolve_aliases, resolve_models
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
        log.info("listening on http://%s:%s", f"[{host}]" if ":" in host else host, port)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            log.info("draining: new requests get 503, running ones may finish")
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
    """Loading progress by tenths: info once a load has taken a second (a big model),
    debug before (a small one loads in a blink, and the `loaded` line says so)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.shown = -1
        self.started = time.perf_counter()

    def __call__(self, fraction: float) -> None:
        percent = int(fraction * 100)
        if percent // 10 > self.shown // 10 or percent == 100 and self.shown != 100:
            self.shown = percent
            level = logging.INFO if time.perf_counter() - self.started >= 1 else logging.DEBUG
            log.log(level, "loading %s: %d%%", self.name, percent)


def _say(text: str) -> None:
    log.info("%s", text)


def weights_path(config: ServeConfig, path: str) -> str:
    """The file to load: the model itself, or its conversion to a fast format."""
    target = weights.choose(path, config.weights)
    if target is None:
        return path
    cache_dir = Path(config.cache_dir) if config.cache_dir else None
    return weights.convert(path, target, cache_dir, config.threads, say=_say)


def adjustments(
    config: ServeConfig, n_ctx: int, n_batch: int, n_ctx_train: int, n_ctx_seq: int
) -> list[str]:
    """What llama.cpp (or the model) changed from the flags it was given, in words."""
    notes = []
    if n_ctx != config.ctx_size:
        notes.append(
            f"--ctx-size {config.ctx_size}: llama.cpp allocated {n_ctx} KV cells (it rounds "
            "up to a multiple of 256, and to at least one cell per sequence id"
            + ("" if config.kv_unified else "; each sequence's share, to a multiple of 256")
            + ")"
        )
    if n_ctx_train < n_ctx_seq:
        notes.append(
            f"--ctx-size {n_ctx}: one request's context is capped at the model's "
            f"training context, {n_ctx_train} tokens"
            + ("" if config.kv_unified else f", under the {n_ctx_seq} cells of its sequence id")
        )
    if n_batch < config.batch_size:
        notes.append(
            f"--batch-size {config.batch_size}: at most {n_batch} tokens a step "
            "(llama.cpp's batch cannot exceed the context)"
        )
    return notes


def runner_config(config: ServeConfig, path: str, mmproj: str | None) -> LlamaCppConfig:
    """llama.cpp's settings for one model file, all from the server's."""
    return LlamaCppConfig(
        model_path=path,
        n_ctx=config.ctx_size,
        n_batch=config.batch_size,
        n_seq_max=config.sequence_ids(),
        n_threads=config.threads or available_cores(),
        flash_attn=config.flash_attn,
        mmproj_path=mmproj,
        n_gpu_layers=config.gpu_layers,
        kv_unified=config.kv_unified,
    )


def engine_config(config: ServeConfig) -> EngineConfig:
    """The engine's settings, all from the server's (tests build theirs here too)."""
    return EngineConfig(
        max_running=config.parallel,
        token_budget=config.batch_size,
        cache_entries=config.prefix_cache,
        prefill_chunk=config.prefill_chunk,
        speculate_auto=config.speculate == "auto",
        speculate_max_running=config.speculate_max_running,
        deterministic=config.deterministic,
    )


def build_engine(config: ServeConfig, spec: ModelSpec) -> Engine:
    name = spec.name
    path = weights_path(config, spec.path)
    started = time.perf_counter()
    settings = runner_config(config, path, spec.mmproj)
    runner = LlamaCppRunner(settings, progress=_Progress(name))
    log.info(
        "model %s: loaded %s in %.1fs: vocab %d, context %d, %d KV cells (%s), %d threads",
        name,
        path,
        time.perf_counter() - started,
        runner.vocab_size,
        min(runner.n_ctx_seq, runner.n_ctx_train),
        runner.n_ctx,
        "one pool"
        if runner.kv_unified
        else f"{runner.n_seq_max} sequence ids x {runner.n_ctx_seq}",
        settings.n_threads,
    )
    if runner.gpu_offload:
        log.info("model %s: --gpu-layers %d on the GPU backend", name, settings.n_gpu_layers)
    notes = adjustments(config, runner.n_ctx, runner.n_batch, runner.n_ctx_train, runner.n_ctx_seq)
    for note in notes:
        log.warning("model %s: %s", name, note)
    return Engine(runner, engine_config(config))


def check_chat_template(config: ServeConfig) -> str | None:
    """The --chat-template file's template, checked before any model loads (fail fast)."""
    if config.chat_template is None:
        return None
    template = load_chat_template(config.chat_template)
    ChatTemplate(template, bos_token="", eos_token="")
    return template


def build_app(
    config: ServeConfig,
    engines: Mapping[str, EngineClient],
    aliases: Mapping[str, str],
    template: str | None,
) -> tuple[FastAPI, StatusCounter]:
    """The API for these engines (`aliases`: alias -> model name): the FastAPI app, and
    the ASGI app to serve (it counts responses by status). The cluster's ingress builds
    the same app over its replicas."""
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
        include_stop_str_in_output=config.include_stop_str_in_output,
        isolate_cache_per_key=config.prompt_cache_isolation == "per-key",
        max_image_bytes=config.max_image_bytes,
        max_waiting=config.max_waiting,
        request_timeout_s=config.request_timeout,
    )
    app = create_app(
        service,
        chat_template=template,
        models=models,
        api_keys=config.api_keys,
        engines=engines,  # health and metrics per model, not per alias
        test_hooks=os.environ.get("FIRESIDE_TEST_HOOKS") == "1",
    )
    for alias, target in aliases.items():
        log.info("model %s: also served as %s", target, alias)
    return app, StatusCounter(app, service.counters.responses)


def serve(config: ServeConfig) -> int:
    template = check_chat_template(config)
    specs = resolve_models(config.models, config.model_name, config.mmproj)
    aliases = resolve_aliases(config.aliases, specs)
    engines: dict[str, Engine] = {}
    for spec in specs:  # each model has its own engine (and its own llama.cpp threads)
        engines[spec.name] = build_engine(config, spec)
        engines[spec.name].start()
    app, asgi_app = build_app(config, engines, aliases, template)
    server = _Server(
        uvicorn.Config(
            asgi_app,
            host=config.host,
            port=config.port,
            log_config=None,  # uvicorn logs through ours (fireside.logs), in one format
            log_level=logs.uvicorn_level(config.log_level),
            access_log=False,  # the service logs each request once (start, done, refused)
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
