#!/usr/bin/env bash
# Install Fireside into .venv (idempotent) and serve the embedded model.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh  # compiles llama.cpp on first install (~10 min on 2 cores)
exec .venv/bin/fireside serve "$@"
