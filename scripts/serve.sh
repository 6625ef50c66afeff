#!/usr/bin/env bash
# Install Fireside into .venv (idempotent) and serve the embedded model.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e .
exec .venv/bin/fireside serve "$@"
