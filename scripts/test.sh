#!/usr/bin/env bash
# Install Fireside with its test dependencies into .venv (idempotent) and run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
# llama-cpp-python compiles llama.cpp on first install (~10 min on 2 cores); pip caches the wheel.
.venv/bin/pip install -q -e '.[test]'
exec .venv/bin/python -m pytest -q "$@"
