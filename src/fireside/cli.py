"""`fireside serve`: load a model, start its engine, serve the API."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from fireside import logs
from fireside.config import ServeConfig
from fireside.models import DEFAULT_MODEL_NAME, default_model_path

log = logging.getLogger("fireside")
_D = ServeConfig()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to an option's help once, where X says something: not for a
    default of None (the help says what happens without the option) nor an off switch."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action) or ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fireside",
        description="A self-hosted server for the Fireworks Create Completion API.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="serve a model over HTTP",
        description="Load a GGUF model and serve /v1/completions on it.",
        formatter_class=HelpFormatter,
    )
    serve.add_argument("--host", default=_D.host, help="address to listen on")
    serve.add_argument("--port", type=int, default=_D.port, help="port to listen on (0: any free)")
    serve.add_argument(
        "--model",
        action="append",
        metavar="[NAME=]PATH.gguf",
        help="a GGUF model to serve, repeatable (each gets its own engine); "
        "without it, the embedded SmolLM2-135M-Instruct Q4_1",
    )
    serve.add_argument(
        "--mmproj",
        action="append",
        metavar="[NAME=]PATH.gguf",
        help="a model's vision projector (libmtmd): requests to it may carry images",
    )
    serve.add_argument(
        "--alias",
        action="append",
        metavar="ALIAS=NAME",
        help="another id clients may use for a loaded model (repeatable), "
        "e.g. accounts/fireworks/models/x=SmolLM2-135M-Instruct",
    )
    serve.add_argument(
        "--max-image-bytes",
        type=int,
        default=_D.max_image_bytes,
        metavar="N",
        help="largest image accepted, in bytes (after base64 decoding)",
    )
    serve.add_argument(
        "--model-name",
        default=_D.model_name,
        metavar="NAME",
        help="model id clients send in `model` (default: the file's name without .gguf)",
    )
    serve.add_argument(
        "--api-key",
        action="append",
        default=None,
        metavar="KEY",
        help="accept this Bearer key (repeatable); also read from FIRESIDE_API_KEYS "
        "(comma-separated). With no key at all the server is open to anyone",
    )
    serve.add_argument(
        "--ctx-size",
        type=int,
        default=_D.ctx_size,
        metavar="N",
        help="KV cache cells shared by all running sequences; one request's context "
        "is the smaller of this and the model's training context",
    )
    serve.add_argument(
        "--parallel",
        type=int,
        default=_D.parallel,
        metavar="N",
        help="sequences decoding at once (a request with n above this runs alone)",
    )
    serve.add_argument(
        "--threads",
        type=int,
        default=_D.threads,
        metavar="N",
        help="llama.cpp compute threads (0: the cores this process may use)",
    )
    serve.add_argument(
        "--batch-size",
        type=int,
        default=_D.batch_size,
        metavar="N",
        help="most tokens computed in one engine step (prompt chunks plus decode tokens)",
    )
    serve.add_argument(
        "--default-max-tokens",
        type=int,
        default=_D.default_max_tokens,
        metavar="N",
        help="max_tokens when a request does not say",
    )
    serve.add_argument(
        "--include-stop-str-in-output",
        action=argparse.BooleanOptionalAction,
        default=_D.include_stop_str_in_output,
        help="whether a text ended by a stop string keeps it, when the request does not say "
        "(include_stop_str_in_output): on, the source document's rule; off, OpenAI's, "
        "which LangChain and lm-eval's generate tasks expect",
    )
    serve.add_argument(
        "--flash-attn",
        action=argparse.BooleanOptionalAction,
        default=_D.flash_attn,
        help="llama.cpp's flash attention kernels (1.8x the 16-stream throughput on CPU here)",
    )
    serve.add_argument(
        "--prefill-chunk",
        type=int,
        default=_D.prefill_chunk,
        metavar="N",
        help="prompt tokens per step while other streams decode (bounds their token gaps)",
    )
    serve.add_argument(
        "--weights",
        default=_D.weights,
        choices=["auto", "original", "q8_0", "q4_0"],
        help="original: serve the file as given; auto: convert Q4_1 weights to Q8_0 once "
        "(faster on CPU, but logprobs move: 0.16 nats mean on lm-eval loglikelihoods); "
        "q8_0, q4_0: convert to that format",
    )
    serve.add_argument(
        "--cache-dir",
        default=_D.cache_dir,
        metavar="DIR",
        help="where converted weights are kept (default: $FIRESIDE_CACHE_DIR or ~/.cache/fireside)",
    )
    serve.add_argument(
        "--max-waiting",
        type=int,
        default=_D.max_waiting,
        metavar="N",
        help="requests that may wait for a slot; beyond them, 429 with Retry-After",
    )
    serve.add_argument(
        "--request-timeout",
        type=float,
        default=_D.request_timeout,
        metavar="S",
        help="seconds a request may run before it is stopped with an error",
    )
    serve.add_argument(
        "--shutdown-grace",
        type=float,
        default=_D.shutdown_grace,
        metavar="S",
        help="on SIGTERM/SIGINT, seconds running requests get to finish",
    )
    serve.add_argument(
        "--prefix-cache",
        type=int,
        default=_D.prefix_cache,
        metavar="N",
        help="finished sequences whose KV stays cached for prompts that share a prefix (0: off)",
    )
    serve.add_argument(
        "--log-level",
        default=_D.log_level,
        choices=["debug", "info", "warning", "error"],
        help="the least severe log lines shown (on stderr, one format: time level logger: text)",
    )
    bench = sub.add_parser(
        "bench",
        help="load-test an OpenAI-compatible completions server",
        description="Stream completions at a fixed concurrency and report tok/s, TTFT and ITL.",
        formatter_class=HelpFormatter,
    )
    from fireside import bench as bench_module

    bench_module.add_arguments(bench)
    return parser


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    keys = list(args.api_key or [])
    keys += [k.strip() for k in os.environ.get("FIRESIDE_API_KEYS", "").split(",") if k.strip()]
    return ServeConfig(
        host=args.host,
        port=args.port,
        models=tuple(args.model or ()),
        model_name=args.model_name,
        mmproj=tuple(args.mmproj or ()),
        aliases=tuple(args.alias or ()),
        max_image_bytes=args.max_image_bytes,
        api_keys=tuple(keys),
        ctx_size=args.ctx_size,
        parallel=args.parallel,
        threads=args.threads,
        batch_size=args.batch_size,
        default_max_tokens=args.default_max_tokens,
        include_stop_str_in_output=args.include_stop_str_in_output,
        flash_attn=args.flash_attn,
        prefill_chunk=args.prefill_chunk,
        weights=args.weights,
        cache_dir=args.cache_dir,
        max_waiting=args.max_waiting,
        request_timeout=args.request_timeout,
        shutdown_grace=args.shutdown_grace,
        prefix_cache=args.prefix_cache,
        log_level=args.log_level,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        from fireside import bench

        return bench.main(args)
    config = config_from_args(args)
    problems = _check(config)
    if problems:
        parser.error("; ".join(problems))
    logs.configure(config.log_level)
    from fireside.runner.base import LoadError
    from fireside.server import serve  # heavy imports only once arguments are fine

    try:
        return serve(config)
    except LoadError as exc:
        log.error("%s", exc)
        return 1


def _check(config: ServeConfig) -> list[str]:
    problems = []
    try:
        specs = resolve_models(config)
        resolve_aliases(config, specs)
    except ValueError as exc:
        return [str(exc)]
    for spec in specs:
        for path in (spec.path, spec.mmproj):
            if path is not None and not Path(path).is_file():
                problems.append(f"{spec.name}: {path}: no such file")
    if config.max_image_bytes < 1:
        problems.append("--max-image-bytes must be at least 1")
    if not 64 <= config.ctx_size < 2**31:  # llama.cpp's positions are 32-bit
        problems.append("--ctx-size must be in 64..2147483647")
    if not 1 <= config.parallel <= 256:
        problems.append("--parallel must be in 1..256")
    if config.threads < 0:
        problems.append("--threads must be 0 or more")
    if not 1 <= config.batch_size <= 8192:
        problems.append("--batch-size must be in 1..8192")
    if config.prefill_chunk < 1:
        problems.append("--prefill-chunk must be at least 1")
    if config.max_waiting < 0:
        problems.append("--max-waiting must be 0 or more")
    if config.request_timeout <= 0 or config.shutdown_grace < 0:
        problems.append("--request-timeout must be positive and --shutdown-grace not negative")
    if not 0 <= config.prefix_cache <= 128:
        problems.append("--prefix-cache must be in 0..128")
    if config.default_max_tokens < 0:
        problems.append("--default-max-tokens must be 0 or more")
    if not 0 <= config.port <= 65535:
        problems.append("--port must be in 0..65535")
    return problems


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the id clients send
    path: str
    mmproj: str | None = None


def _split(spec: str) -> tuple[str | None, str]:
    """ "NAME=VALUE" -> (NAME, VALUE); "VALUE" -> (None, VALUE)."""
    name, sep, value = spec.partition("=")
    return (name, value) if sep and name and value else (None, spec)


def resolve_models(config: ServeConfig) -> list[ModelSpec]:
    """The models to serve, with their names and projectors; ValueError if inconsistent."""
    raw = config.models or (str(default_model_path()),)
    specs: list[ModelSpec] = []
    for item in raw:
        name, path = _split(item) if config.models else (None, item)
        if name is None:
            if len(raw) == 1 and config.model_name:
                name = config.model_name
            elif not config.models:
                name = DEFAULT_MODEL_NAME
            else:
                name = Path(path).name.removesuffix(".gguf")
        specs.append(ModelSpec(name, path))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"two models share a name: {names}")
    for item in config.mmproj:
        name, path = _split(item)
        if name is None:
            if len(specs) != 1:
                raise ValueError("with several models, give --mmproj as NAME=PATH")
            name = specs[0].name
        if name not in names:
            raise ValueError(f"--mmproj {item}: no model named {name!r}")
        specs[names.index(name)] = replace(specs[names.index(name)], mmproj=path)
    return specs


def resolve_aliases(config: ServeConfig, specs: list[ModelSpec]) -> dict[str, str]:
    """alias -> model name; ValueError for an alias of nothing or one that shadows a model."""
    names = {s.name for s in specs}
    aliases = {}
    for item in config.aliases:
        alias, sep, target = item.partition("=")
        if not sep or not alias or target not in names:
            raise ValueError(f"--alias {item}: expected ALIAS=NAME with NAME a served model")
        if alias in names:
            raise ValueError(f"--alias {item}: {alias!r} is already a model's name")
        aliases[alias] = target
    return aliases
