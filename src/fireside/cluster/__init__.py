"""Cluster mode: Fireside under Ray Serve (`pip install 'fireside[ray]'`).

The only package that imports `ray`. Two ways in, with the same options:

- `fireside serve --replicas N [--ray-address ADDR] ...` (`launch.serve_cluster`):
  joins a cluster, or starts a local Ray instance, and runs the app until SIGTERM;
- `serve run fireside.cluster:app_builder replicas=2 threads=1` or a `serve deploy`
  config naming `fireside.cluster:app_builder` with the same keys in `args`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ray.serve.deployment import Application

from fireside.cluster.app import application


def config_argv(args: Mapping[str, Any]) -> list[str]:
    """`fireside serve` arguments from a Serve builder's args: `{"threads": 1,
    "model": ["a.gguf"], "prefix_cache": 0, "flash_attn": False}` ->
    `--threads 1 --model a.gguf --prefix-cache 0 --no-flash-attn`."""
    argv: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        values = value if isinstance(value, list | tuple) else [value]
        for v in values:
            if isinstance(v, bool) or str(v).lower() in ("true", "false"):
                on = v if isinstance(v, bool) else str(v).lower() == "true"
                argv.append(flag if on else "--no-" + flag[2:])
            else:
                argv += [flag, str(v)]
    return argv


def app_builder(args: Mapping[str, Any]) -> Application:
    """Ray Serve's application builder: `args` are `fireside serve`'s options."""
    from fireside.cli import build_parser, config_from_args

    parser = build_parser()
    config = config_from_args(parser.parse_args(["serve", *config_argv(args)]))
    if not config.replicas:
        config = dataclasses.replace(config, replicas=1)
    problems = config.problems()
    if problems:
        raise ValueError("; ".join(problems))
    return application(config)


__all__ = ["app_builder", "application", "config_argv"]
