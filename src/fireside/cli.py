"""`fireside serve`: its flags, made from `ServeConfig`'s fields; then `server.serve`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import typing
from collections.abc import Sequence
from typing import Any

from fireside import logs
from fireside.config import ServeConfig

log = logging.getLogger("fireside")


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
    add_serve_arguments(serve)
    bench = sub.add_parser(
        "bench",
        help="load-test an OpenAI-compatible completions server",
        description="Stream completions at a fixed concurrency and report tok/s, TTFT and ITL.",
        formatter_class=HelpFormatter,
    )
    from fireside import bench as bench_module

    bench_module.add_arguments(bench)
    return parser


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per `ServeConfig` field, from its metadata; the type from its annotation."""
    kinds = typing.get_type_hints(ServeConfig)
    for field in dataclasses.fields(ServeConfig):
        meta, kind = field.metadata, kinds[field.name]
        options: dict[str, Any] = {"dest": field.name, "help": meta["help"]}
        if kind is bool:
            options |= {"action": argparse.BooleanOptionalAction, "default": field.default}
        elif _repeatable(kind):  # None, not (): argparse appends to it
            options |= {"action": "append", "default": None}
        else:
            options |= {"default": field.default, "choices": meta["choices"]}
            if kind in (int, float):
                options["type"] = kind
        if meta["metavar"]:
            options["metavar"] = meta["metavar"]
        parser.add_argument(meta["flag"], **options)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    values: dict[str, Any] = {}
    for name, kind in typing.get_type_hints(ServeConfig).items():
        value = getattr(args, name)
        values[name] = tuple(value or ()) if _repeatable(kind) else value
    env_keys = os.environ.get("FIRESIDE_API_KEYS", "").split(",")
    values["api_keys"] += tuple(k.strip() for k in env_keys if k.strip())
    return ServeConfig(**values)


def _repeatable(kind: Any) -> bool:
    return typing.get_origin(kind) is tuple


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        from fireside import bench

        return bench.main(args)
    config = config_from_args(args)
    problems = config.problems()
    if problems:
        parser.error("; ".join(problems))
    logs.configure(config.log_level)
    if config.replicas:
        return _serve_cluster(config)
    from fireside.api.chat_template import ChatTemplateError
    from fireside.runner.base import LoadError
    from fireside.server import serve  # heavy imports only once arguments are fine

    try:
        return serve(config)
    except (LoadError, ChatTemplateError) as exc:
        log.error("%s", exc)
        return 1


def _serve_cluster(config: ServeConfig) -> int:
    try:
        from fireside.cluster.launch import serve_cluster
    except ImportError as exc:
        log.error("--replicas needs Ray Serve: pip install 'fireside[ray]' (%s)", exc)
        return 1
    return serve_cluster(config)
